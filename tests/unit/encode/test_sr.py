"""The SR a viewer lists: each organ's volume (TID 1411) and, first, for the same finding,
the area of its outline on the CT image where it is largest (TID 1501, the area INFERRED
FROM a SCOORD POLYLINE) with a Comment naming the organ and its volume."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.sr.codedict import codes
from skimage.draw import polygon as fill_polygon

from dicom_node.config import ResultSettings
from dicom_node.encode import AlgorithmInfo, build_seg, build_sr, segment_info_for
from dicom_node.encode.sr import ABSENT, PRESENCE, VIEWER_CONTOUR_TRACKING, largest_outline
from dicom_node.series.volume import assemble_series
from dicom_node_testing.phantom import make_phantom
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.checks import dciodvfy_errors

ALGORITHM = AlgorithmInfo("spleen_ct_segmentation", "0.5.3", source="MONAI model zoo")
SETTINGS = ResultSettings()
SEGMENTS = [
    segment_info_for(1, "spleen"),
    segment_info_for(2, "liver"),
    segment_info_for(3, "kidney_left"),
]


def _filled(outline: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres the outline (image coordinates) encloses."""
    rows, cols = fill_polygon(outline[:, 1] - 0.5, outline[:, 0] - 0.5, shape)
    out = np.zeros(shape, bool)
    out[rows, cols] = True
    return out


def test_largest_outline_encloses_the_largest_region_and_closes() -> None:
    plane = np.zeros((20, 30), bool)
    plane[2:5, 2:5] = True  # a small region
    plane[8:18, 0:12] = True  # the largest one, on the image edge
    plane[11:13, 4:6] = False  # with a hole
    outline = largest_outline(plane)
    assert np.array_equal(outline[0], outline[-1])  # a closed polyline
    largest = np.zeros_like(plane)
    largest[8:18, 0:12] = True
    assert np.array_equal(_filled(outline, plane.shape), largest)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    phantom = make_phantom(shape=(12, 64, 64), spacing=(5.0, 5.0, 5.0), seed=3)
    folder = tmp_path_factory.mktemp("ct")
    write_ct_series(phantom.hu, folder, spacing=phantom.spacing, attrs=SeriesAttributes())
    source = assemble_series(sorted(folder.iterdir()))
    labels = np.zeros(source.array.shape, np.uint8)
    labels[3:9, 10:30, 12:26] = 1  # spleen
    labels[5:7, 40:50, 5:9] = 2  # liver, on two slices...
    labels[6, 40:50, 9:12] = 2  # ...larger on the second
    seg = build_seg(source, labels, SEGMENTS, ALGORITHM, SETTINGS)
    sr = build_sr(seg, source, labels, SEGMENTS, ALGORITHM, SETTINGS)
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return source, labels, sr, path


def test_each_organ_found_has_its_outline_on_its_largest_slice(report) -> None:
    source, labels, sr, _ = report
    content = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    volumes = content.get_volumetric_roi_measurement_groups()
    assert [str(g.tracking_identifier) for g in volumes] == ["spleen", "liver"]
    groups = content.get_image_measurement_groups()
    outlines = [g for g in groups if g.get_measurements(name=codes.SCT.Area)]
    assert [str(g.tracking_identifier) for g in outlines] == [
        f"{VIEWER_CONTOUR_TRACKING}:spleen",
        f"{VIEWER_CONTOUR_TRACKING}:liver",
    ]
    # each outline comes right before its volume (OHIF takes the tool from the first group)
    order = [str(i.ContentSequence[0].TextValue) for i in sr.ContentSequence[-1].ContentSequence]
    assert order == [str(outlines[0].tracking_identifier), "spleen"] + [
        str(outlines[1].tracking_identifier),
        "liver",
        "kidney_left",
    ]
    pixel_mm2 = 5.0 * 5.0
    for value, volume, outline in zip((1, 2), volumes, outlines, strict=True):
        # one finding: the same tracking UID, type and site in both groups
        assert outline.tracking_uid == volume.tracking_uid
        assert outline.finding_type == volume.finding_type
        (ml,) = volume.get_measurements(name=codes.SCT.Volume)
        assert ml.value == pytest.approx((labels == value).sum() * 5.0**3 / 1000)
        (comment,) = (i for i in outline[0].ContentSequence if i.name == codes.DCM.Comment)
        assert comment.value == f"{volume.tracking_identifier}: {ml.value:.2f} mL"
        # the area, inferred from the outline on the CT image where the organ is largest
        (area,) = outline.get_measurements(name=codes.SCT.Area)
        assert area.unit.value == "mm2"
        (scoord,) = (i for i in area[0].ContentSequence if i.ValueType == "SCOORD")
        assert scoord.RelationshipType == "INFERRED FROM"
        assert scoord.GraphicType == "POLYLINE"
        areas = [int((labels[k] == value).sum()) for k in range(labels.shape[0])]
        k = int(np.argmax(areas))
        ref = scoord.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == source.headers[k].SOPInstanceUID
        points = np.asarray(scoord.GraphicData, np.float32).reshape(-1, 2)
        assert np.array_equal(points[0], points[-1])
        assert np.array_equal(_filled(points, labels.shape[1:]), labels[k] == value)
        # both are rectangles there: marching squares cuts each of their 4 corners by 1/8 pixel
        assert area.value == pytest.approx((areas[k] - 4 / 8) * pixel_mm2)
    # the organ not found is absent: no region, no measurement, no 0 mL
    (missing,) = (g for g in groups if g.get_qualitative_evaluations(name=PRESENCE))
    assert str(missing.tracking_identifier) == "kidney_left"
    assert missing.get_qualitative_evaluations(name=PRESENCE)[0].value == ABSENT
    assert missing.get_measurements() == []
    (comment,) = (i for i in missing[0].ContentSequence if i.name == codes.DCM.Comment)
    assert comment.value == "kidney_left: not found"


def test_the_sr_passes_dciodvfy(report) -> None:
    assert dciodvfy_errors(Path(report[3])) == []
