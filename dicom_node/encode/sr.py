"""Encode per-label volumes as a TID 1500 Measurement Report (Comprehensive 3D SR).

The SR is what a PACS or a reporting system can read without drawing anything: for each
segment of the SEG, a Volumetric ROI Measurements group (TID 1411) holding its volume in
millilitres, the segment it was measured on (by SEG SOP Instance UID and Segment Number),
the algorithm that produced it, and the CT series the segment was derived from (Source
Series for Segmentation; the SEG's frames name their images one by one).

Every label the model was asked for is reported, in the model's label order: one it did
not find has no segment to point at (the SEG leaves it out) and no volume to measure, so
it is a Measurement Group (TID 1501) with the same finding type, finding site and
algorithm, no region and no measurement, and a qualitative evaluation: Presence of
property (DCM 121052) Absent (SCT 272519000, CID 241), with a Comment "spleen: not found".
A 0 mL would read as a measurement of something found; absent is what the model said.
When no label is found at all, the SR so says of each, and the job ends "done" with the
reason "no finding" (:func:`dicom_node.jobs.runner.no_finding`).
A lateral structure's laterality is its Finding Site's laterality.

A viewer draws a measurement only where it has image coordinates: OHIF lists an SR whose
measurements carry none as "Measurements (0)". TID 1411 lets a volume's region be the SEG
segment or image regions, not both, and the segment is what defines the volume. So each
organ found also gets, first, a Measurement Group (TID 1501) for the same finding (the same
Tracking Unique Identifier, finding type, sites and algorithm): the area (TID 300) of its
outline on the CT image where its cross-section is largest, INFERRED FROM that outline, a
closed SCOORD POLYLINE, and a Comment "spleen: N mL" naming the organ with its volume.

That group is shaped as OHIF 3 (``@cornerstonejs/adapters``) reads a measurement into its
panel, which it does only for groups it can give to one of its tools: its Tracking Identifier
names the tool, ``Cornerstone3DTools@^0.1.0:PlanarFreehandROI`` (followed by the organ's
name), the adapter takes the first NUM of the group as the area and the SCOORD inside it as
the contour, and the panel's label is the group's Comment. OHIF merges a finding's groups by
tracking UID and takes the tool from the first one, hence the outline before the volume; it
then lists "spleen: N mL" with the area and jumps to that image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import highdicom as hd
import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import BaseTag, Tag
from pydicom.uid import generate_uid

from dicom_node.config import ResultSettings
from dicom_node.encode.codes import LATERALITY_CODES
from dicom_node.encode.labels import (
    MODEL_NAME,
    AlgorithmInfo,
    EncodeError,
    SegmentInfo,
    check_inputs,
    common_attributes,
    declare_encoding,
    device_serial_number,
    device_uid,
    encode_sequences,
    label_index,
    voxel_volume_ml,
)
from dicom_node.encode.registry import EncodeContext, series_number
from dicom_node.encode.rtstruct import trace_contours
from dicom_node.series.volume import SeriesVolume

#: UCUM millilitre.
MILLILITER = Code("mL", "UCUM", "milliliter")

#: UCUM square millimetre.
SQUARE_MILLIMETER = Code("mm2", "UCUM", "square millimeter")

#: The Tracking Identifier prefix under which OHIF 3's SR reader (``@cornerstonejs/adapters``
#: MeasurementReport) hands a group to its freehand contour tool; any suffix is allowed.
VIEWER_CONTOUR_TRACKING = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"
#: Graphic Data (0070,0022) of a SCOORD content item.
GRAPHIC_DATA = Tag(0x0070, 0x0022)

#: The qualitative evaluation of a label the model did not find (TID 1501): Presence of
#: property (DCM 121052), Absent (SCT 272519000, CID 241 "Present-Absent Only").
PRESENCE: Code = codes.DCM.PresenceOfProperty
ABSENT: Code = codes.SCT.Absent

#: Procedure Reported (TID 1500 row 4): the source is a CT of some body region.
CT_PROCEDURE: Code = codes.LN.CTUnspecifiedBodyRegion


def _check_seg(seg: Dataset, source: SeriesVolume, segments: Sequence[SegmentInfo]) -> None:
    """Raise unless ``seg`` is a SEG of ``source`` whose segment n is ``segments[n-1]``."""
    if str(seg.get("Modality", "")) != "SEG" or "SegmentSequence" not in seg:
        raise EncodeError("the object passed as SEG is not a Segmentation")
    if seg.StudyInstanceUID != source.first.StudyInstanceUID:
        raise EncodeError("the SEG belongs to another study than the source series")
    described = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    for number, info in enumerate(segments, start=1):
        if described.get(number) != info.name:
            raise EncodeError(
                f"segment {number} of the SEG is not {info.name!r}; build the SR from the "
                "SEG made for the same segments"
            )


def _finding_sites(info: SegmentInfo) -> list[hd.sr.FindingSite] | None:
    """Where the finding lies, with its laterality: the anatomic region of a finding (a
    left kidney cyst), or the lateral organ itself (left kidney)."""
    if info.anatomic_region is not None:
        laterality = info.anatomic_region_modifier
        if laterality is not None and laterality.value not in LATERALITY_CODES:
            laterality = None
        return [hd.sr.FindingSite(info.anatomic_region, laterality=laterality)]
    if info.laterality is not None:
        return [hd.sr.FindingSite(info.code, laterality=info.laterality)]
    return None


def _referenced_segment(seg: Dataset, number: int, source: SeriesVolume) -> hd.sr.ReferencedSegment:
    """The SEG segment, with the CT series it was derived from.

    TID 1411 names a segment's source either image by image or by its series; the series
    is one content item where the images are one per slice the segment lies on (5,000 for
    104 organs at 512x512x300, most of the document and of its encoding time). The SEG
    itself records, frame by frame, the image each frame was derived from.
    """
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(source.first.SeriesInstanceUID),
    )


def largest_outline(plane: np.ndarray) -> np.ndarray:
    """The outer outline of the largest region of a 2D mask, as SCOORD image coordinates.

    Returns (column, row) points of a closed polyline (the last point is the first),
    in the pixel coordinates of PS3.3 C.18.6.1.1: (0, 0) is the top left corner of the
    top left pixel, so a pixel's centre is at its indices plus one half. The outline runs
    through the half-way points between pixels inside and outside (marching squares, as
    the RTSTRUCT's contours: :func:`~dicom_node.encode.rtstruct.trace_contours`), the
    boundary a viewer draws around the mask, with a vertex where it turns.
    """
    polygons = trace_contours(np.asarray(plane, dtype=bool)[None])
    if not len(polygons):
        raise EncodeError("no outline: the slice holds none of the segment")
    # the largest by enclosed area: a hole is smaller than the outline around it
    rows_cols = polygons.vertices_of(int(np.argmax(polygons.areas())))
    closed = np.concatenate([rows_cols, rows_cols[:1]])
    return np.ascontiguousarray(closed[:, ::-1] + 0.5, dtype=np.float32)


def outline_area_mm2(outline: np.ndarray, source: SeriesVolume) -> float:
    """Area enclosed by a closed outline in image coordinates, in mm².

    The shoelace area in pixels times the area of one pixel, taken from the affine's
    in-plane axes (row and column steps) so that it holds for any orientation.
    """
    x, y = outline[:, 0].astype(float), outline[:, 1].astype(float)
    pixels = abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) / 2
    return pixels * float(np.linalg.norm(np.cross(source.affine[:3, 1], source.affine[:3, 2])))


def _float32_element(tag: BaseTag, values: np.ndarray) -> RawDataElement:
    """An FL element of ``values`` (flattened), as pydicom reads one from a file: its
    Little Endian bytes, decoded only if read."""
    data = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return RawDataElement(tag, "FL", len(data), data, 0, False, True)


def _outline_group(
    source: SeriesVolume,
    labels: np.ndarray,
    info: SegmentInfo,
    slices: np.ndarray,
    counts: np.ndarray,
    tracking_uid: str,
    volume_ml: float,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The finding as a viewer lists it (see the module): the area of the segment's outline
    on the slice where it covers the most pixels, on that CT image (and frame, for a
    multi-frame source), with a Comment naming the organ and its volume: OHIF labels the
    measurement with the Comment, else with the finding's code meaning, which for a name
    not in the table is only "Body structure"."""
    k = int(slices[int(np.argmax(counts))])
    # traced on the segment's box on that slice alone, then placed on the image: a box of
    # one slice costs a comparison of that slice, where the boxes of every label over the
    # whole map take one more pass over it (a fifth of a second at 512x512x300)
    plane = labels[k] == info.value
    present_rows, present_cols = (
        np.flatnonzero(plane.any(axis=1)),
        np.flatnonzero(plane.any(axis=0)),
    )
    rows = slice(int(present_rows[0]), int(present_rows[-1]) + 1)
    cols = slice(int(present_cols[0]), int(present_cols[-1]) + 1)
    if source.frame_numbers is not None:
        image = hd.sr.SourceImageForRegion(
            source.first.SOPClassUID, source.first.SOPInstanceUID, [source.frame_numbers[k]]
        )
    else:
        image = hd.sr.SourceImageForRegion(
            source.headers[k].SOPClassUID, source.headers[k].SOPInstanceUID
        )
    outline = largest_outline(plane[rows, cols])
    outline += np.array([cols.start, rows.start], dtype=outline.dtype)
    coordinates = hd.sr.CoordinatesForMeasurement(
        hd.sr.GraphicTypeValues.POLYLINE, outline[:2], image
    )
    # highdicom checked the outline's form on its first points; the whole outline goes in
    # as its bytes: pydicom converts a float list set on a data set value by value, a few
    # µs each, 40,000 of them for 104 organs (a fifth of the SR's encoding time).
    coordinates[GRAPHIC_DATA] = _float32_element(GRAPHIC_DATA, outline)
    area = hd.sr.Measurement(
        name=codes.SCT.Area,
        value=outline_area_mm2(outline, source),
        unit=SQUARE_MILLIMETER,
        referenced_coordinates=[coordinates],
        algorithm_id=algorithm_id,
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            identifier=f"{VIEWER_CONTOUR_TRACKING}:{info.name}", uid=tracking_uid
        ),
        finding_type=info.code,
        finding_category=info.category,
        finding_sites=_finding_sites(info),
        algorithm_id=algorithm_id,
        measurements=[area],
    )
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=f"{info.name}: {volume_ml:.2f} mL",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def _absent_group(
    info: SegmentInfo,
    tracking: hd.sr.TrackingIdentifier,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A label the model did not find: its finding, absent (see the module)."""
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=info.code,
        finding_category=info.category,
        finding_sites=_finding_sites(info),
        algorithm_id=algorithm_id,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(PRESENCE, ABSENT)],
    )
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=f"{info.name}: not found",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def build_sr(
    seg: Dataset,
    source: SeriesVolume,
    labels: np.ndarray,
    segments: Sequence[SegmentInfo],
    algorithm: AlgorithmInfo,
    settings: ResultSettings,
    series_number: int = 9003,
    predecessors: Sequence[Dataset] = (),
) -> Dataset:
    """Build a Comprehensive 3D SR Measurement Report of each segment's volume.

    ``seg`` is the SEG built by :func:`~dicom_node.encode.seg.build_seg` from the same
    ``labels`` and ``segments`` (its Segment Number n is the n-th segment that occurs in
    ``labels``). Every segment gets a group, in the order of ``segments``; each volume is
    the voxel count of the label times the voxel volume of the source grid, in mL, and a
    label that does not occur is absent, in a group without region or measurement (see
    the module). The
    observer is the node as a device; single-frame source images form the Image Library
    and, with the SEG, the evidence.

    Each segment found also gets, right before its volume, a Measurement Group with the
    area of its outline on its largest slice and a Comment with its volume (see the module).

    ``predecessors`` are results of an earlier run of the same series that a destination
    already holds and that this report supersedes (SEG, RTSTRUCT and SR; each needs its
    SOP Class, SOP Instance, Study and Series Instance UIDs): they are listed in the
    Predecessor Documents Sequence (0040,A360).

    Raises :class:`~dicom_node.encode.labels.EncodeError` when the inputs do not fit.
    """
    check_inputs(source, labels, segments)
    index = label_index(labels)  # one pass over the map, shared with the SEG and RTSTRUCT
    found = [info for info in segments if index.counts[:, int(info.value)].any()]
    _check_seg(seg, source, found or segments)
    numbers = {int(info.value): n for n, info in enumerate(found, start=1)}
    voxel_ml = voxel_volume_ml(source)
    algorithm_id = algorithm.sr_identification()

    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = []
    for info in segments:
        number = numbers.get(int(info.value))
        tracking_uid = generate_uid()
        tracking = hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=info.name)
        if number is None:
            groups.append(_absent_group(info, tracking, algorithm_id))
            continue
        per_slice = index.counts[:, int(info.value)]
        slices = np.flatnonzero(per_slice)
        counts = per_slice[slices]
        volume_ml = int(counts.sum()) * voxel_ml
        volume = hd.sr.Measurement(
            name=codes.SCT.Volume,
            value=volume_ml,
            unit=MILLILITER,
            algorithm_id=algorithm_id,
        )
        # The same finding (same tracking UID) where a viewer lists it, first (see the module).
        groups.append(
            _outline_group(
                source, labels, info, slices, counts, tracking_uid, volume_ml, algorithm_id
            )
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_segment=_referenced_segment(seg, number, source),
                finding_type=info.code,
                finding_category=info.category,
                finding_sites=_finding_sites(info),
                algorithm_id=algorithm_id,
                measurements=[volume],
            )
        )

    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(),
            name=MODEL_NAME,
            manufacturer_name=settings.manufacturer or MODEL_NAME,
            model_name=MODEL_NAME,
            serial_number=device_serial_number(),
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CT_PROCEDURE,
        imaging_measurements=groups,
        # No Image Library (optional in TID 1500): each segment already names the images it
        # lies on, and building a library entry per slice made the SR the slowest object to
        # encode (seconds for a few hundred slices, most of it highdicom copying the tree).
        referenced_images=None,
    )
    # The source comes first so that patient and study attributes are copied from it.
    return _document(
        report,
        evidence=[*source.headers, seg],
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        is_complete=True,
        previous_versions=list(predecessors) or None,
        series_description=settings.sr_series_description,
        **common_attributes(source, settings),
    )


def _document(report: hd.sr.MeasurementReport, **kwargs: Any) -> hd.sr.Comprehensive3DSR:
    """The Comprehensive 3D SR document of ``report``, by highdicom, without its copy.

    highdicom's constructor deep-copies the content tree it is given and reads the copy
    back into content items (its ``content`` property), then searches the original for
    the instances it references. For 104 organs that is thousands of content items copied
    and parsed again, seconds on two cores, for a tree just built by highdicom's own
    template classes. So the document is built around the report's root alone (its
    template, concept and observation context are all highdicom checks), and the root's
    content, unchanged, is then put in it. Nothing in the document differs: the evidence
    lists every instance given (all of the SR's study) whether referenced or not.
    """
    # pydicom's Sequence annotates its items as Dataset; a highdicom template's are ContentItems.
    root = cast(hd.sr.ContentItem, report[0])
    content = root.ContentSequence
    root.ContentSequence = hd.sr.ContentSequence(
        [item for item in content if item.RelationshipType != "CONTAINS"]
    )
    try:
        document = hd.sr.Comprehensive3DSR(content=report, **kwargs)
    finally:
        root.ContentSequence = content
    document.ContentSequence = content
    document._content = hd.sr.ContentSequence([root], is_root=True)
    return declare_encoding(encode_sequences(document))


class SrEncoder:
    """The TID 1500 SR: each label's volume, referencing the SEG's segments."""

    kind = "SR"
    requires: tuple[str, ...] = ("SEG",)
    #: Of the SEG, the SR reads its UIDs, SOP class, study and segments: the announcement.
    references: tuple[str, ...] = ("SEG",)
    first_series_number = 9003

    def enabled(self, settings: ResultSettings) -> bool:
        return settings.make_sr

    def build(self, context: EncodeContext, built: Mapping[str, Dataset]) -> Dataset:
        return build_sr(
            built["SEG"],
            context.source,
            context.labels,
            context.segments,
            context.algorithm,
            context.settings,
            series_number(self.kind, context.model_index),
            context.predecessors,
        )
