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
Each slice of each label is traced by marching squares at level 0.5 on the binary mask,
the polygons :func:`skimage.measure.find_contours` gives (``fully_connected="low"``,
``positive_orientation="high"``; tested identical). Every vertex lies on a pixel boundary,
half way between the centre of a pixel inside the label and one outside, so a polygon
never passes through a pixel centre and filling it by the usual "pixel centre inside" rule
gives back the mask exactly, one-pixel-thin shapes included. Vertices on straight runs are
dropped; they add no information.

All slices of a label are traced at once (:func:`trace_contours`): every boundary cell's
segments in one array, chained into polygons by array operations. ``find_contours``
chains its segments in Python, one slice at a time, which for 104 organs at 512x512x300
(5,000 slice outlines, 1.4 million vertices) takes seconds.

Islands and holes: every connected part (4-connected) of a label on a slice is its own
contour, and so is the boundary of every hole. Outer boundaries wind counter-clockwise and
hole boundaries clockwise in (row, column) space; the contours of one ROI on one plane are
meant to be combined with the even-odd (XOR) rule, which planning systems apply to nested
contours. No "keyhole" cuts are made.
"""

from __future__ import annotations

import datetime
import functools
import logging
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.charset import default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from dicom_node.config import ResultSettings
from dicom_node.encode.labels import (
    AlgorithmInfo,
    SegmentInfo,
    check_inputs,
    common_attributes,
    declare_encoding,
    label_index,
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
    polygons = trace_contours(np.asarray(mask, dtype=bool)[None])
    return [polygons.vertices_of(i) for i in range(len(polygons))]


@dataclass(frozen=True)
class Polygons:
    """Closed planar polygons of a stack of masks: polygon ``i`` lies on slice
    ``slices[i]`` and its (row, column) vertices are ``vertices[offsets[i]:offsets[i+1]]``,
    counter-clockwise around the mask, clockwise around a hole."""

    slices: np.ndarray
    offsets: np.ndarray
    vertices: np.ndarray

    def __len__(self) -> int:
        return len(self.slices)

    def vertices_of(self, i: int) -> np.ndarray:
        return self.vertices[self.offsets[i] : self.offsets[i + 1]]

    def areas(self) -> np.ndarray:
        """Area each polygon encloses, in pixels (shoelace)."""
        if not len(self):
            return np.zeros(0)
        rows, cols = self.vertices[:, 0], self.vertices[:, 1]
        following = _following(self.offsets)
        twice = rows * cols[following] - cols * rows[following]
        return 0.5 * np.abs(np.add.reduceat(twice, self.offsets[:-1]))

    def subset(self, keep: np.ndarray) -> Polygons:
        """The polygons where ``keep`` is true, in their order."""
        counts = np.diff(self.offsets)[keep]
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        vertex_keep = np.repeat(keep, np.diff(self.offsets))
        return Polygons(self.slices[keep], offsets, self.vertices[vertex_keep])


# Marching squares on the cell whose corners are the pixels a = (r, c), b = (r, c + 1),
# c = (r + 1, c), d = (r + 1, c + 1): where its boundary crosses the cell's edges (top,
# bottom, left, right), as (row, column) offsets of the edge's midpoint.
_TOP, _BOTTOM, _LEFT, _RIGHT = 0, 1, 2, 3
_EDGE_MIDPOINT = {_TOP: (0.0, 0.5), _BOTTOM: (1.0, 0.5), _LEFT: (0.5, 0.0), _RIGHT: (0.5, 1.0)}
#: An edge's crossing as a point of the pixel grid: the pixel it starts from (row and
#: column offset from the cell's) and whether it lies between two columns (0) or two rows.
_EDGE_ROW, _EDGE_COL, _EDGE_KIND = (np.array(v) for v in ((0, 1, 0, 0), (0, 0, 0, 1), (0, 0, 1, 1)))
_CORNER = ((0, 0), (0, 1), (1, 0), (1, 1))


def _segment_table() -> tuple[np.ndarray, np.ndarray]:
    """For each of the 16 cells (bit k set: corner k inside), its one or two directed
    boundary segments (from edge, to edge), the inside on their left as one walks them in
    (column, row) axes: what ``find_contours`` gives with ``positive_orientation="high"``.
    The two saddles keep their inside corners apart (``fully_connected="low"``): islands
    are 4-connected."""
    table = np.full((16, 2, 2), -1, dtype=np.int64)
    count = np.zeros(16, dtype=np.int64)
    sides = ((_TOP, (0, 1)), (_BOTTOM, (2, 3)), (_LEFT, (0, 2)), (_RIGHT, (1, 3)))
    for cell in range(1, 15):
        inside = [(cell >> k) & 1 for k in range(4)]
        segments: list[tuple[tuple[int, ...], int]]
        if cell == 0b1001:  # a and d inside, apart
            segments = [((_LEFT, _TOP), 0), ((_RIGHT, _BOTTOM), 3)]
        elif cell == 0b0110:  # b and c inside, apart
            segments = [((_TOP, _RIGHT), 1), ((_BOTTOM, _LEFT), 2)]
        else:
            crossed = tuple(e for e, (p, q) in sides if inside[p] != inside[q])
            segments = [(crossed, inside.index(1))]
        count[cell] = len(segments)
        for n, ((e0, e1), corner) in enumerate(segments):
            start, end = np.array(_EDGE_MIDPOINT[e0]), np.array(_EDGE_MIDPOINT[e1])
            direction, to_corner = end - start, np.array(_CORNER[corner]) - start
            clockwise = direction[1] * to_corner[0] - direction[0] * to_corner[1] > 0
            table[cell, n] = (e1, e0) if clockwise else (e0, e1)
    return table, count


_SEGMENTS, _SEGMENT_COUNT = _segment_table()


def trace_contours(mask: np.ndarray) -> Polygons:
    """The outline polygons of every slice of a (slices, rows, columns) boolean mask.

    Marching squares as :func:`skimage.measure.find_contours` does it at level 0.5
    (``fully_connected="low"``, ``positive_orientation="high"``), on every slice at once:
    each boundary cell gives one or two directed segments between midpoints of pixel
    edges; each midpoint starts exactly one segment, so following them is a permutation
    whose cycles are the polygons. The cycles are found by ``connected_components`` and
    ordered by pointer jumping (list ranking), all in arrays. Polygons come slice by
    slice, each starting at its first point in raster order; vertices on straight runs
    are dropped.
    """
    slices, height, width = mask.shape
    padded = np.zeros((slices, height + 2, width + 2), dtype=np.uint8)
    padded[:, 1:-1, 1:-1] = mask
    pairs = padded[:, :, :-1] | (padded[:, :, 1:] << 1)  # corners a, b of each row's cells
    del padded
    cells = (pairs[:, :-1] | (pairs[:, 1:] << 2)).reshape(-1)  # and c, d below them
    del pairs
    # Boundary cells: neither all outside (0) nor all inside (15); 0 - 1 wraps to 255.
    where = np.flatnonzero((cells - np.uint8(1)) < 14)
    cells = cells[where]
    r, c = np.divmod(where, width + 1)
    z, r = np.divmod(r, height + 1)
    rows, cols = height + 2, width + 2

    def point(zz: np.ndarray, edge: np.ndarray, rr: np.ndarray, cc: np.ndarray) -> np.ndarray:
        y, x = rr + _EDGE_ROW[edge], cc + _EDGE_COL[edge]
        return ((zz * rows + y) * cols + x) * 2 + _EDGE_KIND[edge]

    starts, ends = [], []
    for n in (0, 1):
        has = _SEGMENT_COUNT[cells] > n
        zz, rr, cc, kind = z[has], r[has], c[has], cells[has]
        starts.append(point(zz, _SEGMENTS[kind, n, 0], rr, cc))
        ends.append(point(zz, _SEGMENTS[kind, n, 1], rr, cc))
    start = np.concatenate(starts)
    order = np.argsort(start)  # the starts are distinct: any sort gives this order
    start, end = start[order], np.concatenate(ends)[order]
    count = len(start)
    if count == 0:
        return Polygons(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros((0, 2)))
    following = np.searchsorted(start, end)  # the segment that starts where each ends
    graph = csr_matrix(
        (np.ones(count, dtype=np.int8), (np.arange(count), following)), shape=(count, count)
    )
    _, cycle = connected_components(graph, directed=True, connection="weak")
    # Cycles are numbered in the order of their first segment: each one's first segment
    # is where its number first appears, and the chain is cut before it.
    new = np.empty(count, dtype=bool)
    new[0] = True
    new[1:] = cycle[1:] > np.maximum.accumulate(cycle)[:-1]
    first = np.flatnonzero(new)[cycle]
    index = np.arange(count)
    link = np.where(following == first, index, following)
    to_end = (link != index).astype(np.int64)  # segments from each to its cycle's last
    while True:
        further = link[link]
        if np.array_equal(further, link):
            break
        to_end += to_end[link]
        link = further
    lengths = np.bincount(cycle)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    points = np.empty(count, dtype=np.int64)
    points[offsets[cycle] + lengths[cycle] - 1 - to_end] = start
    kind, pixel = points & 1, points >> 1
    x, y, zs = pixel % cols, (pixel // cols) % rows, pixel // (cols * rows)
    vertices = np.stack([y + 0.5 * kind - 1.0, x + 0.5 * (1 - kind) - 1.0], axis=1)
    return _without_straight_runs(Polygons(zs[offsets[:-1]], offsets, vertices))


def _following(offsets: np.ndarray) -> np.ndarray:
    """Index of each vertex's successor in its own polygon (the last one's: the first)."""
    following = np.arange(1, offsets[-1] + 1)
    following[offsets[1:] - 1] = offsets[:-1]
    return following


def _without_straight_runs(polygons: Polygons) -> Polygons:
    """The polygons without the vertices where they do not turn."""
    vertices, offsets = polygons.vertices, polygons.offsets
    following = _following(offsets)
    preceding = np.empty_like(following)
    preceding[following] = np.arange(len(following))
    before = vertices - vertices[preceding]
    after = vertices[following] - vertices
    turns = np.abs(before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) > 1e-9
    counts = np.add.reduceat(turns.astype(np.int64), offsets[:-1])
    kept = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=kept[1:])
    return Polygons(polygons.slices, kept, vertices[turns])


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
    return _decimal_text(points_lps).split("\\")


def _decimal_text(values: np.ndarray) -> str:
    """``values`` as backslash-separated DS text (see :func:`_contour_data`)."""
    return _decimal_values(values)[0]


def _decimal_values(values: np.ndarray) -> tuple[str, np.ndarray]:
    """``values`` as backslash-separated DS text: Python's shortest repr of each value
    rounded to four decimals, ``12`` for ``12.0`` and ``0`` for ``-0.0``; and where each
    value's text ends (the index after its last character). Each distinct value is
    formatted once: contours lie on half-pixel boundaries, so a million coordinates hold a
    few thousand values."""
    rounded = np.round(np.asarray(values, dtype=float).ravel(), 4)
    distinct, index = np.unique(rounded, return_inverse=True)
    texts = [repr(v) for v in distinct.tolist()]
    texts = ["0" if t in ("0.0", "-0.0") else t.removesuffix(".0") for t in texts]
    text = "\\".join(map(texts.__getitem__, index.tolist()))
    lengths = np.array([len(t) for t in texts], dtype=np.int64)[index] + 1  # and a backslash
    return text, np.cumsum(lengths) - 1


_CONTOUR_DATA = Tag(0x3006, 0x0050)


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


def selected_contours(
    slices: np.ndarray, areas_mm2: np.ndarray, min_area_mm2: float, max_contours: int
) -> np.ndarray:
    """Which contours of one ROI to write: on each slice, those enclosing at least
    ``min_area_mm2``, the ``max_contours`` largest of them (0: all).

    Ranking by enclosed area keeps nesting intact: a hole is smaller than the outline
    around it, so an outline is never dropped while its hole is kept.
    """
    keep = areas_mm2 >= min_area_mm2
    if max_contours and len(slices):
        # rank within each slice, largest first (ties: the first traced)
        order = np.lexsort((np.arange(len(slices)), -areas_mm2, slices))
        order = order[keep[order]]
        ordered = slices[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        keep = np.zeros_like(keep)
        keep[order[rank < max_contours]] = True
    return keep


#: Tags of a Contour Sequence item's attributes, and of the sequences holding them.
_CONTOUR_SEQUENCE, _CONTOUR_IMAGES = 0x30060040, 0x30060016
_GEOMETRIC_TYPE, _POINTS, _CONTOUR_NUMBER = 0x30060042, 0x30060046, 0x30060048
_ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, 0)[:4]


def _encoded(tag: int, vr: str, value: bytes) -> bytes:
    """One data element in Explicit VR Little Endian (PS3.5 7.1.2): a value too long for a
    16-bit length is written as UN (PS3.5 6.2.2), as pydicom writes it."""
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    if vr in ("SQ", "UN") or len(value) > 0xFFFF:
        vr = "SQ" if vr == "SQ" else "UN"
        head = struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr.encode(), len(value))
    else:
        head = struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(value))
    return head + value


def _item(content: bytes) -> bytes:
    """A sequence item of defined length."""
    return _ITEM + struct.pack("<I", len(content)) + content


def _dataset_bytes(ds: Dataset) -> bytes:
    """``ds`` encoded by pydicom in Explicit VR Little Endian."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _roi_contours(
    source: SeriesVolume,
    labels: np.ndarray,
    seg: SegmentInfo,
    origins: np.ndarray,
    first_number: int,
    settings: ResultSettings,
    box: tuple[slice, ...] | None,
    images: Callable[[int], bytes],
) -> tuple[RawDataElement | None, int]:
    """The Contour Sequence of one label value, slice by slice, in patient LPS mm, and how
    many contours it holds.

    ``box`` is the label's bounding box in ``labels`` (``scipy.ndimage.find_objects``),
    None where it does not occur; only it is traced. ``images(k)`` is slice ``k``'s
    Contour Image Sequence, encoded.

    The sequence is handed to pydicom encoded (a raw element, as Contour Data was before
    it): an organ at 512x512x300 has some 50 contours and 104 organs 5,000, each five
    attributes; pydicom builds, validates and writes each of those 25,000 elements (and
    the Contour Image item of each contour) one by one, over a second of the RTSTRUCT's
    encoding. Here each contour is a few bytes packed around its Contour Data text, and
    each slice's image reference is encoded once, by pydicom. Reading the sequence back
    (pydicom, highdicom, any toolkit) decodes it as any other.
    """
    if box is None:
        return None, 0
    value = int(seg.value)
    in_plane = source.affine[:3, 1:3]  # mm per row step and per column step
    pixel_mm2 = float(np.linalg.norm(np.cross(in_plane[:, 0], in_plane[:, 1])))
    min_area = float(getattr(settings, "rtstruct_min_contour_area_mm2", 0.0))
    cap = int(getattr(settings, "rtstruct_max_contours_per_slice", 0))
    z0, r0, c0 = (int(s.start) for s in box)
    polygons = trace_contours(labels[box] == value)
    areas = polygons.areas() * pixel_mm2
    keep = selected_contours(polygons.slices, areas, min_area, cap)
    if not keep.all():
        log.warning(
            "RTSTRUCT ROI %r: %d of %d contours left out (%.1f mm² in all; fewer than %.1f mm² "
            "or beyond %d per slice): the label map is fragmented",
            seg.name,
            int((~keep).sum()),
            len(keep),
            float(areas[~keep].sum()),
            min_area,
            cap,
        )
        polygons = polygons.subset(keep)
    if not len(polygons):
        return None, 0
    slices = polygons.slices + z0
    counts = np.diff(polygons.offsets)
    lps = origins[np.repeat(slices, counts)] + (polygons.vertices + (r0, c0)) @ in_plane.T
    text, ends = _decimal_values(lps)
    data = text.encode("ascii")
    # Contour i's text: from the end of the value before its first (and the backslash
    # after it) to the end of its last value.
    bounds = np.concatenate([[-1], ends[3 * polygons.offsets[1:] - 1]]).tolist()
    closed = _encoded(_GEOMETRIC_TYPE, "CS", b"CLOSED_PLANAR")
    items = []
    for i, (k, n) in enumerate(zip(slices.tolist(), counts.tolist(), strict=True)):
        items.append(
            _item(
                images(k)
                + closed
                + _encoded(_POINTS, "IS", str(n).encode())
                + _encoded(_CONTOUR_NUMBER, "IS", str(first_number + i).encode())
                + _encoded(_CONTOUR_DATA, "DS", data[bounds[i] + 1 : bounds[i + 1]])
            )
        )
    value_bytes = b"".join(items)
    element = RawDataElement(
        Tag(_CONTOUR_SEQUENCE), "SQ", len(value_bytes), value_bytes, 0, False, True
    )
    return element, len(items)


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

    # Each slice's Contour Image Sequence, encoded once for all the contours on it.
    @functools.cache
    def images(k: int) -> bytes:
        reference = _item(_dataset_bytes(_image_reference(source, k)))
        return _encoded(_CONTOUR_IMAGES, "SQ", reference)

    origins = _slice_origins(source)
    index = label_index(labels)  # one pass over the map: where each value lies
    rois, contours, observations = [], [], []
    next_contour = 1
    found = [s for s in segments if index.counts[:, int(s.value)].any()]
    for number, seg in enumerate(found or segments, start=1):
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
        box = index.box(seg.value)
        element, count = _roi_contours(
            source, labels, seg, origins, next_contour, settings, box, images
        )
        next_contour += count
        if element is not None:
            contour[_CONTOUR_SEQUENCE] = element
            # written as it is: explicit VR little endian, the default text encoding
            contour.set_original_encoding(False, True, default_encoding)
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
    # The encoding the object is written in (its transfer syntax, its character set): the
    # encoded Contour Sequences are then written as they are, not decoded on the way out.
    return declare_encoding(ds)


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
