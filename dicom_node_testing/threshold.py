"""A backend without a network, for tests of everything around inference: label 1 wherever
the CT is denser than soft tissue. Registered as ``[inference] backend = "threshold"`` by a
test (:data:`dicom_node.inference.BACKENDS`), it also shows what a backend is: a class of
five members and a factory."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.pipeline import HandOver, SegmentationResult

__all__ = ["ThresholdBackend", "create_backends"]

#: HU above which a voxel is labelled: denser than water and fat, as organs and bone are.
THRESHOLD_HU = 40
#: Environment variable: seconds each segmentation waits before it answers. A test that
#: must see a job "processing" (new instances arriving meanwhile, a kill mid-job) gets a
#: network's time without its CPU.
SEGMENT_SECONDS = "DICOM_NODE_TESTING_SEGMENT_SECONDS"


class ThresholdBackend:
    """Segments by a threshold on HU, in this process, at once."""

    takes_hand_over = True

    def ready(self) -> bool:
        return True

    def segment(self, volume: np.ndarray | HandOver, affine: np.ndarray) -> SegmentationResult:
        delay = float(os.environ.get(SEGMENT_SECONDS) or 0)
        if delay > 0:
            time.sleep(delay)
        voxels = volume.take() if isinstance(volume, HandOver) else volume
        labels = (np.asarray(voxels) > THRESHOLD_HU).astype(np.uint8)
        return SegmentationResult(labels=labels, contours=None, timings={"inference": 0.0})

    def volume_allocator(self) -> Any:
        return np.empty

    def close(self) -> None:
        """Nothing to release."""


def create_backends(settings: Any, models: Sequence[Any], data_dir: Path) -> dict[str, Any]:
    """One :class:`ThresholdBackend` per model."""
    return {m.name: ThresholdBackend() for m in models}
