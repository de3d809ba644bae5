"""The one back-off rule: doubling from the first failure, capped."""

import pytest

from dicom_node.common.backoff import backoff


def test_doubles_from_the_base_and_stops_at_the_cap():
    assert [backoff(n, 1.5, 10.0) for n in range(0, 6)] == [1.5, 1.5, 3.0, 6.0, 10.0, 10.0]


def test_a_cap_below_the_base_wins():
    assert backoff(1, 5.0, 2.0) == 2.0


def test_negative_seconds_are_refused():
    with pytest.raises(ValueError, match="negative"):
        backoff(1, -1.0, 5.0)
