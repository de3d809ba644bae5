"""Train a demo organ model on synthetic phantoms and write it as a MONAI bundle.

The node needs models that run everywhere its tests run (a CPU, a few minutes), so the
committed bundles ``bundles/spleen_ct_demo`` and ``bundles/liver_ct_demo`` each hold a small
MONAI UNet trained on :mod:`dicom_node_testing.phantom` phantoms. They are demonstration models, not
clinical ones. Both bundles share the network, grid and window: only the organ learnt (label
1 of the bundle) differs, so that Triton can serve them side by side on one CPU.

The configs are written first and the training reads them back with :func:`load_bundle`: the
network comes from ``network_def`` and every phantom goes through the very transforms the
inference pipeline applies (:mod:`dicom_node.pipeline.transforms`), so training and inference
cannot disagree about orientation, spacing or intensity window.

    python -m tools.train_demo_bundle                 # about 5-8 minutes on two CPU cores
    python -m tools.train_demo_bundle --organ liver   # writes bundles/liver_ct_demo
    python -m tools.train_demo_bundle --iterations 2000 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.utils import set_determinism

from dicom_node.pipeline import Bundle, SegmentationPipeline, load_bundle
from dicom_node.pipeline.transforms import image_transforms, label_transforms, to_metatensor
from dicom_node_testing.phantom import Phantom, make_phantom

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.1.0"

#: Seeds of the training phantoms start here; evaluation phantoms use EVAL_SEEDS. Tests use
#: seeds below 100, which the model never saw.
TRAIN_SEED0 = 1000
EVAL_SEEDS = (900, 901, 902)


@dataclass(frozen=True)
class Organ:
    """What changes between the demo bundles: the organ learnt as label 1, and its words."""

    name: str
    #: Medical Segmentation Decathlon task of the real model of this organ (``dataset_dir``).
    decathlon_task: str

    @property
    def title(self) -> str:
        return self.name.capitalize()

    def default_out(self) -> Path:
        return ROOT / "bundles" / f"{self.name}_ct_demo"

    def mask(self, phantom: Phantom) -> np.ndarray:
        """The phantom's ground truth for this organ (boolean)."""
        return phantom.spleen if self.name == "spleen" else phantom.organs[self.name]


ORGANS = {
    "spleen": Organ("spleen", "Task09_Spleen"),
    "liver": Organ("liver", "Task03_Liver"),
}

NETWORK_DEF = {
    "_target_": "UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [8, 16, 32, 48, 64],
    "strides": [2, 2, 2, 2],
    "num_res_units": 1,
    "norm": "batch",
}


def inference_config(organ: Organ = ORGANS["spleen"]) -> dict:
    """``configs/inference.json``: the structure of MONAI's ``spleen_ct_segmentation`` bundle.

    Same transforms, window (-57..164 HU) and (for the spleen) label definition, so the node
    runs the real bundle without change. Two values differ on purpose: a 2.5 mm grid instead of 1.5 x 1.5 x
    2.0 mm and an overlap of 0.25 instead of 0.5, so that training and inference take minutes
    and seconds on a CPU. The network is the small demo UNet, loaded from TorchScript (the only
    weights this bundle ships). The liver bundle keeps the spleen's window, which holds both
    organs' densities, so that one preprocessing serves both models.
    """
    return {
        "imports": ["$import glob", "$import numpy", "$import os"],
        "bundle_root": ".",
        "image_key": "image",
        "output_dir": "$@bundle_root + '/eval'",
        "output_ext": ".nii.gz",
        "output_dtype": "$numpy.float32",
        "output_postfix": "trans",
        "separate_folder": True,
        "dataset_dir": f"/workspace/data/{organ.decathlon_task}",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": NETWORK_DEF,
        "network": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "@image_key"},
                {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
                {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
                {
                    "_target_": "Spacingd",
                    "keys": "@image_key",
                    "pixdim": [2.5, 2.5, 2.5],
                    "mode": "bilinear",
                },
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "@image_key",
                    "a_min": -57,
                    "a_max": 164,
                    "b_min": 0,
                    "b_max": 1,
                    "clip": True,
                },
                {"_target_": "EnsureTyped", "keys": "@image_key"},
            ],
        },
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': i} for i in @datalist]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 4,
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [96, 96, 96],
            "sw_batch_size": 4,
            "overlap": 0.25,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                # The chain the node's fast path computes exactly (dicom_node.pipeline.bundle).
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "KeepLargestConnectedComponentd",
                    "keys": "pred",
                    "applied_labels": [1],
                },
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "@image_key",
                    "nearest_interp": True,
                    "to_tensor": True,
                },
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_ext": "@output_ext",
                    "output_dtype": "@output_dtype",
                    "output_postfix": "@output_postfix",
                    "separate_folder": "@separate_folder",
                },
            ],
        },
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "initialize": ["$monai.utils.set_determinism(seed=123)"],
        "run": ["$@evaluator.run()"],
    }


def metadata(mean_dice: float | None, organ: Organ = ORGANS["spleen"]) -> dict:
    """``configs/metadata.json`` in the model zoo's schema, saying plainly what this model is."""
    import monai

    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20220324.json",
        "version": VERSION,
        "changelog": {VERSION: "demo model trained on synthetic phantoms"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "name": f"{organ.title} CT segmentation (demo)",
        "task": f"{organ.title} segmentation on synthetic abdominal CT phantoms",
        "description": "A small 3D UNet trained on synthetic phantoms to demonstrate the "
        "dicom-node pipeline; not a clinical model",
        "authors": "dicom-node",
        "copyright": "Apache-2.0",
        "data_source": "synthetic phantoms of dicom_node_testing.phantom (tools/train_demo_bundle.py)",
        "data_type": "dicom",
        "image_classes": "single channel data, intensity scaled to [0, 1]",
        "label_classes": f"single channel data, 1 is {organ.name}, 0 is everything else",
        "pred_classes": f"2 channels OneHot data, channel 1 is {organ.name}, "
        "channel 0 is background",
        "eval_metrics": {"mean_dice": round(mean_dice, 3) if mean_dice is not None else None},
        "intended_use": "Demonstration and testing only: trained on synthetic phantoms, it "
        "is not for diagnostic use and does not segment real patients reliably",
        "references": [],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": [96, 96, 96],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 2,
                    "spatial_shape": [96, 96, 96],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "background", "1": organ.name},
                }
            },
        },
    }


def write_configs(
    out: Path, mean_dice: float | None = None, organ: Organ = ORGANS["spleen"]
) -> None:
    (out / "configs").mkdir(parents=True, exist_ok=True)
    config = json.dumps(inference_config(organ), indent=4)
    (out / "configs" / "inference.json").write_text(config + "\n")
    meta = json.dumps(metadata(mean_dice, organ), indent=4)
    (out / "configs" / "metadata.json").write_text(meta + "\n")


def random_acquisition(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """A plausible abdominal CT grid: 1.5-3.6 mm pixels, 2-5 mm slices, 300-380 mm FOV,
    170-250 mm long (at least one 64-voxel training patch at 2.5 mm)."""
    pixel = float(rng.uniform(1.5, 3.6))
    slice_ = float(rng.choice([2.0, 2.5, 3.0, 4.0, 5.0]))
    fov = float(rng.uniform(300.0, 380.0))
    height = float(rng.uniform(170.0, 250.0))
    n = int(round(fov / pixel))
    return (int(round(height / slice_)), n, n), (slice_, pixel, pixel)


def training_volumes(
    bundle: Bundle, count: int, seed0: int, organ: Organ = ORGANS["spleen"]
) -> list[tuple[torch.Tensor, ...]]:
    """Phantoms preprocessed exactly as inference preprocesses a volume; label 1 is ``organ``."""
    pre_image = image_transforms(bundle.preprocessing)
    pre_label = label_transforms(bundle.preprocessing)
    rng = np.random.default_rng(seed0)
    volumes = []
    for i in range(count):
        shape, spacing = random_acquisition(rng)
        phantom = make_phantom(shape, spacing, seed=seed0 + i)
        image = pre_image(to_metatensor(phantom.hu, phantom.affine))
        truth = organ.mask(phantom).astype(np.uint8)
        label = pre_label(to_metatensor(truth, phantom.affine))
        image = torch.as_tensor(image).to(torch.float16)  # half the memory; exact enough
        label = torch.as_tensor(label).to(torch.uint8)
        volumes.append((image, label))
        print(
            f"phantom {i + 1}/{count}: grid {shape} at {spacing[0]:.1f}/{spacing[1]:.2f} mm "
            f"-> {tuple(image.shape[1:])}, {organ.name} {int(label.sum())} voxels",
            flush=True,
        )
    return volumes


def train(
    bundle: Bundle,
    volumes: list,
    iterations: int,
    max_minutes: float,
    patch: tuple[int, int, int],
    batch: int,
    device: torch.device,
) -> torch.nn.Module:
    net = bundle.build_network().to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    lr = 3e-3
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-5)
    rng = np.random.default_rng(0)
    # Two of three patches are centred on the organ. Hand-written rather than MONAI's
    # RandCropByPosNegLabel: its background index lists would take gigabytes for these volumes.
    organ_voxels = [torch.nonzero(label[0]) for _, label in volumes]
    edge = torch.tensor(patch)
    half = edge // 2
    quarter = (edge // 4).numpy()
    net.train()
    start = time.monotonic()
    running = 0.0
    for it in range(1, iterations + 1):
        images, labels = [], []
        for _ in range(batch):
            v = int(rng.integers(len(volumes)))
            image, label = volumes[v]
            size = torch.tensor(image.shape[1:])
            if rng.random() < 2 / 3 and len(organ_voxels[v]):
                center = organ_voxels[v][int(rng.integers(len(organ_voxels[v])))]
                center = center + torch.from_numpy(rng.integers(-quarter, quarter + 1))
            else:
                center = torch.from_numpy(rng.integers(0, size.numpy()))
            lo = torch.clamp(center - half, min=torch.zeros(3, dtype=torch.long))
            lo = torch.minimum(lo, size - edge).tolist()
            window = (slice(None), *(slice(a, a + n) for a, n in zip(lo, patch, strict=True)))
            images.append(image[window].to(torch.float32))
            labels.append(label[window].to(torch.float32))
        images = torch.stack(images)
        labels = torch.stack(labels)
        # Scanners and reconstructions differ a little in calibration and noise.
        images = images * float(rng.uniform(0.97, 1.03)) + float(rng.uniform(-0.02, 0.02))
        images = images.to(device)
        labels = labels.to(device)
        # Cosine decay to 5 % of the initial rate over the iterations or the time budget,
        # whichever runs out first, so that a slow machine still ends on a low rate.
        progress = min(max(it / iterations, (time.monotonic() - start) / 60 / max_minutes), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(images), labels)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        running = 0.9 * running + 0.1 * value if it > 1 else value
        elapsed = (time.monotonic() - start) / 60
        if it % 25 == 0 or it == iterations:
            print(
                f"iteration {it}/{iterations}: loss {running:.4f} ({elapsed:.1f} min)", flush=True
            )
        if elapsed >= max_minutes:
            print(f"stopping after {it} iterations: {max_minutes} minutes spent", flush=True)
            break
    return net.eval()


def export(net: torch.nn.Module, out: Path) -> Path:
    path = out / "models" / "model.ts"
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted = torch.jit.script(net.cpu().eval())
    torch.jit.save(scripted, str(path))
    return path


def evaluate(out: Path, device: torch.device, organ: Organ = ORGANS["spleen"]) -> float:
    """Mean organ Dice of the exported bundle on unseen phantoms, through the real pipeline."""
    pipeline = SegmentationPipeline(load_bundle(out), device)
    dices = []
    for seed in EVAL_SEEDS:
        phantom = make_phantom((40, 96, 96), (5.0, 3.5, 3.5), seed=seed)
        result = pipeline.run(phantom.hu, phantom.affine)
        pred, truth = result.labels == 1, organ.mask(phantom)
        dice = 2 * float((pred & truth).sum()) / max(float(pred.sum() + truth.sum()), 1.0)
        dices.append(dice)
        print(f"evaluation phantom {seed}: Dice {dice:.3f}", flush=True)
    return float(np.mean(dices))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--organ", choices=sorted(ORGANS), default="spleen", help="organ learnt as label 1"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="bundle folder (default bundles/<organ>_ct_demo)"
    )
    parser.add_argument("--phantoms", type=int, default=32, help="training phantoms")
    parser.add_argument("--iterations", type=int, default=900)
    parser.add_argument("--max-minutes", type=float, default=7.0, help="stop training after")
    parser.add_argument(
        "--patch",
        type=lambda text: tuple(int(v) for v in text.split(",")),
        default=(96, 96, 64),
        help="training patch size x,y,z in voxels, multiples of 16 (default 96,96,64)",
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    set_determinism(seed=0)
    device = torch.device(args.device)
    organ = ORGANS[args.organ]
    out = args.out or organ.default_out()
    t0 = time.monotonic()
    write_configs(out, organ=organ)
    bundle = load_bundle(out)
    volumes = training_volumes(bundle, args.phantoms, TRAIN_SEED0, organ)
    print(f"phantoms ready in {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    net = train(bundle, volumes, args.iterations, args.max_minutes, args.patch, args.batch, device)
    path = export(net, out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    mean_dice = evaluate(out, device, organ)
    write_configs(out, mean_dice, organ)
    print(
        f"mean Dice on unseen phantoms {mean_dice:.3f}; total {(time.monotonic() - t0) / 60:.1f} min"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
