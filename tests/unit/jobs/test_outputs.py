"""A job's results: every encoder's object, the binary forms a destination may need, and
writing them durably above the disk reserve, or not at all."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from dicom_node.config import ResultSettings, Settings
from dicom_node.encode import AlgorithmInfo, EncodeContext, segment_info_for
from dicom_node.export.dimse import DicomDestination
from dicom_node.jobs.outputs import (
    NotWritten,
    encode_results,
    plan_outbox_items,
    wants_binary_alternatives,
    write_results,
)
from dicom_node.series.volume import assemble_series
from dicom_node_testing.synthetic import write_ct_series
from tests.checks import sr_evidence_segs

LABEL_MAP = ResultSettings(seg_type="labelmap")


def _settings(results: ResultSettings, *seg_types: str) -> Settings:
    return Settings(
        results=results,
        destinations=[
            DicomDestination(name=f"d{i}", ae_title="A", host="h", port=1, seg_type=s)
            for i, s in enumerate(seg_types)
        ],
    )


@pytest.fixture
def context(tmp_path):
    hu = np.full((4, 16, 16), -100, np.int16)
    volume = assemble_series(write_ct_series(hu, tmp_path / "ct", spacing=(2.0, 1.0, 1.0)), 3)
    labels = np.zeros(volume.shape, np.uint8)
    labels[1:3, 4:9, 4:9] = 1
    return EncodeContext(
        source=volume,
        labels=labels,
        segments=[segment_info_for(1, "spleen")],
        algorithm=AlgorithmInfo("test", "1"),
        settings=LABEL_MAP,
    )


def test_binary_forms_only_where_some_destination_may_need_them():
    assert not wants_binary_alternatives(_settings(ResultSettings(), "auto"))
    assert not wants_binary_alternatives(_settings(LABEL_MAP, "labelmap"))
    assert wants_binary_alternatives(_settings(LABEL_MAP, "labelmap", "auto"))


def test_the_seg_and_what_names_it_get_a_binary_form(context, tmp_path):
    settings = _settings(LABEL_MAP, "auto", "binary")
    results = encode_results(context, settings)
    assert [r.kind for r in results] == ["SEG", "RTSTRUCT", "SR"]
    by_kind = {r.kind: r for r in results}
    assert by_kind["RTSTRUCT"].binary is None
    seg, binary_seg = (pydicom.dcmread(io.BytesIO(e.data)) for e in by_kind["SEG"].forms())
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    assert binary_seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    # each SR names the SEG of its own form
    sr, binary_sr = (pydicom.dcmread(io.BytesIO(e.data)) for e in by_kind["SR"].forms())
    assert sr_evidence_segs(sr) == {seg.SOPInstanceUID} != sr_evidence_segs(binary_sr)
    assert sr_evidence_segs(binary_sr) == {binary_seg.SOPInstanceUID}
    (out := tmp_path / "out").mkdir()
    written: list = []
    stored = write_results(out, results, reserve_mb=0, written=written)
    assert len(written) == 5 and all(p.exists() for p in written)
    items = plan_outbox_items(settings, "1.2", "m", stored)
    auto = {i.kind: i for i in items if i.destination == "d0"}
    binary = {i.kind: i for i in items if i.destination == "d1"}
    assert auto["SEG"].alt_path == str(stored[0].binary_path) and auto["SEG"].form == "labelmap"
    assert binary["SR"].sop_uid == stored[2].binary_sop_uid and binary["SR"].form == "binary"


def test_below_the_reserve_nothing_is_written(context, tmp_path):
    results = encode_results(context, _settings(ResultSettings()))
    written: list = []
    with pytest.raises(NotWritten, match="MB kept for the database and logs"):
        write_results(tmp_path, results, reserve_mb=10**9, written=written)
    assert written == [] and not list(tmp_path.glob("*.dcm"))
