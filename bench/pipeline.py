"""The full segmentation pipeline with the full-size spleen UNet, against the plain way.

This project: :class:`dicom_node.pipeline.SegmentationPipeline` (MONAI array transforms on
torch tensors on the device, sliding window, post-processing on the device).
Peer, measured in the same run with the same network and weights: the MONAI tutorial's way,
dictionary transforms on numpy on the CPU (EnsureChannelFirstd, Orientationd, Spacingd,
ScaleIntensityRanged), ``sliding_window_inference``, then AsDiscreted(argmax),
KeepLargestConnectedComponentd, Invertd back to the input grid and LabelToContourd.

``--device cuda`` (when a GPU is present) also prints GPU vs CPU pre/post-processing.
Medians of ``BENCH_RUNS`` runs; never asserts a time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    Invertd,
    KeepLargestConnectedComponentd,
    LabelToContourd,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

from dicom_node.config import PROJECT_ROOT
from dicom_node.pipeline import SegmentationPipeline, load_bundle
from dicom_node.pipeline.transforms import ras_affine
from dicom_node_testing.phantom import make_phantom

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
#: (slices, rows, columns) of the benchmark phantom and its spacing in mm.
SHAPE = tuple(int(v) for v in os.environ.get("BENCH_PIPELINE_SHAPE", "64,256,256").split(","))
SPACING = (2.5, 1.4, 1.4)


def full_size_unet() -> torch.nn.Module:
    """The spleen_ct_segmentation bundle's architecture (random weights: timing only)."""
    torch.manual_seed(0)
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        num_res_units=2,
        norm="batch",
    ).eval()


def plain(hu: np.ndarray, affine_lps: np.ndarray, net: torch.nn.Module, bundle) -> dict:
    """The MONAI-tutorial way: numpy dictionary transforms on the CPU."""
    pre = bundle.preprocessing
    t0 = time.perf_counter()
    image = MetaTensor(
        torch.as_tensor(hu.astype(np.float32)), affine=torch.as_tensor(ras_affine(affine_lps))
    )
    image.meta["original_channel_dim"] = "no_channel"
    transforms = Compose(
        [
            EnsureChannelFirstd("image", channel_dim="no_channel"),
            Orientationd("image", axcodes=pre.axcodes),
            Spacingd("image", pixdim=pre.pixdim, mode="bilinear"),
            ScaleIntensityRanged(
                "image",
                a_min=pre.a_min,
                a_max=pre.a_max,
                b_min=pre.b_min,
                b_max=pre.b_max,
                clip=True,
            ),
        ]
    )
    data = transforms({"image": image})
    t1 = time.perf_counter()
    with torch.no_grad():
        data["pred"] = sliding_window_inference(
            data["image"][None], bundle.roi_size, bundle.sw_batch_size, net, overlap=bundle.overlap
        )[0]
    t2 = time.perf_counter()
    post = Compose(
        [
            AsDiscreted("pred", argmax=True),
            KeepLargestConnectedComponentd("pred", applied_labels=[1]),
            Invertd("pred", transform=transforms, orig_keys="image", nearest_interp=True),
            LabelToContourd("pred"),
        ]
    )
    post(data)
    t3 = time.perf_counter()
    return {"pre": t1 - t0, "inference": t2 - t1, "post": t3 - t2, "total": t3 - t0}


def ours(hu: np.ndarray, affine_lps: np.ndarray, net: torch.nn.Module, bundle, device: str) -> dict:
    pipeline = SegmentationPipeline(bundle, device)
    net = net.to(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        result = pipeline.run(hu, affine_lps, predictor=net)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    timings = dict(result.timings)
    timings["total"] = time.perf_counter() - t0
    return timings


def run(device: str = "cpu") -> list[dict]:
    bundle = load_bundle(PROJECT_ROOT / "bundles" / "spleen_ct_demo")
    phantom = make_phantom(shape=SHAPE, spacing=SPACING, seed=5)
    affine = phantom.affine
    net = full_size_unet()
    mine, peer = [], []
    for _ in range(RUNS):
        peer.append(plain(phantom.hu, affine, net, bundle))
        mine.append(ours(phantom.hu, affine, net, bundle, "cpu"))
    rows = []
    shape = "x".join(map(str, SHAPE))
    for key in ("total", "pre", "post"):
        m = statistics.median(r[key] for r in mine)
        p = statistics.median(r[key] for r in peer)
        rows.append(
            {
                "figure": f"pipeline {shape} full-size UNet, CPU: {key} s (plain MONAI numpy "
                "dict transforms / ours)",
                "this_project": round(m, 3),
                "peer": round(p, 3),
                "ratio": round(p / m, 2) if m else None,
            }
        )
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = [ours(phantom.hu, affine, net, bundle, device) for _ in range(RUNS)]
        for key in ("pre", "post"):
            g = statistics.median(r[key] for r in gpu)
            c = statistics.median(r[key] for r in mine)
            rows.append(
                {
                    "figure": f"pipeline {shape}: {key} s, GPU vs CPU (target >= 12x)",
                    "this_project": round(g, 4),
                    "peer": round(c, 4),
                    "ratio": round(c / g, 1) if g else None,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for row in run(args.device):
        print(
            f"{row['figure']}: ours {row['this_project']}, peer {row['peer']}, "
            f"ratio (peer/ours) {row['ratio']}"
        )


if __name__ == "__main__":
    sys.exit(main())
