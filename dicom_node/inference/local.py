"""Run the segmentation in the node's own process, without Triton.

For a node without a GPU server, for tests, and as the reference the Triton backend is
compared with: the same :class:`SegmentationPipeline`, with the bundle's TorchScript network
called directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicom_node.common.heap import empty_volume, release_free_memory
from dicom_node.config import InferenceSettings, ModelSettings
from dicom_node.pipeline import (
    Bundle,
    HandOver,
    SegmentationPipeline,
    SegmentationResult,
    load_bundle,
)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is the first CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class LocalBackend:
    """Segments volumes in-process with the bundle at ``bundle_path``.

    The network is loaded when the backend is built, so that a bundle without weights fails
    at start-up rather than on the first series.
    """

    def __init__(self, bundle_path: Path, device: str = "auto") -> None:
        self.bundle: Bundle = load_bundle(bundle_path)
        self.device = resolve_device(device)
        self.pipeline = SegmentationPipeline(self.bundle, self.device)
        _ = self.pipeline.network

    @property
    def labels(self) -> dict[int, str]:
        """Label value -> name of the bundle's foreground classes."""
        return self.bundle.labels

    #: The node may hand a volume over (:class:`~dicom_node.pipeline.result.HandOver`): the
    #: pipeline keeps it only until preprocessed.
    takes_hand_over = True

    def segment(
        self, hu: np.ndarray | HandOver, affine: np.ndarray, *, contours: bool = False
    ) -> SegmentationResult:
        """Segment a (slices, rows, columns) HU array whose affine maps voxels to LPS mm.

        The contour map is computed only with ``contours``, as with Triton.
        """
        try:
            return self.pipeline.run(hu, affine, contours=contours)
        finally:
            release_free_memory()

    def ready(self) -> bool:
        """Always: the network was loaded when the backend was built."""
        return True

    def volume_allocator(self) -> Callable[[Sequence[int], Any], Any]:
        """Ordinary memory: the pipeline copies the volume to its device once."""
        return empty_volume

    def close(self) -> None:
        """Nothing to release: the network is freed with the backend."""


def create_backends(
    settings: InferenceSettings, models: Sequence[ModelSettings], data_dir: Path
) -> dict[str, LocalBackend]:
    """The ``"local"`` backend: each model's bundle in this process."""
    return {m.name: LocalBackend(m.bundle, settings.device) for m in models}
