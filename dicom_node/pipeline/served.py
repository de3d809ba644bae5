"""The network a Triton network model serves, loaded with as little as the bundle needs.

A Triton network model (:mod:`dicom_node.inference.triton.models.network`) runs only the
network, in a process of its own for each instance. When the bundle has TorchScript weights,
loading them needs no Python definition of the architecture and so no MONAI, and such a
process starts with 1.2 s less CPU (of 2.6 s) than one that imports MONAI to read the bundle
as :func:`~dicom_node.pipeline.bundle.load_bundle` does. Weights as a state dict need the
bundle's ``network_def``, built by MONAI: those go through the full reading.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dicom_node.pipeline.metadata import (
    EVERYTHING_LABELS,
    config_item,
    find_inference_config,
    read_config,
)
from dicom_node.pipeline.weights import load_torchscript

__all__ = ["load_served_network"]


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
