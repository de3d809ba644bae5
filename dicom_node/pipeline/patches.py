"""A network applied to a sliding window's patch batch a few patches at a time.

Both ways of running a bundle's network use it: the in-process pipeline
(:mod:`dicom_node.pipeline.segment`) and the Triton network model, whose process must not
import MONAI (it starts 1.2 s of CPU faster without), so nothing here does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["PatchByPatch", "Predictor", "default_patches_at_once", "part_sizes"]

Predictor = Callable[[torch.Tensor], torch.Tensor]


def part_sizes(batch: int, patches: int) -> list[int]:
    """The sizes of the parts :class:`PatchByPatch` cuts a batch of ``batch`` patches into:
    ``patches`` each, a last one smaller, but never a lone patch after others (it joins
    the last part).

    Why no lone patch: PyTorch runs a CPU convolution with oneDNN only for a batch of two or
    more (or a large enough input), and sends a single 96^3 patch to a fallback some twice as
    slow per patch; its sums also come in another order, so the patch's logits would differ
    in the last bits from those of the same patch in a batch. Parts of two or more give
    logits equal bit for bit to the whole batch's.
    """
    if batch <= patches:
        return [batch]
    sizes = [patches] * (batch // patches)
    rest = batch % patches
    if rest == 1 and patches > 1:
        sizes[-1] += 1
    elif rest:
        sizes.append(rest)
    return sizes


class PatchByPatch:
    """``network`` applied to a patch batch ``patches`` patches at a time (parts as
    :func:`part_sizes` cuts them).

    Why: the sliding window hands the network ``sw_batch_size`` patches at once (4 in the
    spleen bundle), and the network's activations grow with the batch while its result, the
    logits, is small: on a CPU, four 96^3 patches through the demo spleen UNet take some
    360 MiB at their peak, which is the node's own memory with the local backend. Run a part
    of the batch at a time and only that part's activations are alive; the logits of the
    parts, concatenated, are those of the whole batch, since the network is in eval mode
    (batch norm uses its running statistics, so each patch's output depends on that patch
    alone). The inferer sees the same function of the same batch: same windows, same
    ``sw_batch_size``, same blending.

    A batch that is one part (``patches`` or fewer, or one more) goes to the network as it
    is, and so does a batch that comes with positional arguments (an inferer ``with_coord``
    passes the batch's windows, which a part of the batch would not match); keyword
    arguments go to every part. Outputs may be a tensor, or a tuple, list or dict of
    tensors (concatenated item by item), as MONAI's inferers accept.
    """

    def __init__(self, network: Predictor, patches: int = 1) -> None:
        if patches < 1:
            raise ValueError(f"patches must be at least 1, not {patches}")
        self.network = network
        self.patches = patches

    def __call__(self, batch: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The network's output for ``batch`` (N, ...), computed part by part."""
        sizes = part_sizes(batch.shape[0], self.patches)
        if args or len(sizes) == 1:  # one part: the network's own output, not a copy of it
            return self.network(batch, *args, **kwargs)
        parts = torch.split(batch, sizes)
        first = self.network(parts[0], *args, **kwargs)
        if not isinstance(first, torch.Tensor):
            rest = [self.network(part, *args, **kwargs) for part in parts[1:]]
            return _concatenated([first, *rest])
        # Filled in place, so that the parts' logits are not held twice (parts and whole).
        out = first.new_empty((batch.shape[0], *first.shape[1:]))
        out[: first.shape[0]] = first
        start = first.shape[0]
        del first
        for part in parts[1:]:
            out[start : start + part.shape[0]] = self.network(part, *args, **kwargs)
            start += part.shape[0]
        return out


def _concatenated(outputs: list[Any]) -> Any:
    """The per-part outputs of a network that gives a tuple, list or dict, as one batch's."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, dict):
        return {key: _concatenated([o[key] for o in outputs]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_concatenated(list(items)) for items in zip(*outputs, strict=True))
    raise TypeError(f"cannot concatenate a network's outputs of type {type(first).__name__}")


def default_patches_at_once(device: str | torch.device) -> int | None:
    """How many patches a network sees at once on ``device`` by default, in process or
    served by Triton.

    Two on a CPU, for time and memory. The zoo's spleen UNet on two cores takes 0.11 s per
    96^3 patch in batches of two or three, 0.13 s in fours (the bundle's ``sw_batch_size``)
    and 0.16 s in fives or more: the larger batches' activations no longer stay in the
    caches. Two patches also take some 240 MiB of activations against some 360 MiB for
    four. Not one: PyTorch runs a CPU convolution with oneDNN only for a batch of two or
    more or a large enough input, so a single patch sends most of the UNet's layers to its
    im2col fallback, some twice as slow per patch. ``None`` (the whole batch) on a GPU,
    where batching is faster and the memory is not the node's.
    """
    return 2 if torch.device(device).type == "cpu" else None
