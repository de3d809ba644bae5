"""Post-processing on the CPU: this project's fast path against MONAI's transforms chained.

This project: :func:`dicom_node.pipeline.postprocess.postprocess_fast`. Peer, in the same run on
the same logits: :func:`~dicom_node.pipeline.postprocess.postprocess_monai` (argmax,
KeepLargestConnectedComponent, SpatialResample back onto the input grid, LabelToContour per
slice), what the pipeline ran before. The logits are those of a 512x512x200 CT series (0.78 mm
pixels, 1.5 mm slices) on the public spleen bundle's 1.5x1.5x2 mm grid: a spleen-sized
ellipsoid and a few smaller false-positive blobs. Medians of ``BENCH_RUNS`` runs; never asserts
a time. The rows also say whether both give the same arrays.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np
import torch
from monai.transforms import Spacing

from dicom_node.pipeline.postprocess import postprocess_fast, postprocess_monai
from dicom_node.pipeline.transforms import to_metatensor

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
#: (slices, rows, columns) and (slice, row, column) spacing in mm of the input series.
SHAPE = (200, 512, 512)
SPACING = (1.5, 0.78125, 0.78125)
#: The public spleen_ct_segmentation bundle's grid, (x, y, z) mm.
PIXDIM = (1.5, 1.5, 2.0)


def model_grid_image():
    """The input series' geometry on the model grid, as the pipeline's preprocessing gives it.

    Only the geometry matters to post-processing, but Spacing derives it from the full input
    shape, so a blank uint8 series of that shape is resampled once, outside the timings.
    """
    affine = np.array(
        [
            [0.0, 0.0, SPACING[2], -200.0],
            [0.0, SPACING[1], 0.0, -200.0],
            [SPACING[0], 0.0, 0.0, -500.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    image = to_metatensor(np.zeros(SHAPE, dtype=np.uint8), affine)
    return Spacing(pixdim=PIXDIM, mode="nearest", dtype=torch.float32)(image)


def synthetic_logits(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """(2, x, y, z) logits: a spleen-sized ellipsoid and four small false-positive blobs."""
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    size = np.array(shape, dtype=float)
    # Spleen: about 12 x 7 x 10 cm on the 1.5 x 1.5 x 2 mm grid, at the patient's left back.
    blobs = [(size * (0.7, 0.6, 0.5), np.array((40.0, 23.0, 25.0)))]
    blobs += [(rng.uniform(0.1, 0.9, 3) * size, rng.uniform(2.0, 6.0, 3)) for _ in range(4)]
    foreground = np.full(shape, -4.0, dtype=np.float32)
    for centre, radius in blobs:
        distance = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius, strict=True))
        np.maximum(foreground, (1.0 - distance).astype(np.float32), out=foreground)
    return torch.as_tensor(np.stack([np.zeros(shape, dtype=np.float32), foreground]))


def run() -> list[dict]:
    image = model_grid_image()
    logits = synthetic_logits(tuple(image.shape[1:]))
    ours, peer, same = [], [], True
    for _ in range(RUNS):
        t0 = time.perf_counter()
        fast = postprocess_fast(logits, image, [1])
        t1 = time.perf_counter()
        reference = postprocess_monai(logits, image, [1])
        t2 = time.perf_counter()
        ours.append(t1 - t0)
        peer.append(t2 - t1)
        same &= np.array_equal(fast.labels, reference.labels)
        same &= np.array_equal(fast.contours, reference.contours)
    m, p = statistics.median(ours), statistics.median(peer)
    grid = "x".join(map(str, image.shape[1:]))
    series = "x".join(map(str, SHAPE[::-1]))
    return [
        {
            "figure": f"post-processing, CPU, {torch.get_num_threads()} threads: s for logits on "
            f"{grid} back to a {series} series (MONAI transforms / ours); "
            f"identical arrays: {bool(same)}",
            "this_project": round(m, 3),
            "peer": round(p, 3),
            "ratio": round(p / m, 1) if m else None,
        }
    ]


def main() -> None:
    for row in run():
        print(
            f"{row['figure']}: ours {row['this_project']}, peer {row['peer']}, "
            f"ratio (peer/ours) {row['ratio']}"
        )


if __name__ == "__main__":
    sys.exit(main())
