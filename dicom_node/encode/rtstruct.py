"""Encode a label map as an RT Structure Set (RTSTRUCT) of closed planar contours.

Radiotherapy planning systems read contours, not SEG. No maintained library writes an
RTSTRUCT from a label map without pulling in OpenCV (rt-utils, whose pixel-centre contours
also shrink every structure by half a pixel), so the module is written here: highdicom's
:class:`~highdicom.SOPClass` provides the Patient, Study, Series, Equipment and SOP Common
modules exactly as it does for the SEG, scikit-image's marching squares traces the
outlines, and this module adds the Structure Set, ROI Contour and RT ROI Observations
modules with pydicom.

Contour geometry
----------------
Each slice of each label is traced with :func:`skimage.measure.find_contours` at level 0.5
on the binary mask. Every vertex then lies on a pixel boundary, half way between the
centre of a pixel inside the label and one outside, so a polygon never passes through a
pixel centre and filling it by the usual "pixel centre inside" rule gives back the mask
exactly, one-pixel-thin shapes included. Vertices on straight runs are dropped; they add
no information.

Islands and holes: every connected part (4-connected) of a label on a slice is its own
contour, and so is the boundary of every hole. Outer boundaries wind counter-clockwise and
hole boundaries clockwise in (row, column) space; the contours of one ROI on one plane are
meant to be combined with the even-odd (XOR) rule, which planning systems apply to nested
contours. No "keyhole" cuts are made.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.charset import default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid
from scipy.ndimage import find_objects
from skimage.measure import find_contours

from dicom_node.config import ResultSettings
from dicom_node.encode.labels import (
    AlgorithmInfo,
    SegmentInfo,
    check_inputs,
    common_attributes,
    present_segments,
)
from dicom_node.encode.registry import EncodeContext, series_number
from dicom_node.series.volume import SeriesVolume

log = logging.getLogger(__name__)

#: Referenced SOP Class UID for a study in RT Referenced Study Sequence items: the
#: (retired) Detached Study Management SOP Class, which the RT modules still name.
_STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed polygons, as (n, 2) float arrays of (row, column), outlining a 2D mask.

    One polygon per 4-connected island and one per hole; vertices lie on pixel
    boundaries and the closing vertex is not repeated (CLOSED_PLANAR closes implicitly).
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(mask.any(axis=0))
    r0, c0 = int(rows[0]), int(cols[0])
    # Trace only the bounding box, padded with background so that shapes touching the
    # image edge still get closed contours.
    crop = np.pad(mask[r0 : rows[-1] + 1, c0 : cols[-1] + 1], 1).astype(np.float32)
    polygons = []
    for contour in find_contours(crop, 0.5, fully_connected="low", positive_orientation="high"):
        points = _drop_collinear(contour[:-1])
        polygons.append(points + (r0 - 1, c0 - 1))
    return polygons


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    before = points - np.roll(points, 1, axis=0)
    after = np.roll(points, -1, axis=0) - points
    turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    return points[np.abs(turn) > 1e-9]


def _image_reference(source: SeriesVolume, k: int) -> Dataset:
    """Contour Image Sequence item for slice ``k`` (with its frame for multi-frame CT)."""
    item = Dataset()
    header = source.headers[0] if source.frame_numbers is not None else source.headers[k]
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = source.source_uids[k]
    if source.frame_numbers is not None:
        item.ReferencedFrameNumber = source.frame_numbers[k]
    return item


def _contour_data(points_lps: np.ndarray) -> list[str]:
    """Decimal strings of the coordinates, 0.1 µm resolution, without trailing zeros.

    Fixed-point keeps every value within the 16 bytes of a DS; vertices lie on half-pixel
    boundaries, so most need far fewer than four decimals, and ContourData is most of an
    RTSTRUCT's bytes: "12.4" rather than "12.4000" makes the object about a fifth smaller
    with the same geometry.
    """
    out = []
    for v in np.round(points_lps.ravel(), 4).tolist():
        text = f"{v:.4f}".rstrip("0").rstrip(".")
        out.append("0" if text == "-0" else text)
    return out


_CONTOUR_DATA = Tag(0x3006, 0x0050)


def _contour_data_element(points_lps: np.ndarray) -> RawDataElement:
    """Contour Data as the bytes it is written as, with the item's encoding declared.

    ContourData is nearly all of an RTSTRUCT, and pydicom turns every value assigned to a
    DS element into a validated ``DSfloat`` object (about 10 µs each): a 104-organ result
    at 512x512x300 holds over a million of them, which took most of its encode time.
    The values are already valid DS text (:func:`_contour_data`), so they are handed to
    pydicom as a raw element, the documented way to write values without decoding them
    (:meth:`~pydicom.dataset.Dataset.set_original_encoding` on the item); reading the
    element back still decodes it as usual.
    """
    value = "\\".join(_contour_data(points_lps)).encode("ascii")
    if len(value) % 2:
        value += b" "  # values have even length; DS pads with a space
    return RawDataElement(_CONTOUR_DATA, "DS", len(value), value, 0, False, True)


def _slice_origins(source: SeriesVolume) -> np.ndarray:
    """Image Position (Patient) of every slice, as the source images state it.

    In-plane directions come from the volume's affine, but each slice's own position is
    taken from its header: the assembled volume tolerates slice spacing that varies a
    little, and a contour must lie in the plane of the image it references, not in the
    plane a perfectly regular grid would put there.
    """
    if source.frame_numbers is None:
        positions = [h.get("ImagePositionPatient") for h in source.headers]
    else:
        frames = source.first.get("PerFrameFunctionalGroupsSequence", [])
        positions = []
        for n in source.frame_numbers:
            plane = frames[n - 1].get("PlanePositionSequence") if len(frames) >= n else None
            positions.append(plane[0].get("ImagePositionPatient") if plane else None)
    origins = np.array(
        [source.affine @ np.array([k, 0.0, 0.0, 1.0]) for k in range(len(positions))]
    )[:, :3]
    for k, position in enumerate(positions):
        if position is not None and len(position) == 3:
            origins[k] = [float(v) for v in position]
    return origins


def polygon_area(polygon: np.ndarray) -> float:
    """Area enclosed by a closed polygon of (row, column) vertices, in pixels (shoelace)."""
    rows, cols = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(rows, np.roll(cols, 1)) - np.dot(cols, np.roll(rows, 1))))


def select_contours(
    polygons: list[np.ndarray], pixel_mm2: float, min_area_mm2: float, max_contours: int
) -> tuple[list[np.ndarray], int, float]:
    """The contours of one ROI on one slice worth writing, largest first.

    Drops contours enclosing less than ``min_area_mm2``, then keeps the ``max_contours``
    largest (0: all). Ranking by enclosed area keeps nesting intact: a hole is smaller
    than the outline around it, so an outline is never dropped while its hole is kept.
    Returns the kept contours, how many were dropped and the area they enclosed (mm²).
    """
    areas = np.array([polygon_area(p) * pixel_mm2 for p in polygons])
    order = [int(i) for i in np.argsort(-areas, kind="stable") if areas[i] >= min_area_mm2]
    if max_contours:
        order = order[:max_contours]
    kept = set(order)
    dropped = [i for i in range(len(polygons)) if i not in kept]
    return [polygons[i] for i in sorted(kept)], len(dropped), float(areas[dropped].sum())


def _roi_contours(
    source: SeriesVolume,
    labels: np.ndarray,
    seg: SegmentInfo,
    origins: np.ndarray,
    first_number: int,
    settings: ResultSettings,
    box: tuple[slice, ...] | None,
) -> list[Dataset]:
    """Contour Sequence items of one label value, slice by slice, in patient LPS mm.

    ``box`` is the label's bounding box in ``labels`` (``scipy.ndimage.find_objects``),
    None where it does not occur.
    """
    value = int(seg.value)
    in_plane = source.affine[:3, 1:3]  # mm per row step and per column step
    pixel_mm2 = float(np.linalg.norm(np.cross(in_plane[:, 0], in_plane[:, 1])))
    min_area = float(getattr(settings, "rtstruct_min_contour_area_mm2", 0.0))
    cap = int(getattr(settings, "rtstruct_max_contours_per_slice", 0))
    items = []
    dropped, dropped_mm2, total = 0, 0.0, 0
    if box is None:
        return items
    # Only the label's bounding box is searched: comparing every slice of a 512x512x300
    # map with each of 104 values would read the whole map 104 times.
    z0, r0, c0 = (int(s.start) for s in box)
    region = labels[box]
    for dk in range(region.shape[0]):
        mask = region[dk] == value
        if not mask.any():
            continue
        k = z0 + dk
        polygons = slice_contours(mask)
        total += len(polygons)
        if min_area > 0 or (cap and len(polygons) > cap):
            polygons, n, area = select_contours(polygons, pixel_mm2, min_area, cap)
            dropped, dropped_mm2 = dropped + n, dropped_mm2 + area
        for polygon in polygons:
            lps = origins[k] + (polygon + (r0, c0)) @ in_plane.T
            item = Dataset()
            item.ContourNumber = first_number + len(items)
            item.ContourImageSequence = DicomSequence([_image_reference(source, int(k))])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(polygon)
            item[_CONTOUR_DATA] = _contour_data_element(lps)
            # explicit VR little endian, and the text encoding a new item inherits: the
            # writer then copies the raw value (were either to differ, it would decode it)
            item.set_original_encoding(False, True, default_encoding)
            items.append(item)
    if dropped:
        log.warning(
            "RTSTRUCT ROI %r: %d of %d contours left out (%.1f mm² in all; fewer than %.1f mm² "
            "or beyond %d per slice): the label map is fragmented",
            seg.name,
            dropped,
            total,
            dropped_mm2,
            min_area,
            cap,
        )
    return items


def _referenced_frame_of_reference(source: SeriesVolume) -> Dataset:
    first = source.first
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = DicomSequence(
        [_image_reference(source, k) for k in range(len(source.source_uids))]
    )
    study = Dataset()
    study.ReferencedSOPClassUID = _STUDY_SOP_CLASS
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = DicomSequence([study])
    return frame


def _code_item(code: Code, modifier: Code | None = None) -> Dataset:
    """A code sequence item, with the laterality (or other) type modifier nested in it."""
    item = hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)
    if modifier is not None:
        item.SegmentedPropertyTypeModifierCodeSequence = [_code_item(modifier)]
    return item


def build_rtstruct(
    source: SeriesVolume,
    labels: np.ndarray,
    segments: Sequence[SegmentInfo],
    algorithm: AlgorithmInfo,
    settings: ResultSettings,
    series_number: int = 9002,
) -> Dataset:
    """Build the RT Structure Set for ``labels`` drawn on ``source``.

    One ROI per segment that occurs in ``labels`` (ROI Number = its position among those,
    as the SEG's Segment Number), generated AUTOMATIC by ``algorithm``, interpreted as
    ``segment.rt_roi_type`` and identified by its SNOMED code (with its laterality
    modifier); CLOSED_PLANAR contours in LPS mm on every slice the label touches, each
    referencing the image (and frame) it lies on. A segment absent from the label map has
    no ROI. When no label occurs at all, every segment is an ROI without contours: a
    Structure Set needs at least one ROI, and this says what was looked for.

    Raises :class:`~dicom_node.encode.labels.EncodeError` when the inputs do not fit.
    """
    check_inputs(source, labels, segments)
    first = source.first
    now = datetime.datetime.now()
    ds = hd.SOPClass(
        study_instance_uid=first.StudyInstanceUID,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        sop_class_uid=RTStructureSetStorage,
        instance_number=1,
        modality="RTSTRUCT",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        patient_id=first.get("PatientID"),
        patient_name=first.get("PatientName"),
        patient_birth_date=first.get("PatientBirthDate"),
        patient_sex=first.get("PatientSex"),
        accession_number=first.get("AccessionNumber"),
        study_id=first.get("StudyID"),
        study_date=first.get("StudyDate"),
        study_time=first.get("StudyTime"),
        referring_physician_name=first.get("ReferringPhysicianName"),
        series_description=settings.rtstruct_series_description,
        series_date=now.date(),
        series_time=now.time(),
        **common_attributes(source, settings),
    )
    ds.copy_patient_and_study_information(first)
    ds.OperatorsName = ""
    # Frame of Reference module: the contours are in the source's patient coordinates.
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")

    # Structure Set module
    ds.StructureSetLabel = (settings.rtstruct_series_description or "AI contours")[:16]
    ds.StructureSetName = f"{algorithm.name} {algorithm.version}"[:64]
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_referenced_frame_of_reference(source)])

    origins = _slice_origins(source)
    boxes = find_objects(labels)  # one pass over the map: each value's bounding box
    rois, contours, observations = [], [], []
    next_contour = 1
    for number, seg in enumerate(present_segments(labels, segments) or segments, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = first.FrameOfReferenceUID
        roi.ROIName = seg.name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = algorithm.description()
        roi.ROIDerivationAlgorithmIdentificationSequence = algorithm.seg_identification()
        rois.append(roi)

        contour = Dataset()
        contour.ROIDisplayColor = [int(c) for c in seg.color_rgb]
        value = int(seg.value)
        box = boxes[value - 1] if value <= len(boxes) else None
        items = _roi_contours(source, labels, seg, origins, next_contour, settings, box)
        next_contour += len(items)
        if items:
            contour.ContourSequence = DicomSequence(items)
        contour.ReferencedROINumber = number
        contours.append(contour)

        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.ROIObservationLabel = seg.name[:16]
        observation.RTROIIdentificationCodeSequence = DicomSequence(
            [_code_item(seg.code, seg.modifier)]
        )
        observation.RTROIInterpretedType = seg.rt_roi_type
        observation.ROIInterpreter = ""
        observations.append(observation)

    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    return ds


class RtstructEncoder:
    """The RT Structure Set: one ROI of planar contours per label found."""

    kind = "RTSTRUCT"
    requires: tuple[str, ...] = ()
    first_series_number = 9002

    def enabled(self, settings: ResultSettings) -> bool:
        return settings.make_rtstruct

    def build(self, context: EncodeContext, built: Mapping[str, Dataset]) -> Dataset:
        return build_rtstruct(
            context.source,
            context.labels,
            context.segments,
            context.algorithm,
            context.settings,
            series_number(self.kind, context.model_index),
        )
