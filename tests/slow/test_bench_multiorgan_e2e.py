"""``python -m bench multiorgan``'s end-to-end case keeps working, at a tiny size (slow: run
beside the suite with ``DICOM_NODE_SLOW=1``): its results reach a real Orthanc through the
node with the zoo's wholeBody network, its peer writing a SEG of the same labels."""

from __future__ import annotations

import os

import pytest

from bench import multiorgan

pytestmark = pytest.mark.skipif(
    not os.environ.get("DICOM_NODE_SLOW"), reason="DICOM_NODE_SLOW unset"
)


def test_end_to_end_at_a_tiny_size(tmp_path) -> None:
    if not (multiorgan.ZOO / "configs" / "inference.json").is_file():
        pytest.skip(f"no wholeBody bundle configs at {multiorgan.ZOO}")
    # one run, without the warm-up series: the rows are checked, not the figures
    rows = multiorgan.e2e_rows(tmp_path, (12, 48, 48), backend="local", runs=1, warm_up=False)
    timed, stages, sizes = rows
    assert timed["this_project"] > 0 and timed["peer"] > 0 and timed["ratio"] > 0
    assert "inference" in stages["figure"]
    for kind in ("SEG", "RTSTRUCT", "SR", "plain SEG"):
        assert f"{kind} " in sizes["figure"], sizes["figure"]
