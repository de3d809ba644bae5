"""What the pipeline gives back (numpy only, so Triton's clients need no torch), and how a
volume is handed to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class SegmentationResult:
    """A label map on the input grid.

    ``labels`` and ``contours`` are uint8 (slices, rows, columns) arrays on the grid of the
    array given to :meth:`SegmentationPipeline.run`; values are the bundle's label values.
    ``contours`` marks the in-plane boundary of each label on each slice (what an RTSTRUCT
    contour outlines), or is ``None`` when the caller did not ask for it. ``timings`` holds
    seconds for ``"pre"``, ``"inference"`` and ``"post"``.
    """

    labels: np.ndarray
    contours: np.ndarray | None
    timings: dict[str, float] = field(default_factory=dict)


class HandOver:
    """A volume the caller hands over: the pipeline takes it once, to preprocess it, and
    nothing keeps it afterwards.

    The caller holds a volume through the whole call otherwise (its own reference, and the
    arguments of every frame down to the preprocessing), which in the node's process keeps
    the INT16 volume alive beside the network's activations: a third of the peak.
    """

    def __init__(self, volume: Any) -> None:
        self._volume: Any | None = volume

    def take(self) -> Any:
        volume, self._volume = self._volume, None
        if volume is None:
            raise RuntimeError("the volume was handed over already")
        return volume
