"""A bundle's trained network, loaded with torch alone where nothing more is needed.

A Triton network model (:mod:`dicom_node.inference.triton.models.network`) runs only the
network, in a process of its own for each instance. When the bundle has TorchScript weights,
loading them needs no Python definition of the architecture and so no MONAI, and such a
process starts with 1.2 s less CPU (of 2.6 s) than one that imports MONAI to read the bundle
as :func:`~dicom_node.pipeline.bundle.load_bundle` does. Weights as a state dict need the
bundle's ``network_def``, built by MONAI: those go through the full reading.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dicom_node.pipeline.metadata import (
    EVERYTHING_LABELS,
    STATE_DICT,
    TORCHSCRIPT,
    BundleError,
    config_item,
    find_inference_config,
    read_config,
)

__all__ = [
    "STATE_DICT",
    "TORCHSCRIPT",
    "channels_last_on_cpu",
    "load_served_network",
    "load_torchscript",
]


def channels_last_on_cpu(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """On a CPU, a convolutional network with its weights in channels-last order (NDHWC).

    PyTorch's oneDNN 3D convolutions run 1.5 to 2 times as fast on channels-last weights
    at a batch of two patches or more (two 96^3 patches on two cores: the spleen bundle's
    UNet 0.15 to 0.09 s, the wholeBody SegResNet 4.7 to 3.2 s), and their inputs and
    outputs follow. The network is the same function, its sums taken in another order:
    logits within 1e-6 for the UNet, 7e-4 for a 105-class SegResNet with random weights.
    A network with attention (``Linear`` layers: SwinUNETR) is left as it is, being 8%
    slower so; on a GPU every network is.
    """
    if device.type != "cpu":
        return net
    kinds = {getattr(m, "original_name", type(m).__name__) for m in net.modules()}
    if "Conv3d" not in kinds or "Linear" in kinds:
        return net
    return net.to(memory_format=torch.channels_last_3d)


def load_torchscript(root: Path, device: str | torch.device = "cpu") -> torch.nn.Module | None:
    """The bundle's TorchScript network (``models/model.ts``) on ``device`` in eval mode;
    ``None`` when the bundle has none."""
    path = Path(root) / TORCHSCRIPT
    if not path.is_file():
        return None
    try:
        net = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # noqa: BLE001 - torch says "not an archive" in many types
        raise BundleError(
            f"bundle {root}: {TORCHSCRIPT} is not a TorchScript network this torch "
            f"{torch.__version__} loads ({first_line(exc)})"
        ) from None
    return channels_last_on_cpu(net.eval(), torch.device(device))


def load_state_dict(path: Path, root: Path, device: str | torch.device = "cpu") -> object:
    """The checkpoint at ``path`` as MONAI's ``CheckpointLoader`` reads it, tensors only
    (``weights_only``: a checkpoint cannot run code as it is read)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a broken pickle fails in many types
        where = path.relative_to(root) if path.is_relative_to(root) else path
        raise BundleError(
            f"bundle {root}: {where} is not a checkpoint torch.load reads with weights "
            f"only ({first_line(exc)})"
        ) from None


def first_line(exc: BaseException) -> str:
    """What torch says of a file it cannot load, as one short clause for a one-sentence
    refusal: the unpickler's own error rather than its advice, without the C++ source
    location, up to the first full stop."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = re.sub(r"^\[enforce fail at [^]]*\]\s*", "", lines[0]) if lines else ""
    line = line.lstrip(". ").split(". ", 1)[0].rstrip(".")
    return line[:160] or type(exc).__name__


def load_served_network(
    root: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, bool]:
    """The network of the bundle at ``root`` on ``device``, and whether to run it under
    autocast (the bundle's ``evaluator#amp``, on CUDA only), as
    :meth:`~dicom_node.pipeline.bundle.Bundle.load_network` gives it.

    TorchScript weights and an ``amp`` that is absent or written as true or false are read
    without MONAI; anything else (a state dict, an expression, an everything mode whose
    network is served prompted) goes through :func:`~dicom_node.pipeline.bundle.load_bundle`.
    """
    root, device = Path(root), torch.device(device)
    config = read_config(find_inference_config(root), root)
    evaluator = config.get("evaluator")
    amp = evaluator.get("amp", False) if isinstance(evaluator, dict) else False
    prompted = config_item(config, EVERYTHING_LABELS) is not None
    net = None if prompted else load_torchscript(root, device)
    if net is None or not isinstance(amp, bool):
        from dicom_node.pipeline.bundle import load_bundle  # imports MONAI

        bundle = load_bundle(root)
        net, amp = bundle.load_network(device), bundle.amp
    return net, amp and device.type == "cuda"
