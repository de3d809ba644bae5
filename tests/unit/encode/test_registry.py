"""The encoders' registry: what the runner, the outbox and the pages read. An encoder added
through it is made in order, after what it requires, and its errors reach the caller."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_node.config import ResultSettings
from dicom_node.encode import (
    AlgorithmInfo,
    EncodeContext,
    EncodeError,
    encode_all,
    encoders,
    register,
    requiring,
    segment_info_for,
    series_number,
    unregister,
)
from dicom_node.series.volume import assemble_series
from dicom_node_testing.synthetic import write_ct_series


class _Note:
    """A stand-in result object that names the SEG it follows (as a KOS would)."""

    kind = "NOTE"
    requires: tuple[str, ...] = ("SEG",)
    first_series_number = 9004

    def enabled(self, settings: ResultSettings) -> bool:
        return True

    def build(self, context: EncodeContext, built: Mapping[str, Dataset]) -> Dataset:
        if not context.labels.any():
            raise EncodeError("nothing to note")
        ds = Dataset()
        ds.SOPInstanceUID = "1.2.3.4"
        ds.ReferencedSOPInstanceUID = built["SEG"].SOPInstanceUID
        ds.SeriesNumber = series_number(self.kind, context.model_index)
        return ds


@pytest.fixture
def context(tmp_path):
    hu = np.full((4, 16, 16), -100, np.int16)
    volume = assemble_series(write_ct_series(hu, tmp_path, spacing=(2.0, 1.0, 1.0)), 3)
    labels = np.zeros(volume.shape, np.uint8)
    labels[1:3, 4:9, 4:9] = 1
    return EncodeContext(
        source=volume,
        labels=labels,
        segments=[segment_info_for(1, "spleen")],
        algorithm=AlgorithmInfo("test", "1"),
        settings=ResultSettings(),
        model_index=1,
    )


@pytest.fixture
def note():
    register(_Note())
    yield
    unregister("NOTE")


def test_the_built_in_encoders_in_the_order_results_are_sent():
    assert [e.kind for e in encoders()] == ["SEG", "RTSTRUCT", "SR"]
    assert [e.kind for e in requiring("SEG")] == ["SR"]
    assert series_number("RTSTRUCT", 2) == 9022


def test_a_registered_encoder_is_made_after_what_it_requires(context, note):
    assert [e.kind for e in requiring("SEG")] == ["SR", "NOTE"]
    built = encode_all(context)
    assert list(built) == ["SEG", "RTSTRUCT", "SR", "NOTE"]
    assert built["NOTE"].ReferencedSOPInstanceUID == built["SEG"].SOPInstanceUID
    assert built["NOTE"].SeriesNumber == 9014 and built["SEG"].SeriesNumber == 9011


def test_an_encoder_error_reaches_the_caller(context, note):
    empty = EncodeContext(**{**context.__dict__, "labels": np.zeros_like(context.labels)})
    with pytest.raises(EncodeError, match="nothing to note"):
        encode_all(empty)


def test_an_encoder_without_what_it_requires_is_refused(context, note):
    (note_encoder,) = [e for e in encoders() if e.kind == "NOTE"]
    with pytest.raises(ValueError, match="the NOTE encoder needs SEG"):
        encode_all(context, chosen=[note_encoder])
