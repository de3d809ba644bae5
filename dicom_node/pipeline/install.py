"""Install MONAI bundles: a model change is a folder, not a code change.

A bundle is ``configs/inference.json`` + ``configs/metadata.json`` + ``models/model.ts``.
From a folder it is copied and checked; by name it is fetched with
:func:`monai.bundle.download` (the MONAI model zoo), which needs network access.
"""

from __future__ import annotations

import shutil
from pathlib import Path


class BundleInstallError(RuntimeError):
    """A bundle cannot be installed; the message says why."""


def install_bundle(source: str, dest_root: Path) -> Path:
    """Install ``source`` (a bundle folder or a model-zoo name) under ``dest_root``."""
    from dicom_node.pipeline import BundleError, load_bundle

    dest_root = Path(dest_root)
    dest_root.mkdir(parents=True, exist_ok=True)
    src = Path(source)
    if src.is_dir():
        target = dest_root / src.name
        if target.resolve() != src.resolve():
            if target.exists():
                raise BundleInstallError(f"{target} already exists; remove it first")
            shutil.copytree(src, target)
    else:
        if "/" in source or source.startswith("."):
            raise BundleInstallError(f"{source} is not a folder")
        target = dest_root / source
        try:
            from monai.bundle import download

            download(name=source, bundle_dir=str(dest_root))
        except Exception as exc:  # noqa: BLE001 - network errors come in many types
            raise BundleInstallError(
                f"cannot download bundle {source!r} ({type(exc).__name__}: {exc}); this machine "
                "may be offline: download the bundle elsewhere and install it from its folder"
            ) from None
    try:
        load_bundle(target).load_network("cpu")  # the weights load, not only the configs
    except BundleError as exc:
        if target.resolve() != src.resolve():
            shutil.rmtree(target, ignore_errors=True)  # leave no half-usable bundle behind
        raise BundleInstallError(f"{target} is not a usable bundle: {exc}") from None
    return target


def describe_bundle(root: Path) -> str:
    """What ``dicom-node model install`` says of an installed bundle: its name and version,
    how many labels and where they were read, the weights and their SHA-256, and how it runs
    (the patch size and what a patch's logits take, which bounds its memory)."""
    import math

    from dicom_node.pipeline import load_bundle

    bundle = load_bundle(root)
    count = len(bundle.labels)
    lines = [
        f"{bundle.name} {bundle.version}: {count} label{'s' if count != 1 else ''}, "
        f"read from {bundle.labels_from}",
    ]
    if bundle.weights_file is not None:
        where = bundle.weights_file
        where = where.relative_to(root.resolve()) if where.is_relative_to(root.resolve()) else where
        lines.append(f"weights: {where}, SHA-256 {bundle.weights_sha256}")
    inferer = bundle.parser.get_parsed_content("inferer")
    roi = getattr(inferer, "roi_size", None)
    how = "the node's fast path" if bundle.fast_path else "the bundle's own transforms"
    name = type(inferer).__name__
    if bundle.everything is not None:
        how += f", everything mode ({len(bundle.everything)} classes prompted)"
    if roi is not None:
        roi = tuple(int(v) for v in (roi if isinstance(roi, (list, tuple)) else [roi] * 3))
        logits = bundle.num_classes * math.prod(roi) * 4
        lines.append(
            f"runs: {how}; {name} on {'x'.join(map(str, roi))} patches, "
            f"{getattr(inferer, 'sw_batch_size', 1)} at a time; a patch's logits take "
            f"{logits / 2**20:.0f} MiB (float32, {bundle.num_classes} channels)"
        )
    else:
        lines.append(f"runs: {how}; {name} on the whole preprocessed image")
    return "\n".join(lines)


def write_seeded_weights(root: Path, seed: int = 0) -> Path:
    """Weights for a bundle folder that has none: its own ``network_def`` built after
    ``torch.manual_seed(seed)``, saved where its checkpoint loader looks; returns the path.

    Published weights cannot be downloaded everywhere the node is tested; a network built
    from the bundle's own definition with a fixed seed is a deterministic stand-in, and
    MONAI's bundle workflow with the same file is the reference the node's output matches.
    """
    import torch

    from dicom_node.pipeline import load_bundle

    bundle = load_bundle(root)
    torch.manual_seed(seed)
    network = bundle.build_network()
    if bundle.weights is None:
        raise ValueError(f"bundle {root} names no weights file")
    bundle.weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), bundle.weights)
    return bundle.weights
