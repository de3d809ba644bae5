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
    Announcing,
    EncodeContext,
    EncodeError,
    Referencing,
    chains,
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


class _Reader:
    """Records what it is handed of the SEG: the announced header when it only references
    it, the SEG itself when it requires it."""

    kind = "READER"
    requires: tuple[str, ...] = ("SEG",)
    first_series_number = 9005

    def __init__(self, references: tuple[str, ...]) -> None:
        self.references = references
        self.seen: list[Dataset] = []

    def enabled(self, settings: ResultSettings) -> bool:
        return True

    def build(self, context: EncodeContext, built: Mapping[str, Dataset]) -> Dataset:
        self.seen.append(built["SEG"])
        ds = Dataset()
        ds.SOPInstanceUID = "1.2.3.5"
        return ds


def test_what_only_references_the_seg_gets_its_announcement_the_rest_the_seg(context):
    seg, sr = (e for e in encoders() if e.kind in ("SEG", "SR"))
    header_reader, seg_reader = _Reader(("SEG",)), _Reader(())
    assert isinstance(seg, Announcing) and isinstance(header_reader, Referencing)
    built = encode_all(context, chosen=[seg, sr, header_reader])
    built_too = encode_all(context, chosen=[seg, seg_reader])
    (header,) = header_reader.seen
    assert "PixelData" not in header and "PixelData" in built["SEG"]
    # the SEG is built as announced, and the SR, made beside it, names that SEG
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        assert header[keyword].value == built["SEG"][keyword].value
    assert [(s.SegmentNumber, s.SegmentLabel) for s in header.SegmentSequence] == [
        (s.SegmentNumber, s.SegmentLabel) for s in built["SEG"].SegmentSequence
    ]  # a binary SEG: segments 1.. only
    (segment,) = [
        item
        for group in built["SR"].ContentSequence
        if group.ConceptNameCodeSequence[0].CodeValue == "126010"  # Imaging Measurements
        for item in group.ContentSequence
        for item in item.ContentSequence
        if item.ValueType == "IMAGE"
    ]
    assert segment.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID
    (seg_itself,) = seg_reader.seen
    assert seg_itself is built_too["SEG"]


@pytest.mark.parametrize(
    ("seg_type", "sop_class"),
    [("binary", "1.2.840.10008.5.1.4.1.1.66.4"), ("labelmap", "1.2.840.10008.5.1.4.1.1.66.7")],
)
def test_the_seg_announces_its_class_and_every_segment_when_none_is_found(
    context, seg_type, sop_class
):
    (seg,) = (e for e in encoders() if e.kind == "SEG")
    settings = ResultSettings(seg_type=seg_type)
    empty = EncodeContext(
        **{**context.__dict__, "labels": np.zeros_like(context.labels), "settings": settings}
    )
    empty = EncodeContext(
        **{**empty.__dict__, "segments": [*context.segments, segment_info_for(2, "liver")]}
    )
    header = seg.announce(empty)
    built = encode_all(empty, chosen=[seg])["SEG"]
    assert header.SOPClassUID == built.SOPClassUID == sop_class
    numbered = [(s.SegmentNumber, s.SegmentLabel) for s in header.SegmentSequence]
    assert numbered == [(1, "spleen"), (2, "liver")]
    # (a label map also describes its background, segment 0)
    assert [(s.SegmentNumber, s.SegmentLabel) for s in built.SegmentSequence][-2:] == numbered


def test_chains_split_what_can_be_built_apart(note):
    by_kind = {e.kind: e for e in encoders()}
    seg, rt, sr, kos = (by_kind[k] for k in ("SEG", "RTSTRUCT", "SR", "NOTE"))

    def kinds(found):
        return [[e.kind for e in chain] for chain in found]

    assert kinds(chains([seg, rt, sr])) == [["SEG", "SR"], ["RTSTRUCT"]]
    assert kinds(chains([seg, rt, sr], announced={"SEG"})) == [["SEG"], ["RTSTRUCT"], ["SR"]]
    # the NOTE requires the SEG itself: it stays with it
    assert kinds(chains([seg, rt, sr, kos], announced={"SEG"})) == [
        ["SEG", "NOTE"],
        ["RTSTRUCT"],
        ["SR"],
    ]
