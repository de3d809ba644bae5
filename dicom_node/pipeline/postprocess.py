"""From a bundle's logits to the label map and contours on the input grid.

Two implementations with one contract (see :func:`postprocess_monai`):

* :func:`postprocess_monai` chains MONAI's transforms: argmax, KeepLargestConnectedComponent,
  SpatialResample (nearest) back onto the input grid and LabelToContour on every slice. It is the
  reference, and the fallback for geometries the fast path does not handle.
* :func:`postprocess_fast` gives the same arrays for a fraction of the CPU time. MONAI's resample
  builds a float32 sampling grid of three coordinates per output voxel (a 512x512x200 series is
  52 M voxels, 600 MB of grid) and its contour convolves a float copy of every label over the
  whole volume, although the organ fills a few percent of it. Orientation and Spacing change
  the grid only by an axis permutation, flips, scaling and a shift, so each output axis reads
  one input axis: the nearest-neighbour resample is then a gather with three 1-D index arrays,
  done only over the organ's bounding box. The index arrays come from torch's own
  ``affine_grid``/``grid_sample`` evaluated along one line per axis with the matrix MONAI
  computes, so a voxel centre that falls exactly halfway between two model voxels (a 0.75 mm
  series on a 1.5 mm model grid has one on every other plane) rounds as MONAI rounds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from monai.data import MetaTensor
from monai.networks.utils import to_norm_affine
from monai.transforms import KeepLargestConnectedComponent, LabelToContour
from scipy import ndimage

from dicom_node.pipeline.transforms import INPUT_AFFINE, INPUT_SHAPE, resample_to_input

#: Largest off-axis coefficient of the model-to-input voxel mapping that still counts as zero:
#: an oblique mapping (not a permutation with scaling) is left to MONAI's resample.
AXIS_ALIGNED_TOL = 1e-6
#: 26-connectivity, what KeepLargestConnectedComponent uses by default (connectivity=None).
_FULL_3D = np.ones((3, 3, 3), dtype=bool)


class Postprocessed(NamedTuple):
    """uint8 (slices, rows, columns) label map and in-plane contours on the input grid
    (``None`` when not asked for)."""

    labels: np.ndarray
    contours: np.ndarray | None


def postprocess_monai(
    logits: torch.Tensor,
    image: MetaTensor,
    label_values: Sequence[int],
    contours: bool = True,
    keep_largest: bool = True,
) -> Postprocessed:
    """Labels and contours of ``logits`` with MONAI's transforms (the reference).

    ``logits`` is (num_classes, x, y, z) on the grid of ``image``, the preprocessed image
    (whose meta records the input grid). argmax, with ``keep_largest`` the largest
    26-connected component of each label in ``label_values``, nearest-neighbour resampling back to the input grid, then the
    in-plane contour of every label on every slice: a label voxel with any of its 8 in-plane
    neighbours outside the label (or outside the image).
    """
    largest = KeepLargestConnectedComponent(
        applied_labels=sorted(label_values), is_onehot=False, independent=True
    )
    with torch.inference_mode():
        label = torch.argmax(logits, dim=0, keepdim=True).to(torch.uint8)
        if keep_largest:
            label = largest(label)
        labels = resample_to_input(torch.as_tensor(label), image).to(torch.uint8)
        if not contours:
            return Postprocessed(labels.cpu().numpy(), None)
        # Slices as channels of a 2-D image: LabelToContour then outlines each slice on its
        # own, which is what a planar RTSTRUCT contour needs (a 3-D contour would mark the
        # whole top and bottom slice of an organ).
        outlines = torch.zeros_like(labels)
        to_contour = LabelToContour()
        for value in label_values:
            mask = (labels == value).to(torch.float32)
            if mask.any():
                outlines[torch.as_tensor(to_contour(mask)) > 0] = value
        return Postprocessed(labels.cpu().numpy(), outlines.cpu().numpy())


def postprocess_fast(
    logits: torch.Tensor,
    image: MetaTensor,
    label_values: Sequence[int],
    contours: bool = True,
    keep_largest: bool = True,
) -> Postprocessed:
    """The arrays of :func:`postprocess_monai`, computed on the organs' bounding box only.

    Runs on ``logits``' device; the connected components are labelled by scipy on the CPU and
    by CuPy (when installed) on a GPU. A mapping between the model and input grids that
    is oblique falls back to MONAI's resample. From a GPU only the bounding box travels back
    to the host: the rest of the map is zeros.
    """
    values = sorted(int(v) for v in label_values)
    with torch.inference_mode():
        label = _argmax(logits)  # (x, y, z) on the model grid
        if keep_largest:
            label = _keep_largest(label, values)
        mapping = _axis_mapping(label.shape, image, label.device)
        if mapping is None:
            labels = resample_to_input(label[None], image).to(torch.uint8)
            labels = labels.contiguous()
            box = (slice(None),) * 3
        else:
            labels, box = _gather(label, *mapping)
        shape = tuple(labels.shape)
        host = labels.numpy() if labels.device.type == "cpu" else _to_host(labels[box], box, shape)
        if not contours:
            return Postprocessed(host, None)
        return Postprocessed(host, _to_host(in_plane_contours(labels[box], values), box, shape))


def _to_host(block: torch.Tensor, box: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 host array of ``shape``, zero but for ``block`` at ``box``.

    ``np.zeros`` maps untouched pages lazily, so only the box costs memory and a copy: from
    a GPU, a few megabytes instead of the whole series' grid.
    """
    out = np.zeros(shape, dtype=np.uint8)
    out[box] = block.cpu().numpy()
    return out


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(logits, dim=0)`` as uint8, one class at a time.

    Hand-written because torch reduces a short leading axis of a large tensor slowly (~0.5 s
    for two classes on a 220x220x100 grid on two cores); comparing whole contiguous class
    volumes is memory-bound. A later class wins only when strictly greater, so ties go to the
    lowest class as with ``torch.argmax``.
    """
    best = logits[0]
    label = torch.zeros(best.shape, dtype=torch.uint8, device=logits.device)
    for value in range(1, logits.shape[0]):
        label[logits[value] > best] = value
        if value + 1 < logits.shape[0]:
            best = torch.maximum(best, logits[value])
    return label


def _keep_largest(label: torch.Tensor, values: list[int]) -> torch.Tensor:
    """Keep the largest 26-connected component of each label value, as MONAI would.

    Components are labelled on the label's bounding box only, by scipy on the CPU and by
    CuPy's port of scipy's ``label`` on a GPU (MONAI labels on the GPU only with cuCIM, and
    otherwise copies the whole volume to the host for scikit-image). Both number components
    in raster order of their first voxel, so the ranking, ties included, is the same.
    """
    for value in values:
        mask = label == value
        box = _bounding_box(mask)
        if box is None:
            continue
        # Cropping keeps the raster order in which components are numbered, so the counts
        # (and the choice between equal-sized components) are those of MONAI's full-size label.
        features, count = _components(mask[box])
        if count <= 1:
            continue
        counts = torch.bincount(features.reshape(-1)).cpu().numpy()
        counts[0] = 0
        keep = np.zeros(counts.shape[0], dtype=bool)
        keep[np.argsort(counts)[::-1][:1]] = True  # MONAI's ranking, ties included
        drop = ~torch.as_tensor(keep, device=label.device)[features] & mask[box]
        label[box][drop] = 0
    return label


def _components(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """26-connected components of a boolean ``mask`` as int64 labels, on its device."""
    if mask.device.type == "cuda":
        try:
            import cupy
            from cupyx.scipy import ndimage as cupy_ndimage
        except ImportError:
            pass
        else:
            with cupy.cuda.Device(mask.device.index or 0):
                features, count = cupy_ndimage.label(
                    cupy.from_dlpack(mask.to(torch.uint8).contiguous()),
                    structure=cupy.ones((3, 3, 3), dtype=bool),
                )
                return torch.from_dlpack(features).to(torch.int64), int(count)
    features, count = ndimage.label(mask.cpu().numpy(), structure=_FULL_3D)
    return torch.from_numpy(features).to(device=mask.device, dtype=torch.int64), int(count)


def _bounding_box(mask: np.ndarray | torch.Tensor) -> tuple[slice, ...] | None:
    """The smallest box holding every true voxel of ``mask``; ``None`` when there is none."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hit = mask.any(axis=others) if isinstance(mask, np.ndarray) else mask.any(dim=others)
        where = np.flatnonzero(hit) if isinstance(hit, np.ndarray) else torch.nonzero(hit)
        if len(where) == 0:
            return None
        box.append(slice(int(where[0]), int(where[-1]) + 1))
    return tuple(box)


def _axis_mapping(
    src_shape: Sequence[int], image: MetaTensor, device: torch.device | None = None
) -> tuple[list[int], list[torch.Tensor]] | None:
    """For each input axis (x, y, z), the model axis it reads and the model index per voxel.

    Index -1 marks an input voxel whose centre is outside the model grid (MONAI pads with 0).
    ``None`` when the mapping is oblique. The lines are sampled on ``device`` (default: the
    CPU), where MONAI would sample the full grid.
    """
    src_affine = image.affine.detach().cpu().numpy().astype(np.float64)
    dst_affine = np.asarray(image.meta[INPUT_AFFINE], dtype=np.float64)
    dst_shape = [int(n) for n in image.meta[INPUT_SHAPE]]
    # The matrix MONAI's SpatialResample hands to its AffineTransform, in the same precision.
    xform64 = np.linalg.solve(src_affine, dst_affine)
    linear = np.abs(xform64[:3, :3])
    axes = [int(a) for a in np.argmax(linear, axis=0)]  # model axis read by each input axis
    off_axis = linear.copy()
    off_axis[axes, range(3)] = 0.0
    if sorted(axes) != [0, 1, 2] or off_axis.max() > AXIS_ALIGNED_TOL * linear.max():
        return None
    xform = torch.as_tensor(xform64, dtype=torch.float32, device=device)[None]
    theta = to_norm_affine(xform, list(src_shape), dst_shape, align_corners=False)
    # AffineTransform(reverse_indexing=True): the spatial rows and columns in (z, y, x) order.
    reverse = [2, 1, 0]
    theta[:, :3] = theta[:, reverse]
    theta[:, :, :3] = theta[:, :, reverse]
    theta = theta[:, :3]
    indices = []
    for dst_axis, src_axis in enumerate(axes):
        # One line of the output along dst_axis: the sampling grid and nearest rounding of
        # torch's grid_sample for these voxels are those of the full-size resample.
        line = [1, 1, 1]
        line[dst_axis] = dst_shape[dst_axis]
        grid = torch.nn.functional.affine_grid(theta, [1, 1, *line], align_corners=False)
        coord = 2 - src_axis  # grid coordinates are (z, y, x)
        keep = torch.zeros(3, dtype=grid.dtype, device=grid.device)
        keep[coord] = 1.0
        grid = grid * keep  # the other coordinates at the centre of a size-1 probe
        probe_shape = [1, 1, 1]
        probe_shape[src_axis] = int(src_shape[src_axis])
        probe = torch.arange(1, src_shape[src_axis] + 1, dtype=torch.float32, device=device)
        sampled = torch.nn.functional.grid_sample(
            probe.reshape(1, 1, *probe_shape),
            grid,
            mode="nearest",
            padding_mode="zeros",
            align_corners=False,
        )
        indices.append(sampled.reshape(-1).to(torch.int64) - 1)
    return axes, indices


def _gather(
    label: torch.Tensor, axes: list[int], indices: list[torch.Tensor]
) -> tuple[torch.Tensor, tuple[slice, slice, slice]]:
    """The label map on the input grid as (slices, rows, columns), and the box it is non-zero in.

    Hand-written because MONAI's resample has no gather path: for each input axis only the
    voxels whose model index falls inside the labels' bounding box are read.
    """
    dst_shape = [len(i) for i in indices]  # (x, y, z) of the input grid
    out = torch.zeros(dst_shape[::-1], dtype=torch.uint8, device=label.device)
    src_box = _bounding_box(label > 0)
    if src_box is None:
        return out, (slice(0, 0),) * 3
    block = label[src_box]
    # One zero plane after the block on every axis: where out-of-box indices read.
    block = torch.nn.functional.pad(block, (0, 1, 0, 1, 0, 1))
    picks, dst_box = [], []
    for src_axis, index in zip(axes, indices, strict=True):
        lo, hi = src_box[src_axis].start, src_box[src_axis].stop
        inside = torch.nonzero((index >= lo) & (index < hi)).reshape(-1)
        if len(inside) == 0:
            return out, (slice(0, 0),) * 3
        span = slice(int(inside[0]), int(inside[-1]) + 1)
        local = index[span] - lo
        local[(local < 0) | (local >= hi - lo)] = hi - lo
        picks.append(local)
        dst_box.append(span)
    block = block.permute(*axes)  # axis k of block is now the model axis read by input axis k
    values = block[picks[0][:, None, None], picks[1][None, :, None], picks[2][None, None, :]]
    box = (dst_box[2], dst_box[1], dst_box[0])  # (slices, rows, columns)
    out[box] = values.permute(2, 1, 0)
    return out, box


def in_plane_contours(labels: torch.Tensor, values: list[int]) -> torch.Tensor:
    """In-plane 8-neighbour boundary of each label on each slice of a (slices, rows, cols) box.

    What LabelToContour's 3x3 Laplacian marks on a slice: a voxel of the label with a neighbour
    (edge or corner) that is not, pixels beyond the image counting as background. The box holds
    every labelled voxel, so zero padding around it is the same as the rest of the image.
    """
    contours = torch.zeros_like(labels)
    for value in values:
        mask = torch.nn.functional.pad((labels == value).to(torch.uint8), (1, 1, 1, 1)).bool()
        if not mask.any():
            continue
        # A 3x3 erosion as a row pass then a column pass.
        rows = mask[:, :, :-2] & mask[:, :, 1:-1] & mask[:, :, 2:]
        interior = rows[:, :-2] & rows[:, 1:-1] & rows[:, 2:]
        contours[mask[:, 1:-1, 1:-1] & ~interior] = value
    return contours
