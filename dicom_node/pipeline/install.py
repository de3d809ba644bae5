"""Install MONAI bundles: a model change is a folder, not a code change.

A bundle is ``configs/inference.json`` + ``configs/metadata.json`` + ``models/model.ts``.
From a folder it is copied and checked; by name it is fetched with
:func:`monai.bundle.download` (the MONAI model zoo), which needs network access.

A bundle is code. Its config's ``$`` expressions, ``_target_`` callables and ``imports``,
and its ``scripts/`` package, run in the installing process when the bundle is checked
(MONAI's :class:`~monai.bundle.ConfigParser` builds the network and transforms from them)
and in the node's whenever it loads the bundle, with their user's rights: MONAI bundles are
made so, and no check of the config could tell a harmless expression from another.
:data:`CODE_NOTICE` says so at every install, and the weights' SHA-256 is printed to
compare with what the bundle's publisher states.

A bundle is checked whole before anything is written under ``--dest``: configs and
metadata read with a size limit, the network built and its weights loaded. A bundle that
fails is refused in one sentence and leaves nothing behind; one that passes is copied under
a temporary name and renamed into place, so a crash mid-copy leaves no half bundle that
looks installed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

#: What ``dicom-node model install`` says before it reads a bundle.
CODE_NOTICE = (
    "A bundle is code: the $ expressions, _target_ callables and imports of its configs, and "
    "its scripts/, run with this user's rights now and with the node's whenever it loads "
    "the bundle. Install only bundles you trust, and compare the weights' SHA-256 below "
    "with the one their publisher states."
)


class BundleInstallError(RuntimeError):
    """A bundle cannot be installed; the message says why, in one sentence."""


def install_bundle(source: str, dest_root: Path) -> Path:
    """Install ``source`` (a bundle folder or a model-zoo name) under ``dest_root``.

    Raises :class:`BundleInstallError` when the bundle cannot be read or its weights do
    not load, with nothing left under ``dest_root``.
    """
    dest_root = Path(dest_root)
    src = Path(source)
    if src.is_dir():
        target = dest_root / src.name
        if target.resolve() == src.resolve():  # checking a bundle where it lies
            _check(src, src)
            return target
        if target.exists():
            raise BundleInstallError(f"{target} already exists; remove it first")
        _check(src, src)
        dest_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{src.name}.", dir=dest_root) as work:
            staged = Path(work) / src.name
            shutil.copytree(src, staged, symlinks=True)
            staged.rename(target)
        return target
    if "/" in source or source.startswith("."):
        raise BundleInstallError(f"{source} is not a folder")
    target = dest_root / source
    if target.exists():
        raise BundleInstallError(f"{target} already exists; remove it first")
    dest_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{source}.", dir=dest_root) as work:
        try:
            from monai.bundle import download

            download(name=source, bundle_dir=work)
        except Exception as exc:  # noqa: BLE001 - network errors come in many types
            raise BundleInstallError(
                f"cannot download bundle {source!r} ({type(exc).__name__}: {exc}); this machine "
                "may be offline: download the bundle elsewhere and install it from its folder"
            ) from None
        _check(Path(work) / source, Path(source))
        (Path(work) / source).rename(target)
    return target


def _check(root: Path, shown: Path) -> None:
    """Read the bundle at ``root`` as the node will, weights included; refuse it naming
    ``shown`` (the folder the user named)."""
    from dicom_node.pipeline import BundleError, load_bundle

    try:
        load_bundle(root).load_network("cpu")  # the weights load, not only the configs
    except BundleError as exc:
        message = str(exc).replace(str(root), str(shown))
        raise BundleInstallError(f"{shown} is not a usable bundle: {message}") from None
    except Exception as exc:  # noqa: BLE001 - the bundle's own code may raise anything
        lines = str(exc).strip().splitlines()
        raise BundleInstallError(
            f"{shown} is not a usable bundle: loading it raised {type(exc).__name__}"
            f"{': ' + lines[0][:200] if lines else ''}"
        ) from None


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
