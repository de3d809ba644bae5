"""Checks of results with tools nobody here wrote: dicom3tools, highdicom, scikit-image."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import scipy.ndimage
from skimage.draw import polygon as fill_polygon

from dicom_node.series.volume import SeriesVolume


def dciodvfy_errors(path: Path) -> list[str]:
    """Error lines of ``dciodvfy`` for one object (warnings are printed, not failed on)."""
    run = subprocess.run(
        [shutil.which("dciodvfy") or "dciodvfy", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = (run.stdout + run.stderr).splitlines()
    for line in lines:
        if line.startswith("Warning"):
            print(f"dciodvfy {Path(path).name}: {line}")
    return [line for line in lines if line.startswith("Error")]


def dcentvfy(paths: list[Path]) -> subprocess.CompletedProcess:
    """``dcentvfy`` across files: patient/study/series consistency (exit 1 on any Error)."""
    return subprocess.run(
        [shutil.which("dcentvfy") or "dcentvfy", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * float(np.count_nonzero(a & b)) / float(total)


def resample_nearest(
    mask: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: tuple[int, ...]
) -> np.ndarray:
    """``mask`` (on ``src_affine``'s grid) on the grid of ``dst_affine``, nearest neighbour."""
    m = np.linalg.inv(src_affine) @ dst_affine
    return scipy.ndimage.affine_transform(
        mask.astype(np.uint8), m[:3, :3], offset=m[:3, 3], output_shape=dst_shape, order=0
    )


def seg_mask(
    seg: Path | hd.seg.Segmentation, source: SeriesVolume, segment_number: int = 1
) -> np.ndarray:
    """A segment of a SEG read back with highdicom (a file, or one already read: reading
    takes 0.4 s for a SEG of 100 segments), as a boolean mask on the source volume's grid."""
    if not isinstance(seg, hd.seg.Segmentation):
        seg = hd.seg.segread(seg)
    out = np.zeros(source.array.shape, bool)
    referenced = {
        (str(ref.ReferencedSOPInstanceUID), int(ref.get("ReferencedFrameNumber", 0) or 0))
        for frame in seg.PerFrameFunctionalGroupsSequence
        for der in frame.DerivationImageSequence
        for ref in der.SourceImageSequence
    }
    keys = [
        (uid, (source.frame_numbers or [0] * len(source.source_uids))[k])
        for k, uid in enumerate(source.source_uids)
    ]
    present = [k for k, key in enumerate(keys) if key in referenced]
    if not present:
        return out
    if source.frame_numbers is None:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[source.source_uids[k] for k in present],
            segment_numbers=[segment_number],
            assert_missing_frames_are_empty=True,
        )
    else:
        pixels = seg.get_pixels_by_source_frame(
            source_sop_instance_uid=source.source_uids[0],
            source_frame_numbers=[source.frame_numbers[k] for k in present],
            segment_numbers=[segment_number],
            assert_missing_frames_are_empty=True,
        )
    out[present] = pixels[..., 0] > 0
    return out


def seg_referenced_uids(seg_path: Path) -> set[str]:
    seg = pydicom.dcmread(seg_path)
    return {
        str(ref.ReferencedSOPInstanceUID)
        for frame in seg.PerFrameFunctionalGroupsSequence
        for der in frame.DerivationImageSequence
        for ref in der.SourceImageSequence
    }


def rtstruct_masks(rt_path: Path, source: SeriesVolume) -> dict[int, np.ndarray]:
    """Rasterise every ROI's contours onto the source grid (even-odd), checking on the way
    that each contour lies within 0.01 mm of the plane of the slice it references."""
    rt = pydicom.dcmread(rt_path)
    index = {uid: k for k, uid in enumerate(source.source_uids)}
    inverse = np.linalg.inv(source.affine)
    normal = source.affine[:3, 0] / np.linalg.norm(source.affine[:3, 0])
    shape = source.array.shape
    out: dict[int, np.ndarray] = {}
    for roi in rt.ROIContourSequence:
        mask = np.zeros(shape, bool)
        for contour in roi.get("ContourSequence", []):
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            (image,) = contour.ContourImageSequence
            k = index[str(image.ReferencedSOPInstanceUID)]
            if source.frame_numbers is not None:
                k = source.frame_numbers.index(int(image.ReferencedFrameNumber))
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            slice_origin = (source.affine @ np.array([k, 0, 0, 1.0]))[:3]
            off_plane = np.abs((points - slice_origin) @ normal)
            assert off_plane.max() <= 0.01, (k, float(off_plane.max()))
            voxels = np.column_stack([points, np.ones(len(points))]) @ inverse.T
            rows, cols = fill_polygon(voxels[:, 1], voxels[:, 2], shape[1:])
            fill = np.zeros(shape[1:], bool)
            fill[rows, cols] = True
            mask[k] ^= fill
        out[int(roi.ReferencedROINumber)] = mask
    return out


def sr_evidence_segs(sr: pydicom.Dataset) -> set[str]:
    """The SOP Instance UIDs of the SEGs (either class) an SR lists as its evidence."""
    return {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
        if ref.ReferencedSOPClassUID.startswith("1.2.840.10008.5.1.4.1.1.66.")
    }


def sr_volumes_ml(sr_path: Path) -> list[float]:
    sr = hd.sr.srread(sr_path)
    from pydicom.sr.codedict import codes

    out = []
    for group in sr.content.get_volumetric_roi_measurement_groups():
        (m,) = group.get_measurements(name=codes.SCT.Volume)
        out.append(float(m.value))
    return out


#: The DICOM Audit Message Schema (PS3.15 A.5.1), vendored with the tests (its README).
AUDIT_SCHEMA = Path(__file__).parent / "data" / "audit" / "audit-message.rng"


def audit_schema():
    """The audit message schema as lxml's Relax NG validator."""
    import lxml.etree  # a dev dependency: Relax NG validation

    return lxml.etree.RelaxNG(lxml.etree.parse(str(AUDIT_SCHEMA)))


def assert_audit_valid(schema, xml: bytes) -> None:
    """Fail, with the schema's complaint and the message, unless ``xml`` is a valid
    DICOM audit message."""
    import lxml.etree

    doc = lxml.etree.fromstring(xml)
    assert schema.validate(doc), f"{schema.error_log}\n{xml.decode()}"
