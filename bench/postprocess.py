"""Post-processing on the CPU: this project's against MONAI's transforms.

Demo bundles' chain (argmax, largest component, nearest inverse): this project's
:func:`dicom_node.pipeline.postprocess.postprocess_fast`; peer, in the same run on the same
logits, :func:`~dicom_node.pipeline.postprocess.postprocess_monai` (argmax,
KeepLargestConnectedComponent, SpatialResample back onto the input grid, LabelToContour per
slice). The logits are those of a 512x512x200 CT series (0.78 mm pixels, 1.5 mm slices) on
the public spleen bundle's 1.5x1.5x2 mm grid: a spleen-sized ellipsoid and a few smaller
false-positive blobs.

The zoo's chain (``spleen_ct_segmentation``'s postprocessing as its config builds it:
softmax, ``Invertd`` resampling both probability maps trilinearly, argmax): this project's
:func:`~dicom_node.pipeline.postprocess.run_postprocessing` against MONAI's own ``Compose``
of the same transforms, on the data dictionary MONAI's own preprocessing (the bundle's
``Orientationd`` and ``Spacingd``) leaves for a 512x512x``BENCH_POST_ZOO_SLICES`` series
(default 200), with two kinds of logits: an organ (the ellipsoid and blobs above, what a
trained network gives) and a network that labels nearly every voxel spleen with 1.4% of the
model grid speckled background (what the bundle's UNet with seeded weights gives on a
phantom). Medians of ``BENCH_RUNS`` runs; never asserts a time. The rows also say whether
both give the same arrays.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, Spacing
from scipy import ndimage

from dicom_node.config import PROJECT_ROOT
from dicom_node.pipeline.postprocess import postprocess_fast, postprocess_monai, run_postprocessing
from dicom_node.pipeline.transforms import from_metatensor, to_metatensor
from dicom_node.pipeline.workflow import loaded_image

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
ZOO_SLICES = int(os.environ.get("BENCH_POST_ZOO_SLICES", "200"))
TESTDATA = Path(os.environ.get("DICOM_NODE_TESTDATA", PROJECT_ROOT.parent / "shared" / "data"))
ZOO_SPLEEN = TESTDATA.parent / "zoo" / "spleen_ct_segmentation" / "configs" / "inference.json"
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


def speckled_logits(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """(2, x, y, z) logits where the second class wins nearly everywhere, the first on
    1.4% of the voxels in small scattered patches."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.0)
    noise /= noise.std()
    foreground = (2.2 + noise).astype(np.float32)
    return torch.as_tensor(np.stack([np.zeros(shape, dtype=np.float32), foreground]))


def zoo_rows() -> list[dict]:
    """The zoo spleen bundle's own postprocessing: MONAI's Compose against ours."""
    if not ZOO_SPLEEN.is_file():
        return [
            {
                "figure": f"post-processing, zoo chain: left out, no config at {ZOO_SPLEEN}",
                "this_project": None,
                "peer": None,
                "ratio": None,
            }
        ]
    parser = ConfigParser()
    parser.read_config(str(ZOO_SPLEEN))
    pre = parser.get_parsed_content("preprocessing")
    post = parser.get_parsed_content("postprocessing")
    transforms = [t for t in post.transforms if type(t).__name__ != "SaveImaged"]
    steps = Compose([t for t in pre.transforms if type(t).__name__ != "LoadImaged"])
    shape = (ZOO_SLICES, 512, 512)
    affine = np.array(
        [[0.0, 0.0, SPACING[2], -200.0], [0.0, SPACING[1], 0.0, -200.0],
         [SPACING[0], 0.0, 0.0, -500.0], [0.0, 0.0, 0.0, 1.0]]
    )  # fmt: skip
    image = steps({"image": loaded_image(np.zeros(shape, dtype=np.int16), affine)})["image"]
    grid = tuple(image.shape[1:])
    meta = {k: v for k, v in image.meta.items() if k != "affine"}
    rows = []
    for kind, logits in (
        ("an organ", synthetic_logits(grid)),
        ("nearly all voxels, speckled background", speckled_logits(grid)),
    ):
        ours, peer, same = [], [], True
        for _ in range(RUNS):

            def data(logits: torch.Tensor = logits) -> dict:
                pred = MetaTensor(logits.clone(), affine=image.affine, meta=meta)
                return {"image": image, "pred": pred}

            t0 = time.perf_counter()
            got = run_postprocessing(transforms, data())["pred"]
            t1 = time.perf_counter()
            reference = Compose(transforms)(data())["pred"]
            t2 = time.perf_counter()
            ours.append(t1 - t0)
            peer.append(t2 - t1)
            got = from_metatensor(torch.as_tensor(got)).to(torch.uint8)
            reference = from_metatensor(torch.as_tensor(reference)).round().to(torch.uint8)
            same &= bool(torch.equal(got, reference))
        m, p = statistics.median(ours), statistics.median(peer)
        rows.append(
            {
                "figure": f"post-processing, zoo spleen chain (softmax, trilinear Invertd, "
                f"argmax), CPU, {torch.get_num_threads()} threads: s for logits of {kind} on "
                f"{'x'.join(map(str, grid))} back to 512x512x{ZOO_SLICES} (MONAI's Compose / "
                f"ours); identical labels: {same}",
                "this_project": round(m, 3),
                "peer": round(p, 3),
                "ratio": round(p / m, 1) if m else None,
            }
        )
    return rows


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
    ] + zoo_rows()


def main() -> None:
    for row in run():
        print(
            f"{row['figure']}: ours {row['this_project']}, peer {row['peer']}, "
            f"ratio (peer/ours) {row['ratio']}"
        )


if __name__ == "__main__":
    sys.exit(main())
