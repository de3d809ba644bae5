"""A bundle's trained network as torch loads it: TorchScript weights, and the memory layout
a CPU runs a convolutional network fastest in. Torch alone, no MONAI: the loaders here are
shared by :mod:`.bundle` (any bundle) and :mod:`.served` (a Triton network model)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dicom_node.pipeline.metadata import (
    STATE_DICT,
    TORCHSCRIPT,
    BundleError,
)

__all__ = [
    "STATE_DICT",
    "TORCHSCRIPT",
    "channels_last_on_cpu",
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
    # torch's stubs omit Module.to's memory_format keyword, which it documents and takes.
    return net.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]


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
