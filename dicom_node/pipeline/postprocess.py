"""From a bundle's logits to the label map and contours on the input grid.

For any bundle's own post transforms, :func:`run_postprocessing` runs them as MONAI's
``Compose`` does, but for an ``Invertd`` whose result is a label map (the argmax after it,
or a label map it inverts): :func:`invert_labels` computes that map from the model grid,
the same labels, voxel for voxel (see the section below). The zoo's CT bundles (softmax, a
trilinear ``Invertd`` of every class, argmax; or argmax and a nearest ``Invertd``) end so.

For the chain of the demo bundles (argmax, largest component, nearest inverse), two
implementations with one contract (see :func:`postprocess_monai`):

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

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import AFFINE_TOL
from monai.networks.utils import to_norm_affine
from monai.transforms import (
    AsDiscreted,
    Invertd,
    InvertibleTransform,
    KeepLargestConnectedComponent,
    LabelToContour,
    apply_transform,
)
from monai.transforms.utils import convert_applied_interp_mode
from monai.utils import TraceKeys, get_torch_dtype_from_string
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
            # MONAI annotates its result as an array or a tensor; a tensor gives a tensor.
            label = cast(torch.Tensor, largest(label))
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


def contours_of(labels: torch.Tensor, values: list[int]) -> np.ndarray:
    """:func:`in_plane_contours` of a whole (slices, rows, columns) label map, computed on the
    labels' bounding box, as a host array."""
    box = _bounding_box(labels > 0)
    if box is None:
        return np.zeros(tuple(labels.shape), dtype=np.uint8)
    return _to_host(in_plane_contours(labels[box], values), box, tuple(labels.shape))


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


# --- The bundle's own inverse of its preprocessing, label for label ------------------------
#
# Bundles such as the zoo's spleen and BTCV models end with a softmax, an Invertd that
# resamples every class's probability map back onto the series' grid by trilinear
# interpolation, and an argmax there. MONAI does that at the series' full size for every
# class (a 512x512x300 series is 78 M voxels a class), with torch's 3-D ``grid_sample``,
# which runs on one thread on a CPU. Here the same labels come from the model grid:
#
# * The interpolated value of a class at an output voxel is a sum of the class's values at
#   the eight corners of the model-grid cell the voxel falls in, with the same non-negative
#   weights for every class, added in the same order. If one class wins at each of the
#   eight corners (the first largest, as ``argmax`` chooses), it cannot lose the sum to a
#   later class (rounding is monotone), and it beats every earlier class as long as it beat
#   it at each corner by more than the sums' rounding can take away (``CERTAINTY_MARGIN``
#   of their magnitudes; the rounding of a sum of nine terms is a few 1e-7 of them). Such
#   a voxel's label is its cell's label, read by a gather, as a nearest-neighbour resample
#   reads it.
# * Every other voxel (where classes change, or win by a hair) is computed as MONAI
#   computes it: ``grid_sample`` on the same probabilities in the same precision, at the
#   same sample points, the points alone.
#
# The sample points are those of MONAI's ``SpatialResample``: the same matrix, normalised as
# its ``AffineTransform`` normalises it, and ``affine_grid`` evaluated along one line per
# axis (the matrix of a resample between two grids of the same orientation is diagonal, so
# each output axis reads one model axis). A mapping that is not diagonal, an operation
# other than Orientation and Spacing to undo, or an interpolation other than nearest and
# trilinear, returns ``None``: the caller runs MONAI's own transforms.

#: A class's win at a model voxel is certain when its score exceeds every earlier class's by
#: this fraction of their magnitudes (see above): far above the rounding of the sums
#: (~1e-7 in float32), far below any difference a network's scores mean something by.
CERTAINTY_MARGIN = 1e-5
#: Of two classes, the difference (second minus first) decides a label wherever it is
#: farther from zero than this fraction of the largest score's magnitude (see
#: :class:`_Difference`): fifty times what its rounding and that of MONAI's sums can move.
DIFFERENCE_MARGIN = 1e-4
#: A sample point this close (in model voxels) to a model voxel's plane is read as if it lay
#: on either side of it: the label comes from a gather only if it is the same there.
_NEAR_PLANE = 1e-3
#: The value of an uncertain voxel in the gathered map (labels are below it).
_UNCERTAIN = 255
#: Output voxels computed exactly in one ``grid_sample`` call (bounds its grid's memory).
_EXACT_CHUNK = 1 << 20
#: MONAI's trace names of the operations undone here.
_ORIENTATION = "Orientation"
_RESAMPLE = "SpatialResample"
#: The axis labels of RAS space, Orientation's (and every zoo bundle's) default.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class _AxisReads:
    """What one output axis reads of the model axis ``model_axis``.

    ``nearest``: the model index a nearest-neighbour resample reads per output index (-1
    outside the grid). ``cell``: the model-grid cell (index of its lower corner) the sample
    point falls in, ``span`` 2 where it lies so close to a plane that it may fall in the
    cell below as well (``cell`` is then the lower of the two). ``coords``: the point as
    ``grid_sample`` gets it (normalised, in the resample's precision).
    """

    model_axis: int
    nearest: torch.Tensor | None = None
    cell: torch.Tensor | None = None
    span: torch.Tensor | None = None
    coords: torch.Tensor | None = None

    def flipped(self) -> _AxisReads:
        def rev(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.flip(0)

        return _AxisReads(
            self.model_axis, rev(self.nearest), rev(self.cell), rev(self.span), rev(self.coords)
        )

    @property
    def length(self) -> int:
        """The size of the output axis: one read (an index or a point) per output index."""
        reads = self.coords if self.coords is not None else self.nearest
        assert reads is not None  # an axis reads by nearest index or by sample point
        return len(reads)


@dataclass(frozen=True)
class _Resample:
    """The inverse resample of a traced ``SpatialResample``, as separable per-axis reads."""

    mode: str
    padding_mode: str
    align_corners: bool
    dtype: torch.dtype
    axes: list[_AxisReads]  # one per output axis, in (x, y, z) order
    affine: np.ndarray  # the output grid's affine, as MONAI computes it


def invert_labels(
    values: torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    operations: Sequence[Mapping[str, Any]],
    *,
    argmax: bool,
    nearest_interp: bool = False,
    labels: Sequence[tuple[str, str]] = RAS_LABELS,
) -> torch.Tensor | None:
    """The label map MONAI's ``Invertd`` (then ``AsDiscreted(argmax=True)`` when ``argmax``)
    gives of ``values``, as a (slices, rows, columns) uint8 tensor on the grid the image had
    before ``operations``; ``None`` where this cannot compute it exactly.

    ``values`` is (C, x, y, z) on the model grid whose ``affine`` it has: class scores when
    ``argmax`` (probabilities or logits), else a one-channel label map (then the resample must
    be nearest-neighbour). ``operations`` are the image's applied operations as MONAI traced
    them (``MetaTensor.applied_operations``), in the order applied; ``nearest_interp`` is
    Invertd's. Orientation and a Spacing (``SpatialResample``) are undone; any other traced
    operation returns ``None``.
    """
    ops = [dict(op) for op in operations]
    if nearest_interp:
        ops = convert_applied_interp_mode(ops, mode="nearest", align_corners=None)
    names = [str(op.get(TraceKeys.CLASS_NAME)) for op in ops]
    if names not in ([], [_ORIENTATION], [_RESAMPLE], [_ORIENTATION, _RESAMPLE]):
        return None
    if values.ndim != 4 or (argmax and values.shape[0] > _UNCERTAIN):
        return None
    if not argmax and (values.shape[0] != 1 or float(values.max()) >= _UNCERTAIN):
        return None
    current = np.asarray(_numpy(affine), dtype=np.float64)
    shape = [int(n) for n in values.shape[1:]]
    resample = None
    if names[-1:] == [_RESAMPLE]:
        resample = _plan_resample(current, shape, ops[-1], values.device)
        if resample is None:
            return None
        if resample.mode == "bilinear" and not argmax:
            return None  # a label map interpolated: not a label map any more
        current = resample.affine
        shape = [a.length for a in resample.axes]
    # Output axis j (in x, y, z order) reads current axis order[j], reversed where flip[j].
    order, flip = [0, 1, 2], [False, False, False]
    if names[:1] == [_ORIENTATION]:
        order, flip = _orientation(current, ops[0], labels)
    if resample is None:
        reads = [
            _AxisReads(a, nearest=torch.arange(n, device=values.device))
            for a, n in enumerate(shape)
        ]
        mode = "nearest"
    else:
        reads, mode = resample.axes, resample.mode
    final = [reads[order[j]].flipped() if flip[j] else reads[order[j]] for j in range(3)]
    if mode == "nearest":
        model = _argmax(values) if argmax else values[0].round().to(torch.uint8)
    else:
        difference = _Difference(values) if values.shape[0] == 2 else None
        model = _certain_argmax(values, difference)
    out_shape = tuple(_length(final[j]) for j in (2, 1, 0))
    out = _zeros(out_shape, values.device)
    # Every label but the background comes from the model voxels in this box: outside it
    # every corner is a certain background, and so is every voxel that reads only those
    # (with zero padding too: the corners outside the grid add nothing to any class).
    box = _bounding_box(model != 0)
    if box is None:
        return out
    local, out_box, model_box = _restrict(final, box, [int(n) for n in model.shape])
    model = model[model_box]
    if mode == "nearest":
        out[out_box] = _gather_nearest(model, local)
        return out
    assert resample is not None
    block, slices = _gather_cells(model, local, uncertain_outside=resample.padding_mode != "border")
    _fill_uncertain(block, slices, values, local, resample, difference)
    out[out_box] = block
    return out


def _length(reads: _AxisReads) -> int:
    index = reads.nearest if reads.nearest is not None else reads.cell
    assert index is not None
    return len(index)


def _zeros(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A uint8 zero map: on a CPU from ``np.zeros``, whose pages the system maps lazily, so
    that only what is written costs memory and time."""
    if device.type == "cpu":
        return torch.from_numpy(np.zeros(shape, dtype=np.uint8))
    return torch.zeros(shape, dtype=torch.uint8, device=device)


def _restrict(
    final: list[_AxisReads], box: tuple[slice, ...], sizes: list[int]
) -> tuple[list[_AxisReads], tuple[slice, ...], tuple[slice, ...]]:
    """The reads of the output voxels that read a model voxel in ``box`` (per axis: those
    whose planes meet the box's), relative to the model planes they read.

    Returns the restricted reads, the output box (slices, rows, columns) and the model box
    (x, y, z) those reads are relative to.
    """
    local: list[_AxisReads] = []
    out_box: list[slice] = []
    model_box: list[slice] = [slice(0, n) for n in sizes]
    for reads in final:
        axis, size = reads.model_axis, sizes[reads.model_axis]
        lo, hi = box[axis].start, box[axis].stop - 1
        if reads.nearest is not None:
            first = last = reads.nearest
        else:
            assert reads.cell is not None and reads.span is not None
            first, last = reads.cell, reads.cell + reads.span
        touched = torch.nonzero((last.clamp(0, size - 1) >= lo) & (first.clamp(0, size - 1) <= hi))
        i0, i1 = int(touched[0]), int(touched[-1]) + 1
        plane_lo = max(0, int(first[i0:i1].min()))
        plane_hi = min(size, int(last[i0:i1].max()) + 1)
        model_box[axis] = slice(plane_lo, plane_hi)
        out_box.append(slice(i0, i1))
        if reads.nearest is not None:
            nearest = reads.nearest[i0:i1]
            shifted = torch.where(nearest < 0, nearest, nearest - plane_lo)
            local.append(_AxisReads(axis, nearest=shifted))
        else:
            assert reads.cell is not None and reads.span is not None and reads.coords is not None
            local.append(
                _AxisReads(
                    axis,
                    cell=reads.cell[i0:i1] - plane_lo,
                    span=torch.minimum(reads.span[i0:i1], plane_hi - (reads.cell[i0:i1])),
                    coords=reads.coords[i0:i1],
                )
            )
    return local, (out_box[2], out_box[1], out_box[0]), tuple(model_box)


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _plan_resample(
    src_affine: np.ndarray, src_shape: list[int], op: Mapping[str, Any], device: torch.device
) -> _Resample | None:
    """How the inverse of the traced resample ``op`` reads the model grid, axis by axis, or
    ``None`` when its matrix is not diagonal or its interpolation not handled here.

    What ``SpatialResample.inverse`` computes: the recorded source becomes the destination,
    the matrix is ``solve(src_affine, dst_affine)``, normalised and index-reversed as
    ``AffineTransform`` does it, in the resample's precision.
    """
    extra = op[TraceKeys.EXTRA_INFO]
    mode = str(getattr(extra["mode"], "value", extra["mode"]))
    padding = str(getattr(extra["padding_mode"], "value", extra["padding_mode"]))
    align = extra.get("align_corners")
    align = False if align in (None, TraceKeys.NONE) else bool(align)
    dtype = get_torch_dtype_from_string(str(extra["dtype"]))
    if mode not in ("nearest", "bilinear"):
        return None
    if mode == "bilinear" and padding not in ("border", "zeros"):
        return None
    dst_affine = np.asarray(_numpy(extra["src_affine"]), dtype=np.float64)
    dst_shape = [int(n) for n in op[TraceKeys.ORIG_SIZE]]
    xform = np.linalg.solve(src_affine, dst_affine)
    unchanged = (
        np.allclose(src_affine, dst_affine, atol=AFFINE_TOL)
        or np.allclose(xform, np.eye(4), atol=AFFINE_TOL)
    ) and src_shape == dst_shape
    if unchanged:  # MONAI returns the image as it is
        axes = [
            _AxisReads(a, nearest=torch.arange(n, device=device)) for a, n in enumerate(src_shape)
        ]
        return _Resample("nearest", padding, align, dtype, axes, src_affine)
    theta = to_norm_affine(
        torch.as_tensor(xform, dtype=dtype, device=device)[None], src_shape, dst_shape, align
    )
    reverse = [2, 1, 0]  # AffineTransform(reverse_indexing=True)
    theta[:, :3] = theta[:, reverse]
    theta[:, :, :3] = theta[:, :, reverse]
    linear = theta[0, :3, :3]
    if bool((linear - torch.diag(torch.diagonal(linear))).any()):
        return None  # each output axis must read one model axis, and the same one
    axes = []
    for axis in range(3):
        coord = 2 - axis  # grid coordinates are (z, y, x) of the (x, y, z) tensor
        line = [1, 1, 1]
        line[axis] = dst_shape[axis]
        with warnings.catch_warnings():
            # unit-size dimensions with align_corners: their coordinate is multiplied by the
            # matrix's zeros, whatever torch puts there
            warnings.filterwarnings("ignore", "Since version 1.3.0, affine_grid", UserWarning)
            grid = torch.nn.functional.affine_grid(theta[:, :3], [1, 1, *line], align_corners=align)
        coords = grid[..., coord].reshape(-1)
        if mode == "nearest":
            probe_shape = [1, 1, 1]
            probe_shape[axis] = src_shape[axis]
            probe = torch.arange(1, src_shape[axis] + 1, dtype=dtype, device=device)
            point = torch.zeros_like(grid)
            point[..., coord] = grid[..., coord]
            sampled = torch.nn.functional.grid_sample(
                probe.reshape(1, 1, *probe_shape),
                point,
                mode="nearest",
                padding_mode=padding,
                align_corners=align,
            )
            axes.append(_AxisReads(axis, nearest=sampled.reshape(-1).to(torch.int64) - 1))
        else:
            cell, span = _cells(coords, src_shape[axis], padding, align)
            axes.append(_AxisReads(axis, cell=cell, span=span, coords=coords))
    # The output grid's affine as track_transform_meta composes it.
    return _Resample(mode, padding, align, dtype, axes, src_affine @ xform)


def _cells(
    coords: torch.Tensor, size: int, padding: str, align: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model-grid cell each normalised coordinate falls in, as ``grid_sample`` finds it
    (its unnormalisation and border clamp), widened to two cells near a plane."""
    g = coords.to(torch.float64)
    index = ((g + 1) / 2) * (size - 1) if align else ((g + 1) * size - 1) / 2
    if padding == "border":
        index = index.clamp(0, size - 1)
    nearest = torch.round(index)
    near = (index - nearest).abs() < _NEAR_PLANE
    cell = torch.where(near, nearest - 1, torch.floor(index))
    # Outside [-1, size - 1] a cell has no corner inside the grid; one at -1 or size - 1
    # stands for all of them (their voxels are computed exactly under zero padding).
    cell = cell.clamp(-1, size - 1).to(torch.int64)
    span = torch.where(near, 2, 1).to(torch.int64)
    span = torch.minimum(span, size - cell)  # cell + span - 1 <= size - 1
    return cell, span


def _orientation(
    affine: np.ndarray, op: Mapping[str, Any], labels: Sequence[tuple[str, str]]
) -> tuple[list[int], list[bool]]:
    """What ``Orientation.inverse`` does to an image with ``affine``: output axis j is
    current axis ``order[j]``, reversed where ``flip[j]``."""
    original = np.asarray(_numpy(op[TraceKeys.EXTRA_INFO]["original_affine"]), np.float64)
    axcodes = nib.orientations.aff2axcodes(original, labels=labels)
    src = nib.io_orientation(affine)
    dst = nib.orientations.axcodes2ornt(axcodes, labels=labels)
    ornt = nib.orientations.ornt_transform(src, dst)
    order = [int(a) for a in np.argsort(ornt[:, 0])]
    return order, [bool(ornt[a, 1] == -1) for a in order]


def _certain_argmax(values: torch.Tensor, difference: _Difference | None = None) -> torch.Tensor:
    """Each model voxel's first largest class, or ``_UNCERTAIN`` where it does not beat
    every earlier class by ``CERTAINTY_MARGIN`` of their magnitudes (with two classes'
    ``difference``: of the largest magnitude, :attr:`_Difference.band`)."""
    if difference is not None:
        label = (difference.scores > 0).to(torch.uint8).mul_(_UNCERTAIN)  # uncertain unless
        label[difference.scores > difference.band] = 1  # the second class wins by the band
        return label
    if values.shape[0] == 2:  # most bundles: one organ
        first, second = values[0], values[1]
        gap = second - first
        magnitude = (first.abs() + second.abs()).mul_(CERTAINTY_MARGIN)
        label = (gap > 0).to(torch.uint8).mul_(_UNCERTAIN)  # uncertain unless ...
        label[gap > magnitude] = 1  # ... the second class wins by the margin
        return label
    best = values[0]
    runner_up = torch.full_like(best, -torch.inf)  # the largest earlier class
    label = torch.zeros(best.shape, dtype=torch.uint8, device=values.device)
    for value in range(1, values.shape[0]):
        score = values[value]
        better = score > best
        runner_up = torch.where(better, best, runner_up)
        best = torch.maximum(best, score)
        label.masked_fill_(better, value)
    gap = best - runner_up
    certain = (label == 0) | (gap > CERTAINTY_MARGIN * (best.abs() + runner_up.abs()))
    return label.masked_fill_(~certain, _UNCERTAIN)


def _model_order(model: torch.Tensor, final: list[_AxisReads]) -> torch.Tensor:
    """``model`` (x, y, z) with its axes in the order the output's (z, y, x) read them."""
    return model.permute(final[2].model_axis, final[1].model_axis, final[0].model_axis)


def _gather_nearest(model: torch.Tensor, final: list[_AxisReads]) -> torch.Tensor:
    """The (slices, rows, columns) map whose voxels read ``model`` where ``final`` says."""
    out = _model_order(model, final).contiguous()
    for dim, reads in ((2, final[0]), (1, final[1]), (0, final[2])):
        assert reads.nearest is not None
        padded = torch.nn.functional.pad(out.movedim(dim, 0), (0, 0, 0, 0, 1, 0)).movedim(0, dim)
        out = padded.index_select(dim, reads.nearest + 1)  # index -1 reads the zero plane
    return out


def _merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` where it equals ``b``, else uncertain."""
    return a.masked_fill(a != b, _UNCERTAIN)


def _take(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``t.index_select(dim, index)``; on a CPU by numpy, whose ``take`` copies whole rows
    where torch gathers element by element (several times faster along inner axes)."""
    if t.device.type == "cpu":
        return torch.from_numpy(np.take(t.numpy(), index.numpy(), axis=dim))
    return t.index_select(dim, index)


def _cells_along(
    corners: torch.Tensor, dim: int, reads: _AxisReads, uncertain_outside: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``corners`` with their next neighbour along ``dim``: the labels of the cells of
    that axis (``cells[k]``: the cell whose lower corner is k - 1, the first and last ones
    reaching outside the grid), then, for the points near a plane, the pairs of cells
    (c, c + 1) they may fall in, each once. Returns the cells and each output index's cell
    along ``dim``."""
    n = corners.shape[dim]
    if uncertain_outside:
        edge = torch.full_like(corners.narrow(dim, 0, 1), _UNCERTAIN)
        padded = torch.cat([edge, corners, edge], dim)
    else:
        padded = torch.cat([corners.narrow(dim, 0, 1), corners, corners.narrow(dim, n - 1, 1)], dim)
    cells = _merge(padded.narrow(dim, 0, n + 1), padded.narrow(dim, 1, n + 1))
    assert reads.cell is not None and reads.span is not None
    choice = reads.cell + 1
    near = reads.span == 2
    if bool(near.any()):
        starts = torch.unique(reads.cell[near])
        pairs = _merge(cells.index_select(dim, starts + 1), cells.index_select(dim, starts + 2))
        cells = torch.cat([cells, pairs], dim)
        choice[near] = n + 1 + torch.searchsorted(starts, reads.cell[near])
    return cells, choice


def _gather_cells(
    model: torch.Tensor, final: list[_AxisReads], uncertain_outside: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (slices, rows, columns) map of each output voxel's cell label: the label of the
    cell's corners where they agree (all of the cells a point near a plane may fall in),
    else ``_UNCERTAIN``; and which output slices hold an uncertain voxel.

    Corners outside the grid count as uncertain under zero padding and as their neighbour
    inside under border padding (their weight is zero there). The cells are merged on the
    model grid, one axis after the other (merging is associative), and read by one gather
    per axis, the columns first: the largest gathers copy whole rows and planes.
    """
    cells = _model_order(model, final).contiguous()
    choices = []
    for dim, reads in ((2, final[0]), (1, final[1]), (0, final[2])):
        cells, choice = _cells_along(cells, dim, reads, uncertain_outside)
        choices.append(choice)
    columns, rows, planes = choices
    slices = (cells == _UNCERTAIN).flatten(1).any(1).index_select(0, planes)
    out = _take(_take(_take(cells, columns, 2), rows, 1), planes, 0)
    return out, slices


def _axis_weights(
    reads: _AxisReads, size: int, resample: _Resample
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per output index: the lower corner and the two linear weights, computed as
    ``grid_sample``'s CPU kernel computes them from a coordinate (unnormalise, clamp to the
    border, floor; ``(i0 + 1) - i`` and ``i - i0``), in the resample's precision."""
    assert reads.coords is not None
    g = reads.coords
    if resample.align_corners:
        index = ((g + 1) / 2) * (size - 1)
    else:
        index = ((g + 1) * size - 1) / 2
    if resample.padding_mode == "border":
        index = torch.clamp(index, 0, size - 1)
    low = torch.floor(index)
    return low.to(torch.int64), (low + 1) - index, index - low


def _trilinear_points(
    values: torch.Tensor,
    position: list[torch.Tensor],
    final: list[_AxisReads],
    resample: _Resample,
) -> torch.Tensor:
    """Every class of ``values`` (C, x, y, z) interpolated at output points, bit for bit as
    torch's CPU ``grid_sample`` (trilinear) computes them: its weights, its corner order, its
    sums, in the resample's precision. ``position`` holds the points' output (z, y, x)
    indices. Returns (C, points) in float32, as MONAI's resample casts them.

    Why not ``grid_sample`` itself: its 3-D CPU kernel runs on one thread and would read the
    classes in the resample's precision as a copy of the whole model grid.
    """
    shape = values.shape[1:]
    strides = (shape[1] * shape[2], shape[2], 1)  # of the model axes in a flat class map
    zeros = resample.padding_mode == "zeros"
    # grid_sample's (x, y, z) are the tensor's last, middle and first model axes: per kernel
    # axis, for each of its two corners, the flat offset, the weight and whether inside.
    corners: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {}
    for dim, reads in zip((2, 1, 0), final, strict=True):
        size = int(shape[reads.model_axis])
        low, w_low, w_high = _axis_weights(reads, size, resample)
        at = position[dim]
        low = low[at]
        pair = []
        for index, weight in ((low, w_low[at]), (low + 1, w_high[at])):
            offset = index.clamp(0, size - 1) * strides[reads.model_axis]
            inside = ((index >= 0) & (index < size)) if zeros else None
            pair.append((offset, weight, inside))
        corners[2 - reads.model_axis] = pair
    classes = [values[c].reshape(-1) for c in range(values.shape[0])]
    sums: list[torch.Tensor | None] = [None] * len(classes)
    # tnw, tne, tsw, tse, bnw, bne, bsw, bse: x fastest, then y, then z
    for oz, wz, iz in corners[2]:
        for oy, wy, iy in corners[1]:
            for ox, wx, ix in corners[0]:
                weight = wx * wy * wz
                if zeros:  # a corner outside adds nothing (border: its weight is zero)
                    assert ix is not None and iy is not None and iz is not None  # set for zeros
                    weight = torch.where(ix & iy & iz, weight, torch.zeros_like(weight))
                voxel = oz + oy + ox
                for c, flat in enumerate(classes):
                    term = flat.index_select(0, voxel).to(resample.dtype).mul_(weight)
                    acc = sums[c]
                    sums[c] = term if acc is None else acc.add_(term)
    return torch.stack([s.to(torch.float32) for s in sums if s is not None])


def _first_argmax(scores: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(scores, dim=0)`` as uint8 for (C, points): the first largest class.
    One comparison per class: torch reduces a short leading axis slowly."""
    best = scores[0]
    label = torch.zeros(best.shape, dtype=torch.uint8, device=scores.device)
    for value in range(1, scores.shape[0]):
        better = scores[value] > best
        label[better] = value
        best = torch.where(better, scores[value], best)
    return label


def _fill_uncertain(
    out: torch.Tensor,
    slices: torch.Tensor,
    values: torch.Tensor,
    final: list[_AxisReads],
    resample: _Resample,
    difference: _Difference | None = None,
) -> None:
    """Compute the uncertain voxels of ``out`` (in the output ``slices`` flagged) as MONAI
    does: every class interpolated at their sample points, then the float32 argmax.

    With two classes' ``difference`` on a CPU, a voxel where it is clearly positive or
    negative takes its label from that sign, and only the others are computed with
    ``grid_sample``'s arithmetic."""
    flagged = torch.nonzero(slices).reshape(-1).tolist()
    if not flagged:
        return
    rows, columns = out.shape[1], out.shape[2]
    plane = rows * columns
    if difference is not None and values.device.type == "cpu":
        difference.read_at(final, resample, columns)
    else:
        difference = None
    step = max(1, _EXACT_CHUNK // plane)
    for first in range(flagged[0], flagged[-1] + 1, step):
        block = out[first : first + step].reshape(-1)  # a view: written in place
        where = _flat_nonzero(block, _UNCERTAIN)
        if len(where) == 0:
            continue
        z, p = where // plane + first, where % plane
        if difference is None:
            labels = _exact_labels(values, [z, p // columns, p % columns], final, resample)
        else:
            gap = difference(z, p)
            labels = (gap > 0).to(torch.uint8)
            close = _flat_nonzero(gap.abs_() <= difference.band, True)
            if len(close):
                z, p = z.index_select(0, close), p.index_select(0, close)
                exact = _exact_labels(values, [z, p // columns, p % columns], final, resample)
                labels.index_copy_(0, close, exact)
        block[where] = labels


def _flat_nonzero(values: torch.Tensor, value: int | bool) -> torch.Tensor:
    """The indices where a 1-D tensor equals ``value``; on a CPU by numpy (~5x faster)."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(values.numpy() == value))
    return torch.nonzero(values == value).reshape(-1)


def _exact_labels(
    values: torch.Tensor, position: list[torch.Tensor], final: list[_AxisReads], resample: _Resample
) -> torch.Tensor:
    """The labels MONAI computes at output points (``position``: their (z, y, x) indices)."""
    if values.device.type == "cpu":
        scores = _trilinear_points(values, position, final, resample)
    else:  # the device's own kernel, at the points
        scores = _grid_sample_points(values, position, final, resample)
    return _first_argmax(scores)


class _Difference:
    """Of two classes' scores, the second's minus the first's: on the model grid, and
    interpolated at output points in float32 in an order of its own; the label wherever it
    is farther from zero than :attr:`band`.

    Why that holds: the two interpolated scores MONAI compares are sums of the same
    non-negative weights (at most 1 in all) times each class's scores, so each lies within
    ``M``, the largest score's magnitude, and its rounding to float32 moves it by at most
    6e-8 ``M``. The difference computed here (the scores' difference rounded once to
    float32, weights rounded to float32, eight products and their sum in float32) is
    within 2e-6 ``M`` of the exact one. :attr:`band` is ``DIFFERENCE_MARGIN`` (1e-4) of
    ``M``, some fifty times both errors: outside it, the difference has the sign of the
    difference of MONAI's two float32 sums, which cannot be zero there (a tie goes to the
    first class, as torch's argmax gives it, only inside the band, where MONAI's arithmetic
    decides). On the model grid, a voxel whose difference exceeds the band is a certain
    win of the second class for :func:`_certain_argmax`: at a point whose eight corners all
    are, the weights sum to 1 and the difference exceeds the band there too.

    The sample points are those of the exact computation: per axis the lower corner and the
    two weights of ``grid_sample``'s kernel (:func:`_axis_weights`), a corner outside the
    grid weighing nothing.
    """

    def __init__(self, values: torch.Tensor) -> None:
        self.scores = values[1] - values[0]
        low, high = torch.aminmax(values)
        #: The distance from zero beyond which the difference's sign is the label's.
        self.band = DIFFERENCE_MARGIN * max(abs(float(low)), abs(float(high)))
        self._planes: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._in_plane: list[tuple[torch.Tensor, torch.Tensor]] = []

    def read_at(self, final: list[_AxisReads], resample: _Resample, columns: int) -> None:
        """Prepare to read at the output points of ``final`` (of ``columns`` columns): per
        output axis, both corners' flat offsets into the model grid and their weights; the
        in-plane ones as tables over (row, column), flattened as an output plane is."""
        shape = self.scores.shape
        strides = (shape[1] * shape[2], shape[2], 1)
        axes = []
        for reads in (final[2], final[1], final[0]):
            size, stride = int(shape[reads.model_axis]), strides[reads.model_axis]
            lower, w_lower, w_upper = _axis_weights(reads, size, resample)
            corners = []
            for index, weight in ((lower, w_lower), (lower + 1, w_upper)):
                inside = (index >= 0) & (index < size)
                weight = torch.where(inside, weight, torch.zeros_like(weight))
                offset = index.clamp(0, size - 1) * stride
                corners.append((offset, weight.to(torch.float32)))
            axes.append(corners)
        self._planes = axes[0]
        self._in_plane = [
            (
                (rows_offset[:, None] + columns_offset[None, :]).reshape(-1),
                (rows_weight[:, None] * columns_weight[None, :]).reshape(-1),
            )
            for rows_offset, rows_weight in axes[1]
            for columns_offset, columns_weight in axes[2]
        ]
        assert len(axes[2][0][0]) == columns

    def __call__(self, z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The difference at the points of output planes ``z`` and in-plane indices ``p``."""
        scores = self.scores.reshape(-1)
        corners = [(o.index_select(0, p), w.index_select(0, p)) for o, w in self._in_plane]
        total = None
        for offset, weight in self._planes:
            at, part = offset.index_select(0, z), None
            for in_offset, in_weight in corners:
                term = scores.index_select(0, in_offset + at).mul_(in_weight)
                part = term if part is None else part.add_(term)
            assert part is not None
            part.mul_(weight.index_select(0, z))
            total = part if total is None else total.add_(part)
        assert total is not None
        return total


def _grid_sample_points(
    values: torch.Tensor,
    position: list[torch.Tensor],
    final: list[_AxisReads],
    resample: _Resample,
) -> torch.Tensor:
    """Every class of ``values`` interpolated at output points by ``grid_sample`` itself
    (a GPU's kernel, whose arithmetic may fuse what the CPU's rounds twice); (C, points)."""
    grid = torch.empty((1, 1, 1, len(position[0]), 3), dtype=resample.dtype, device=values.device)
    for dim, reads in zip((2, 1, 0), final, strict=True):
        assert reads.coords is not None
        grid[0, 0, 0, :, 2 - reads.model_axis] = reads.coords[position[dim]]
    sampled = torch.nn.functional.grid_sample(
        values.to(resample.dtype)[None],
        grid,
        mode="bilinear",
        padding_mode=resample.padding_mode,
        align_corners=resample.align_corners,
    )
    return sampled[0, :, 0, 0].to(torch.float32)


def run_postprocessing(
    transforms: Sequence[Callable[[dict[str, Any]], dict[str, Any]]],
    data: dict[str, Any],
    *,
    inverse: InvertibleTransform | None = None,
    exact: bool = True,
) -> dict[str, Any]:
    """A bundle's postprocessing ``transforms`` applied to ``data`` as ``Compose`` applies
    them, with each ``Invertd`` followed by ``AsDiscreted(argmax=True)`` (and each one that
    inverts a one-channel label map) computed by :func:`invert_labels`, where it can.

    ``inverse`` replaces the transform each ``Invertd`` undoes (the fast path's image carries
    the trace of :attr:`Preprocess.inverse`, not of the bundle's own preprocessing);
    ``exact=False`` runs every transform as MONAI's (the reference). The label map such an
    ``Invertd`` leaves is (1, x, y, z) uint8 when nothing but writers follows, else float32
    as MONAI's.
    """
    # Any callable: a copied Invertd takes the place of its original below.
    steps: list[Callable[..., Any]] = list(transforms)
    i = 0
    while i < len(steps):
        step, following = steps[i], steps[i + 1] if i + 1 < len(steps) else None
        if isinstance(step, Invertd):
            taken = _inverted(step, following, data) if exact else 0
            if taken:
                if steps[i + taken :]:
                    key = cast(str, step.keys[0])  # MONAI types keys Hashable; these are str
                    data[key] = data[key].to(torch.float32)
                i += taken
                continue
            if inverse is not None:
                step = copy.copy(step)
                step.transform = inverse
        # A list only where the data is a list (of dictionaries); here it is one.
        data = cast("dict[str, Any]", apply_transform(step, data))
        i += 1
    return data


def _inverted(step: Invertd, following: Any, data: dict[str, Any]) -> int:
    """Compute ``step`` (and ``following``, when it is the argmax of what ``step`` gives) by
    :func:`invert_labels` into ``data``; the number of transforms done, 0 where it cannot."""
    if len(step.keys) != 1 or step.device[0] is not None or step.post_func[0] is not None:
        return 0
    # MONAI types keys Hashable; the keys of ``data`` are str.
    key, orig_key = cast(str, step.keys[0]), cast(str, step.orig_keys[0])
    image, values = data.get(orig_key), data.get(key)
    if not isinstance(image, MetaTensor) or not isinstance(values, torch.Tensor):
        return 0
    argmax = _is_argmax(following, key)
    if not argmax and values.shape[0] != 1:
        return 0
    scores = values.as_tensor() if isinstance(values, MetaTensor) else values
    labels = invert_labels(
        scores.to(torch.float32),
        image.affine,
        image.applied_operations,
        argmax=argmax,
        nearest_interp=bool(step.nearest_interp[0]),
    )
    if labels is None:
        return 0
    meta = copy.deepcopy(image.meta)
    meta.pop("affine", None)
    original = meta.get("original_affine", image.affine)
    data[key] = MetaTensor(labels.permute(2, 1, 0)[None], affine=original, meta=meta)
    return 2 if argmax else 1


def _is_argmax(step: Any, key: str) -> bool:
    """Whether ``step`` is ``AsDiscreted(keys=key, argmax=True)`` and nothing more."""
    if not isinstance(step, AsDiscreted) or tuple(step.keys) != (key,):
        return False
    kwargs = step.converter.kwargs
    return (
        step.argmax[0] is True
        and step.to_onehot[0] is None
        and step.threshold[0] is None
        and step.rounding[0] is None
        and kwargs.get("dim", 0) == 0
        and kwargs.get("keepdim", True) is True
    )
