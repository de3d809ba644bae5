"""MONAI bundle inference: the bundle's contract, and the pipeline around its network."""

from dicom_node.pipeline.bundle import Bundle, BundleError, Preprocessing, load_bundle
from dicom_node.pipeline.segment import SegmentationPipeline, SegmentationResult

__all__ = [
    "Bundle",
    "BundleError",
    "Preprocessing",
    "SegmentationPipeline",
    "SegmentationResult",
    "load_bundle",
]
