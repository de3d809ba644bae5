"""Turn a label map on a CT series into DICOM results: SEG, RTSTRUCT and SR (TID 1500).

Every encoder takes the assembled source (:class:`~dicom_node.series.volume.SeriesVolume`), the
label map on its grid, what each label means (:class:`SegmentInfo`, usually from
:func:`segment_info_for`) and which algorithm made it (:class:`AlgorithmInfo`), and returns
a dataset ready to be stored or sent: a new series in the source's study and Frame of
Reference. Label names are coded from TotalSegmentator's table (:mod:`.codes`).

Segment Number and ROI Number n both describe the n-th segment that occurs in the label
map (:func:`present_segments`): a label the model did not find has no segment and no ROI.
The SR reports every segment, in order, found ones by reference to their SEG segment and
the others as 0 mL. When no label occurs at all, SEG and RTSTRUCT describe every segment
(without pixels or contours), since neither may be empty.
"""

from dicom_node.encode.labels import (
    AlgorithmInfo,
    EncodeError,
    SegmentInfo,
    label_counts,
    present_segments,
    segment_info_for,
)
from dicom_node.encode.rtstruct import build_rtstruct
from dicom_node.encode.seg import build_seg
from dicom_node.encode.sr import build_sr

__all__ = [
    "AlgorithmInfo",
    "EncodeError",
    "SegmentInfo",
    "build_rtstruct",
    "build_seg",
    "build_sr",
    "label_counts",
    "present_segments",
    "segment_info_for",
]
