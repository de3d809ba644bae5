"""Turn a label map on a CT series into DICOM results: SEG, RTSTRUCT and SR (TID 1500).

Every encoder (:mod:`.registry`) takes the assembled source
(:class:`~dicom_node.series.volume.SeriesVolume`), the label map on its grid, what each label
means (:class:`SegmentInfo`, usually from :func:`segment_info_for`) and which algorithm made
it (:class:`AlgorithmInfo`), and returns a dataset ready to be stored or sent: a new series in
the source's study and Frame of Reference. Label names are coded from TotalSegmentator's
table (:mod:`.codes`).

Segment Number and ROI Number n both describe the n-th segment that occurs in the label
map (:func:`present_segments`): a label the model did not find has no segment and no ROI.
The SR reports every segment, in order, found ones by reference to their SEG segment and
the others as absent (a qualitative evaluation, no measurement). When no label occurs at
all, SEG and RTSTRUCT describe every segment (without pixels or contours), since neither
may be empty: they are still made and sent, so that they supersede an earlier run's
objects at a destination, and the SR says each label is absent.
"""

from dicom_node.encode.labels import (
    AlgorithmInfo,
    EncodeError,
    SegmentInfo,
    label_counts,
    label_volumes_ml,
    present_segments,
    segment_info_for,
    voxel_volume_ml,
)
from dicom_node.encode.registry import (
    Announcing,
    EncodeContext,
    Encoder,
    Referencing,
    announce,
    chains,
    encode_all,
    encoders,
    register,
    requiring,
    series_number,
    unregister,
)
from dicom_node.encode.rtstruct import RtstructEncoder, build_rtstruct
from dicom_node.encode.seg import SegEncoder, build_seg
from dicom_node.encode.sr import SrEncoder, build_sr

for _encoder in (SegEncoder(), RtstructEncoder(), SrEncoder()):
    register(_encoder)

__all__ = [
    "AlgorithmInfo",
    "Announcing",
    "EncodeContext",
    "EncodeError",
    "Encoder",
    "Referencing",
    "SegmentInfo",
    "announce",
    "build_rtstruct",
    "build_seg",
    "build_sr",
    "chains",
    "encode_all",
    "encoders",
    "label_counts",
    "label_volumes_ml",
    "present_segments",
    "register",
    "requiring",
    "segment_info_for",
    "series_number",
    "unregister",
    "voxel_volume_ml",
]
