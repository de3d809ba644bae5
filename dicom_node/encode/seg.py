"""Encode a label map as a DICOM Segmentation (SEG) with highdicom.

The SEG is a new series in the source study and Frame of Reference. Each label the model
found becomes one segment with its coded property (type, laterality modifier, anatomic
region), colour and algorithm identification; each frame records, in its Derivation Image
Sequence, the CT image (and for an Enhanced CT source the frame) it was derived from, so a
viewer overlays it on exactly the slices it came from.

Labels the model did not find are left out (no empty segment); the SR lists them as
absent. A result in which no label was found at all cannot be a SEG without segments
(Segment Sequence is Type 1, and highdicom refuses one), so such a SEG describes every
label it looked for and holds only empty frames of the first slice (one per segment for
BINARY, one for a Label Map): a valid, small "nothing found" object, where highdicom by
itself would encode every empty frame of every slice.

Label Map SEGs may be compressed (``[results] seg_compression``): RLE Lossless or JPEG-LS
Lossless. A binary SEG stays uncompressed: highdicom encodes 1-bit frames only natively or
as JPEG 2000.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr_element
from pydicom.sr.coding import Code
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    SegmentationStorage,
    generate_uid,
)

from dicom_node.config import ResultSettings
from dicom_node.encode.labels import (
    AlgorithmInfo,
    EncodeError,
    SegmentInfo,
    check_inputs,
    common_attributes,
    declare_encoding,
    encode_sequences,
    present_segments,
    segment_numbers,
)
from dicom_node.encode.registry import EncodeContext, series_number
from dicom_node.series.volume import SeriesVolume

#: ``[results] seg_compression`` values and the transfer syntax each gives a Label Map SEG.
COMPRESSION_SYNTAXES: dict[str, UID] = {
    "none": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
}


#: Label Map Segmentation Storage (PS3.4 B.5, 2024): not among pydicom 3.0's UID names.
LABEL_MAP_SEGMENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.66.7")


def _with_modifier(item: Dataset, keyword: str, modifier: Code | None) -> None:
    """Nest a modifier code in a code sequence item (highdicom takes no modifier)."""
    if modifier is not None:
        setattr(
            item,
            keyword,
            [hd.sr.CodedConcept(modifier.value, modifier.scheme_designator, modifier.meaning)],
        )


def segment_descriptions(
    segments: Sequence[SegmentInfo], algorithm: AlgorithmInfo
) -> list[hd.seg.SegmentDescription]:
    """One Segment Sequence item per label; Segment Number n describes ``segments[n-1]``.

    The laterality of a lateral organ is a Segmented Property Type Modifier and where a
    finding lies an Anatomic Region (with its modifier), as in TotalSegmentator's table.
    """
    family = algorithm.seg_identification()
    out = []
    for number, seg in enumerate(segments, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=seg.name,
            segmented_property_category=seg.category,
            segmented_property_type=seg.code,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=family,
            tracking_uid=generate_uid(),
            tracking_id=seg.name,
            anatomic_regions=[seg.anatomic_region] if seg.anatomic_region else None,
            display_color=seg.display_color(),
        )
        _with_modifier(
            description.SegmentedPropertyTypeCodeSequence[0],
            "SegmentedPropertyTypeModifierCodeSequence",
            seg.modifier,
        )
        if seg.anatomic_region is not None:
            _with_modifier(
                description.AnatomicRegionSequence[0],
                "AnatomicRegionModifierSequence",
                seg.anatomic_region_modifier,
            )
        out.append(description)
    return out


def _frames_in_source_order(source: SeriesVolume, numbered: np.ndarray) -> np.ndarray:
    """Arrange the label map the way highdicom pairs frames with source images.

    For single-frame sources frame ``i`` pairs with ``source.headers[i]``, which is slice
    order already. For a multi-frame source frame ``i`` pairs with source frame ``i + 1``,
    so slices are put back at their frame numbers (frames outside the volume stay empty
    and are omitted).
    """
    if source.frame_numbers is None:
        return numbered
    frames = int(source.first.get("NumberOfFrames", 1))
    out = np.zeros((frames, *numbered.shape[1:]), dtype=numbered.dtype)
    for k, frame in enumerate(source.frame_numbers):
        out[frame - 1] = numbered[k]
    return out


def _one_empty_frame(
    source: SeriesVolume, labels: np.ndarray
) -> tuple[np.ndarray, Sequence[Dataset]]:
    """Pixels and source images for a SEG of a label map without any label.

    For a single-frame series, one empty frame derived from the first image. A multi-frame
    source keeps all its frames (highdicom pairs frames with the source's own), which
    the Enhanced CTs a scanner writes hold few enough of.
    """
    if source.frame_numbers is None:
        return np.zeros((1, *labels.shape[1:]), dtype=np.uint8), source.headers[:1]
    return _frames_in_source_order(source, labels), source.headers


def build_seg(
    source: SeriesVolume,
    labels: np.ndarray,
    segments: Sequence[SegmentInfo],
    algorithm: AlgorithmInfo,
    settings: ResultSettings,
    series_number: int = 9001,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.seg.Segmentation:
    """Build the SEG instance for ``labels`` drawn on ``source``.

    ``labels`` is (slices, rows, columns) uint8 on the source grid; each value described in
    ``segments`` that occurs in it becomes one segment, numbered 1.. in the order of
    ``segments`` (:func:`~dicom_node.encode.labels.present_segments`; the RTSTRUCT's ROI
    Numbers are the same). When no label occurs, every segment is described and the SEG
    holds only empty frames of the first slice (see the module's docstring).
    ``settings.seg_type`` picks Segmentation Storage with SegmentationType BINARY (frames
    only where a segment is present) or Label Map Segmentation Storage (one frame per slice
    that holds any label); ``settings.seg_compression`` the Label Map's transfer syntax.

    highdicom takes the source images' metadata only: the headers kept by
    :mod:`dicom_node.series.volume` (no Pixel Data, Rows/Columns intact) are passed as they are.
    The Series and SOP Instance UIDs are new ones unless given (as announced:
    :meth:`SegEncoder.announce`).

    Raises :class:`EncodeError` when the label map or segments do not fit the source.
    """
    check_inputs(source, labels, segments)
    if settings.seg_type not in ("binary", "labelmap"):
        raise EncodeError(f"SEG type {settings.seg_type!r} is neither 'binary' nor 'labelmap'")
    seg_type = (
        hd.seg.SegmentationTypeValues.LABELMAP
        if settings.seg_type == "labelmap"
        else hd.seg.SegmentationTypeValues.BINARY
    )
    compression = getattr(settings, "seg_compression", "none")
    if compression not in COMPRESSION_SYNTAXES:
        raise EncodeError(
            f"SEG compression {compression!r} is not one of {sorted(COMPRESSION_SYNTAXES)}"
        )
    syntax = (
        COMPRESSION_SYNTAXES[compression]
        if settings.seg_type == "labelmap"
        else (ExplicitVRLittleEndian)
    )
    found = present_segments(labels, segments)
    source_images: Sequence[Dataset] = source.headers
    nothing_found = not found
    if found:
        pixels = _frames_in_source_order(source, segment_numbers(labels, found))
    else:
        found = list(segments)
        pixels, source_images = _one_empty_frame(source, labels)
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=pixels,
        transfer_syntax_uid=syntax,
        segmentation_type=seg_type,
        segment_descriptions=segment_descriptions(found, algorithm),
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
        series_description=settings.seg_series_description,
        content_description=f"{algorithm.name} {algorithm.version}"[:64],
        content_label="SEGMENTATION",
        omit_empty_frames=not nothing_found,
        **common_attributes(source, settings),
    )
    # Its coded concepts (two in each frame's Derivation Image) are encoded once each (see
    # encode_sequences), and nothing is walked again when written (see declare_encoding):
    # the same bytes. Its only ambiguous VRs, Pixel Data's and Pixel Padding Value's, are
    # given first, as pydicom's writer would give them.
    encode_sequences(seg)
    for element in seg.elements():
        if element.VR and len(element.VR) != 2:
            correct_ambiguous_vr_element(element, seg, True)
    declare_encoding(seg)
    return seg


class SegEncoder:
    """The SEG: binary or label map as ``[results] seg_type`` says."""

    kind = "SEG"
    requires: tuple[str, ...] = ()
    first_series_number = 9001

    def enabled(self, settings: ResultSettings) -> bool:
        return settings.make_seg

    def announce(self, context: EncodeContext) -> Dataset:
        """What the SR reads of the SEG (its UIDs, SOP class and segments), before it is
        built: the segments are those :func:`build_seg` numbers, every one where none
        occurs."""
        check_inputs(context.source, context.labels, context.segments)
        header = Dataset()
        header.Modality = "SEG"
        header.SOPClassUID = (
            LABEL_MAP_SEGMENTATION_STORAGE
            if context.settings.seg_type == "labelmap"
            else SegmentationStorage
        )
        header.StudyInstanceUID = context.source.first.StudyInstanceUID
        header.SeriesInstanceUID = generate_uid()
        header.SOPInstanceUID = generate_uid()
        header.SegmentSequence = []
        found = present_segments(context.labels, context.segments) or context.segments
        for number, info in enumerate(found, start=1):
            item = Dataset()
            item.SegmentNumber = number
            item.SegmentLabel = info.name
            header.SegmentSequence.append(item)
        return header

    def build(self, context: EncodeContext, built: Mapping[str, Dataset]) -> Dataset:
        header = context.announced.get(self.kind)
        return build_seg(
            context.source,
            context.labels,
            context.segments,
            context.algorithm,
            context.settings,
            series_number(self.kind, context.model_index),
            series_instance_uid=header.SeriesInstanceUID if header is not None else None,
            sop_instance_uid=header.SOPInstanceUID if header is not None else None,
        )
