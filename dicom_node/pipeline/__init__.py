"""MONAI bundle inference: the bundle's contract, and the pipeline around its network.

The names that need torch and MONAI (:class:`Bundle`, :class:`SegmentationPipeline`...) are
imported on first use, so that a node whose models run on Triton reads bundle metadata and
receives results without loading torch (hundreds of MB) into its own process.
"""

from __future__ import annotations

import importlib
from typing import Any

from dicom_node.pipeline.metadata import BundleError, BundleInfo, read_bundle_info
from dicom_node.pipeline.result import HandOver, SegmentationResult

_LAZY = {
    "Bundle": "dicom_node.pipeline.bundle",
    "Preprocessing": "dicom_node.pipeline.bundle",
    "load_bundle": "dicom_node.pipeline.bundle",
    "SegmentationPipeline": "dicom_node.pipeline.segment",
}

__all__ = [
    "Bundle",
    "BundleError",
    "BundleInfo",
    "HandOver",
    "Preprocessing",
    "SegmentationPipeline",
    "SegmentationResult",
    "load_bundle",
    "read_bundle_info",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
