"""Multi-organ results: codes with laterality, labels the model did not find, a result with
no label at all, SEG formats a real Orthanc 1.10 stores, and fragmented label maps."""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import scipy.ndimage as ndi

from dicom_node.config import ResultSettings
from dicom_node.encode import (
    AlgorithmInfo,
    build_rtstruct,
    build_seg,
    build_sr,
    segment_info_for,
)
from dicom_node.encode.labels import present_segments, segment_numbers
from dicom_node.encode.sr import ABSENT, PRESENCE
from dicom_node.export.dimse import DicomDestination, ExportError, send_files
from dicom_node.series.volume import SeriesVolume, assemble_series
from dicom_node_testing.synthetic import write_ct_series
from tests import peers
from tests.checks import dciodvfy_errors, rtstruct_masks
from tests.unit.encode.test_encode import STALE_LABELMAP_ERRORS

pytestmark = pytest.mark.cost(20)

ALGORITHM = AlgorithmInfo("swin_unetr_btcv_segmentation", "0.5.6", source="MONAI model zoo")
BTCV = [
    "spleen", "Right Kidney", "Left Kideny", "Gallbladder", "Esophagus", "Liver", "Stomach",
    "Aorta", "IVC", "Portal and Splenic Veins", "Pancreas", "Right adrenal gland",
    "Left adrenal gland",
]  # fmt: skip
SEGMENTS = [segment_info_for(v, n) for v, n in enumerate(BTCV, start=1)]
FOUND = (1, 2, 3, 6, 9)  # spleen, both kidneys, liver, IVC


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> SeriesVolume:
    hu = np.zeros((6, 64, 56), dtype=np.int16)
    paths = write_ct_series(
        hu, tmp_path_factory.mktemp("ct"), spacing=(3.0, 0.8, 0.8), origin=(-20, -25, -60)
    )
    return assemble_series(paths)


@pytest.fixture(scope="module")
def labels(source: SeriesVolume) -> np.ndarray:
    out = np.zeros(source.shape, dtype=np.uint8)
    for i, value in enumerate(FOUND):
        r, c = 4 + 11 * (i % 5), 4 + 25 * (i // 5)
        out[1 + i % 3 : 5, r : r + 9, c : c + 20] = value
    return out


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_btcv_result_codes_laterality_and_absent_labels(source, labels, tmp_path) -> None:
    settings = ResultSettings()
    seg = build_seg(source, labels, SEGMENTS, ALGORITHM, settings)
    rt = build_rtstruct(source, labels, SEGMENTS, ALGORITHM, settings)
    sr = build_sr(seg, source, labels, SEGMENTS, ALGORITHM, settings)
    for kind, ds in (("seg", seg), ("rt", rt), ("sr", sr)):
        assert dciodvfy_errors(_save(ds, tmp_path / f"{kind}.dcm")) == [], kind

    found = [BTCV[v - 1] for v in FOUND]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == found
    assert [r.ROIName for r in rt.StructureSetROISequence] == found
    for item in seg.SegmentSequence:
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue != "123037004"
    left = seg.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0]
    assert left.CodeValue == "64033007"
    assert left.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
    code = rt.RTROIObservationsSequence[1].RTROIIdentificationCodeSequence[0]
    assert code.CodeValue == "64033007"
    assert code.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"
    assert seg.SegmentSequence[4].SegmentedPropertyTypeCodeSequence[0].CodeValue == "64131007"

    # the SEG reads back with highdicom as exactly the found labels, renumbered 1..5
    read = hd.seg.segread(tmp_path / "seg.dcm")
    pixels = read.get_pixels_by_source_instance(
        source.source_uids, combine_segments=True, assert_missing_frames_are_empty=True
    )
    numbered = segment_numbers(labels, present_segments(labels, SEGMENTS))
    np.testing.assert_array_equal(pixels, numbered)
    # the RTSTRUCT rasterises back to each found label
    masks = rtstruct_masks(tmp_path / "rt.dcm", source)
    for number, value in enumerate(FOUND, start=1):
        np.testing.assert_array_equal(masks[number], labels == value)

    # the SR: all 13 labels, the 8 not found absent (no 0 mL)
    report = hd.sr.srread(tmp_path / "sr.dcm").content
    volumetric = report.get_volumetric_roi_measurement_groups()
    assert [str(g.tracking_identifier) for g in volumetric] == found
    # (besides each found organ's outline group, which carries an area, not a volume)
    empty = [
        g
        for g in report.get_image_measurement_groups()
        if g.get_qualitative_evaluations(name=PRESENCE)
    ]
    assert [str(g.tracking_identifier) for g in empty] == [n for n in BTCV if n not in found]
    for group in empty:
        assert group.get_qualitative_evaluations(name=PRESENCE)[0].value == ABSENT
        assert group.get_measurements() == []
    kidney = volumetric[2]
    assert kidney.finding_sites[0].laterality.value == "7771000"


def test_no_label_found_is_still_a_valid_result(source, tmp_path) -> None:
    """Nothing found: SEG needs a segment and a frame, RTSTRUCT an ROI, so both say what
    was looked for (every label, empty frames of the first slice only, ROIs without
    contours), and the SR says of each label that it is absent, measuring nothing."""
    labels = np.zeros(source.shape, dtype=np.uint8)
    settings = ResultSettings()
    seg = build_seg(source, labels, SEGMENTS, ALGORITHM, settings)
    rt = build_rtstruct(source, labels, SEGMENTS, ALGORITHM, settings)
    sr = build_sr(seg, source, labels, SEGMENTS, ALGORITHM, settings)
    assert len(seg.SegmentSequence) == len(BTCV)
    # BINARY: one empty frame per segment, all on the first slice only
    assert int(seg.NumberOfFrames) == len(BTCV)
    assert {
        f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for f in seg.PerFrameFunctionalGroupsSequence
    } == {source.source_uids[0]}
    labelmap = build_seg(source, labels, SEGMENTS, ALGORITHM, ResultSettings(seg_type="labelmap"))
    assert int(labelmap.NumberOfFrames) == 1
    assert len(rt.StructureSetROISequence) == len(BTCV)
    assert all("ContourSequence" not in c for c in rt.ROIContourSequence)
    for kind, ds in (("seg", seg), ("rt", rt), ("sr", sr)):
        assert dciodvfy_errors(_save(ds, tmp_path / f"{kind}.dcm")) == [], kind
    groups = hd.sr.srread(tmp_path / "sr.dcm").content.get_image_measurement_groups()
    assert [g.get_qualitative_evaluations(name=PRESENCE)[0].value for g in groups] == [ABSENT] * 13
    assert all(g.get_measurements() == [] for g in groups)


# ------------------------------------------------------------ SEG formats and a real PACS

FORMATS = [("binary", "none"), ("labelmap", "none"), ("labelmap", "rle"), ("labelmap", "jpegls")]
SYNTAX = {"none": "1.2.840.10008.1.2.1", "rle": "1.2.840.10008.1.2.5",
          "jpegls": "1.2.840.10008.1.2.4.80"}  # fmt: skip


@pytest.fixture(scope="module")
def seg_files(source, labels, tmp_path_factory) -> dict[tuple[str, str], Path]:
    out = tmp_path_factory.mktemp("formats")
    files = {}
    for seg_type, compression in FORMATS:
        settings = ResultSettings(seg_type=seg_type, seg_compression=compression)
        seg = build_seg(source, labels, SEGMENTS, ALGORITHM, settings)
        files[(seg_type, compression)] = _save(seg, out / f"{seg_type}-{compression}.dcm")
    return files


@pytest.mark.parametrize(("seg_type", "compression"), FORMATS)
def test_seg_formats_read_back_and_validate(seg_files, source, labels, seg_type, compression):
    path = seg_files[(seg_type, compression)]
    ds = pydicom.dcmread(path)
    expected_syntax = SYNTAX[compression] if seg_type == "labelmap" else SYNTAX["none"]
    assert ds.file_meta.TransferSyntaxUID == expected_syntax
    read = hd.seg.segread(path)
    pixels = read.get_pixels_by_source_instance(
        source.source_uids, combine_segments=True, assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(
        pixels, segment_numbers(labels, present_segments(labels, SEGMENTS))
    )
    errors = set(dciodvfy_errors(path))
    if seg_type == "binary":
        assert errors == set()
    else:  # dicom3tools (2022) predates Label Map SEG; nothing else is reported
        assert errors <= STALE_LABELMAP_ERRORS, errors - STALE_LABELMAP_ERRORS


def test_binary_seg_compression_setting_is_ignored(source, labels) -> None:
    """highdicom encodes 1-bit frames only natively (or JPEG 2000): a binary SEG stays
    uncompressed whatever seg_compression says."""
    seg = build_seg(source, labels, SEGMENTS, ALGORITHM, ResultSettings(seg_compression="rle"))
    assert seg.file_meta.TransferSyntaxUID == SYNTAX["none"]


def _orthanc(workdir: Path, accept_unknown: bool, monkeypatch) -> peers.Orthanc:
    if accept_unknown:  # the same Orthanc, with "UnknownSopClassAccepted": true

        def dumps(cfg, *args, **kwargs):
            if isinstance(cfg, dict) and "DicomAet" in cfg:
                cfg = {**cfg, "UnknownSopClassAccepted": True}
            return json.dumps(cfg, *args, **kwargs)

        monkeypatch.setattr(peers, "json", types.SimpleNamespace(dumps=dumps, loads=json.loads))
    return peers.Orthanc(workdir).start()


@pytest.mark.parametrize("accept_unknown", [False, True], ids=["default", "unknown-accepted"])
def test_which_seg_formats_orthanc_stores(seg_files, tmp_path, monkeypatch, accept_unknown):
    """Orthanc 1.10 (DCMTK 3.6.7 dictionary) does not know the Label Map Segmentation SOP
    class: by default it refuses the association for it; with UnknownSopClassAccepted it
    stores every format. Binary SEG is always stored."""
    pacs = _orthanc(tmp_path / "orthanc", accept_unknown, monkeypatch)
    try:
        dest = DicomDestination(name="pacs", ae_title=pacs.aet, host="127.0.0.1",
                           port=pacs.dicom_port)  # fmt: skip
        stored = set()
        for key, path in seg_files.items():
            try:
                status = send_files(dest, [path], "DICOM_NODE")[path]
            except ExportError:
                continue
            if status == 0:
                stored.add(key)
        if accept_unknown:
            assert stored == set(FORMATS)
        else:
            assert stored == {("binary", "none")}
        assert len(pacs.rest("/instances")) == len(stored)
    finally:
        pacs.stop()


# ---------------------------------------------------------------- fragmented label maps


def speckle(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """What an untrained network gives: smoothed noise, thresholded (about 15% set)."""
    rng = np.random.default_rng(seed)
    noise = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0, 1, 1))
    return (noise > 0.3).astype(np.uint8)


@pytest.fixture(scope="module")
def speckled(tmp_path_factory) -> tuple[SeriesVolume, np.ndarray]:
    shape = (40, 160, 160)
    paths = write_ct_series(np.zeros(shape, np.int16), tmp_path_factory.mktemp("speckle"),
                            spacing=(2.5, 1.0, 1.0), origin=(0, 0, 0))  # fmt: skip
    return assemble_series(paths), speckle(shape)


def test_a_speckled_label_map_gives_a_bounded_rtstruct(speckled, tmp_path, caplog) -> None:
    source, labels = speckled
    spleen = [segment_info_for(1, "spleen")]
    with caplog.at_level(logging.WARNING, logger="dicom_node.encode.rtstruct"):
        rt = build_rtstruct(source, labels, spleen, ALGORITHM, ResultSettings())
    path = _save(rt, tmp_path / "rt.dcm")
    per_slice: dict[str, int] = {}
    for contour in rt.ROIContourSequence[0].ContourSequence:
        uid = contour.ContourImageSequence[0].ReferencedSOPInstanceUID
        per_slice[uid] = per_slice.get(uid, 0) + 1
    assert max(per_slice.values()) == 100  # the default cap, reached on every slice
    assert path.stat().st_size < 2_500_000  # 7.8 MB without the cap
    assert "contours left out" in caplog.text and "fragmented" in caplog.text
    assert dciodvfy_errors(path) == []
    # the largest parts are kept; a small hole left out fills in, which adds little
    mask, truth = rtstruct_masks(path, source)[1], labels == 1
    assert (mask & truth).sum() > 0.5 * truth.sum()  # 57%: the 100 largest of ~500 per slice
    assert (mask & ~truth).sum() < 0.01 * truth.sum()


def test_minimum_area_drops_only_small_parts(source, tmp_path) -> None:
    labels = np.zeros(source.shape, dtype=np.uint8)
    labels[2, 10:30, 10:30] = 1  # 20x20 px = 256 mm²
    labels[2, 40, 40] = 1  # a speck: 0.64 mm² (the traced diamond 0.32 mm²)
    labels[2, 50:52, 10:12] = 1  # 4 px, 2.56 mm²
    spleen = [segment_info_for(1, "spleen")]
    settings = ResultSettings(rtstruct_min_contour_area_mm2=2.0)
    rt = build_rtstruct(source, labels, spleen, ALGORITHM, settings)
    mask = rtstruct_masks(_save(rt, tmp_path / "rt.dcm"), source)[1]
    expected = labels == 1
    expected[2, 40, 40] = False
    np.testing.assert_array_equal(mask, expected)


def test_contour_data_is_the_same_in_memory_and_in_the_file(source, labels, tmp_path) -> None:
    # Contour Data is handed to pydicom as its encoded text (written without decoding):
    # read in memory, from the written file, and as the coordinates it stands for, it is
    # one list of numbers, each contour on its slice.
    rt = build_rtstruct(source, labels, SEGMENTS, ALGORITHM, ResultSettings())
    path = _save(rt, tmp_path / "rt.dcm")
    back = pydicom.dcmread(path)
    for mem, disk in zip(rt.ROIContourSequence, back.ROIContourSequence, strict=True):
        for a, b in zip(mem.ContourSequence, disk.ContourSequence, strict=True):
            assert [float(v) for v in a.ContourData] == [float(v) for v in b.ContourData]
            assert len(b.ContourData) == 3 * int(b.NumberOfContourPoints) > 0
            z = {round(float(v), 3) for v in b.ContourData[2::3]}
            assert len(z) == 1  # axial source: every vertex in the plane of its slice
    masks = rtstruct_masks(path, source)
    for number, value in enumerate(FOUND, start=1):
        assert np.array_equal(masks[number], labels == value), value
