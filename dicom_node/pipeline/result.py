"""The result of segmenting a volume (numpy only, so Triton's clients need no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
