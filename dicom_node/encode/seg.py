"""Encode a label map as a DICOM Segmentation (SEG) with highdicom.

The SEG is a new series in the source study and Frame of Reference. Each label becomes
one segment with its coded property, colour and algorithm identification; each frame
records, in its Derivation Image Sequence, the CT image (and for an Enhanced CT source the
frame) it was derived from, so a viewer overlays it on exactly the slices it came from.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.uid import generate_uid

from dicom_node.config import ResultSettings
from dicom_node.encode.labels import (
    AlgorithmInfo,
    EncodeError,
    SegmentInfo,
    check_inputs,
    common_attributes,
    segment_numbers,
)
from dicom_node.volume import SeriesVolume


def segment_descriptions(
    segments: Sequence[SegmentInfo], algorithm: AlgorithmInfo
) -> list[hd.seg.SegmentDescription]:
    """One Segment Sequence item per label; Segment Number n describes ``segments[n-1]``."""
    family = algorithm.seg_identification()
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=seg.name,
            segmented_property_category=seg.category,
            segmented_property_type=seg.code,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=family,
            tracking_uid=generate_uid(),
            tracking_id=seg.name,
            display_color=seg.display_color(),
        )
        for number, seg in enumerate(segments, start=1)
    ]


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


def build_seg(
    source: SeriesVolume,
    labels: np.ndarray,
    segments: Sequence[SegmentInfo],
    algorithm: AlgorithmInfo,
    settings: ResultSettings,
    series_number: int = 9001,
) -> hd.seg.Segmentation:
    """Build the SEG instance for ``labels`` drawn on ``source``.

    ``labels`` is (slices, rows, columns) uint8 on the source grid; each value described in
    ``segments`` becomes one segment (Segment Number = position in ``segments`` + 1).
    ``settings.seg_type`` picks Segmentation Storage with SegmentationType BINARY (frames
    only where a segment is present) or Label Map Segmentation Storage (one frame per slice
    that holds any label).

    highdicom takes the source images' metadata only: the headers kept by
    :mod:`dicom_node.volume` (no Pixel Data, Rows/Columns intact) are passed as they are.

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
    pixels = _frames_in_source_order(source, segment_numbers(labels, segments))
    return hd.seg.Segmentation(
        source_images=source.headers,
        pixel_array=pixels,
        segmentation_type=seg_type,
        segment_descriptions=segment_descriptions(segments, algorithm),
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        series_description=settings.seg_series_description,
        content_description=f"{algorithm.name} {algorithm.version}"[:64],
        content_label="SEGMENTATION",
        omit_empty_frames=True,
        **common_attributes(source, settings),
    )
