"""Turn a label map on a CT series into DICOM results: SEG, RTSTRUCT and SR (TID 1500).

Every encoder takes the assembled source (:class:`~dicom_node.volume.SeriesVolume`), the
label map on its grid, what each label means (:class:`SegmentInfo`, usually from
:func:`segment_info_for`) and which algorithm made it (:class:`AlgorithmInfo`), and returns
a dataset ready to be stored or sent: a new series in the source's study and Frame of
Reference. Segment Number, ROI Number and SR measurement group n all describe
``segments[n-1]``.
"""

from dicom_node.encode.labels import (
    AlgorithmInfo,
    EncodeError,
    SegmentInfo,
    label_counts,
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
    "segment_info_for",
]
