"""The fast path's preprocessing: the bundle's Orientation, Spacing and ScaleIntensityRange.

MONAI's array transforms want the volume channel-first in (x, y, z) order, while a CT series
arrives as (slice, row, column). Handing MONAI the volume in its order costs a transposed
float copy of the full-resolution volume (and Orientation a flipped one) before Spacing reads
every voxel once more, three full passes over ~200 MB at 512x512x200, when Spacing then
keeps one voxel in ten or more.

:class:`Preprocess` therefore resamples the volume where it lies: MONAI computes the output
grid (Orientation and Spacing applied lazily, on the geometry alone), and the (slice, row,
column) volume is sampled onto it a slab at a time: as three linear passes when the grid's
axes follow the volume's (the common axial case), else with ``grid_sample`` as MONAI's
resampling calls it; spline orders go to MONAI's ``SpatialResample``. The sample points are
the same; only their rounding differs from the chained transforms, which moves an output
value by at most ~1e-4 of a HU window's range (tested). The intensity step is elementwise,
so it runs where the bundle puts it, before or after the resampling.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import cast

import numpy as np
import torch
from monai.config import DtypeLike
from monai.data import MetaTensor
from monai.transforms import Compose, Spacing, SpatialResample
from monai.utils import LazyAttr, TraceKeys

from dicom_node.common.heap import discard_leading
from dicom_node.pipeline.bundle import Preprocessing
from dicom_node.pipeline.transforms import (
    BUNDLE_SPACING_DTYPE,
    INPUT_AFFINE,
    INPUT_SHAPE,
    LPS_TO_RAS,
    image_transforms,
    intensity_transform,
    ras_affine,
    spatial_dict_transforms,
    spatial_transforms,
    to_metatensor,
)

#: What a pending operation holds beyond the trace an applied one leaves.
_LAZY_KEYS = frozenset(str(attr) for attr in LazyAttr)
#: Spacing modes resampled slab by slab (grid_sample's own); spline orders go to MONAI.
_SLAB_MODES = ("bilinear", "bicubic")
#: Bytes of float source slices one slab may hold (CPU): ~0.25 GB at most with its grid.
_SLAB_BYTES = 64 * 1024 * 1024


class Preprocess:
    """A bundle's preprocessing of a (slices, rows, columns) HU volume with an LPS affine.

    Without a Spacing step there is nothing to gain (Orientation alone is a flip), and
    with nearest-neighbour Spacing the rounding of a sample point lying half-way between two
    voxels (common: 1.625 = 13/8 voxels a step puts every eighth there) would pick the other
    voxel: in both cases MONAI's chain runs as the bundle states it.

    The image carries the trace MONAI's Orientation and Spacing would have left on it
    (``applied_operations``, recorded by :attr:`inverse`'s transforms run on the geometry
    alone, Spacing in the precision of the bundle's own ``Spacingd``), so that the
    bundle's ``Invertd`` undoes them as it undoes its own, with :attr:`inverse` for
    transform.
    """

    def __init__(self, pre: Preprocessing, image_key: str = "image") -> None:
        self.pre = pre
        self._chain = image_transforms(pre)
        self._key = image_key
        #: The transforms whose trace the preprocessed image carries, for ``Invertd``.
        self.inverse = Compose(spatial_dict_transforms(pre, image_key, BUNDLE_SPACING_DTYPE))
        spacing = next((t for t in spatial_transforms(pre) if isinstance(t, Spacing)), None)
        nearest = spacing is not None and str(spacing.sp_resample.mode) in ("nearest", "0")
        self._spacing = None if nearest else spacing
        self._intensity = intensity_transform(pre)
        order = pre.order
        self._intensity_first = (
            "intensity" in order
            and "spacing" in order
            and order.index("intensity") < order.index("spacing")
        )

    def __call__(
        self,
        hu: np.ndarray | torch.Tensor,
        affine: np.ndarray,
        device: torch.device,
        *,
        consume: bool = False,
    ) -> MetaTensor:
        """The preprocessed image (1, x, y, z) of ``hu`` (slices, rows, columns).

        ``consume`` says that ``hu`` is the caller's to give up: its pages are given back
        as soon as they are read (:func:`~dicom_node.common.heap.discard_leading`), whole once it
        is copied to a GPU, else slab by slab as the resampling passes them, so that the
        volume and the resampled image are not both held at the peak.
        """
        if self._spacing is None:
            image = self._chain(to_metatensor(hu, affine, device))
            _, _, operations = self._output_grid(
                image.meta[INPUT_AFFINE].numpy(), image.meta[INPUT_SHAPE]
            )
            image.applied_operations = operations
            return image
        if hu.ndim != 3:
            raise ValueError(
                f"expected a (slices, rows, columns) array, got shape {tuple(hu.shape)}"
            )
        if isinstance(hu, np.ndarray):
            hu = np.ascontiguousarray(hu)  # torch refuses negative strides (flipped views)
        volume = torch.as_tensor(hu).to(device=device)
        done: Callable[[int], object] | None = None
        if consume and isinstance(hu, np.ndarray):
            if volume.device.type == "cpu":
                done = functools.partial(discard_leading, hu)
            else:
                discard_leading(hu, len(hu))
        xyz = ras_affine(affine)
        xyz_shape = tuple(int(n) for n in reversed(volume.shape))
        dst_affine, dst_shape, operations = self._output_grid(xyz, xyz_shape)
        stored_affine = LPS_TO_RAS @ np.asarray(affine, np.float64)
        spacing = self._spacing.sp_resample
        if str(spacing.mode) in _SLAB_MODES:
            out = self._resample_in_slabs(volume, stored_affine, dst_affine, dst_shape, done)
        else:  # a spline order: MONAI's own resampling (it compiles for those)
            # MONAI annotates MetaTensor's affine as a tensor; it takes an array.
            stored: torch.Tensor = MetaTensor(
                volume.to(torch.float32)[None], affine=cast(torch.Tensor, stored_affine)
            )
            if self._intensity_first:
                stored = self._window(stored)
            resample = SpatialResample(
                mode=spacing.mode,
                padding_mode=spacing.padding_mode,
                align_corners=spacing.align_corners,
                # MONAI annotates dtype as numpy's; it takes torch dtypes.
                dtype=cast(DtypeLike, torch.float32),
            )
            out = torch.as_tensor(resample(stored, dst_affine=dst_affine, spatial_size=dst_shape))
            del stored
        if not self._intensity_first and self._intensity is not None:
            out = self._window(out)
        ras = torch.as_tensor(xyz, dtype=torch.float64)
        meta = {
            "space": "RAS",
            "original_affine": ras.clone(),
            INPUT_AFFINE: ras.clone(),
            INPUT_SHAPE: xyz_shape,
        }
        image = MetaTensor(torch.as_tensor(out), affine=dst_affine, meta=meta)
        image.applied_operations = operations
        return image

    def _resample_in_slabs(
        self,
        volume: torch.Tensor,
        stored_affine: np.ndarray,
        dst_affine: torch.Tensor,
        dst_shape: tuple[int, ...],
        done: Callable[[int], object] | None = None,
    ) -> torch.Tensor:
        """The output grid sampled from ``volume`` (slices, rows, columns), a few output
        planes at a time, each from a float copy of only the source slices it needs.

        ``done(n)`` is told, on the separable path, when the first ``n`` source slices will
        not be read again.

        ``SpatialResample`` would want the whole volume in float32 at once: twice the
        INT16 volume again, the largest allocation of a local segmentation (600 MiB at
        512x512x600). Here the float copy is a slab of the slices that one chunk of output
        planes falls between; the sample points and ``grid_sample`` are those of MONAI's
        resampling (the same mode, padding and corner convention), computed in float64.
        """
        assert self._spacing is not None  # only the resampling path (see __call__) comes here
        spacing = self._spacing.sp_resample
        align = bool(spacing.align_corners)
        slices, rows, columns = (int(n) for n in volume.shape)
        # output (x, y, z) index -> source (slice, row, column) index
        xform = np.linalg.solve(stored_affine, dst_affine.numpy())
        if (
            str(spacing.mode) == "bilinear"
            and str(spacing.padding_mode) in ("border", "zeros")
            and _axis_aligned(xform)
        ):
            return self._resample_separably(volume, xform, dst_shape, done)
        axis = int(np.argmax(np.abs(xform[0, :3])))  # the output axis that walks the slices
        # output planes a slab: as many as the source slices a budget holds, each plane
        # walking |d slice / d plane| slices (plus the interpolation's neighbours)
        budget = _SLAB_BYTES if volume.device.type == "cpu" else float("inf")
        per_plane = max(abs(float(xform[0, axis])), 1e-6)
        fits = (budget / (4 * rows * columns) - 4) / per_plane
        step = int(max(1, min(dst_shape[axis], fits)))
        out = torch.empty((1, *dst_shape), dtype=torch.float32, device=volume.device)
        ranges = [torch.arange(n, dtype=torch.float64, device=volume.device) for n in dst_shape]
        for start in range(0, dst_shape[axis], step):
            stop = min(dst_shape[axis], start + step)
            box = list(ranges)
            box[axis] = ranges[axis][start:stop]
            # The source index of every output point is affine in the output index: a sum
            # of one vector along each output axis, broadcast (no grid of indices, no
            # matrix product over it).
            terms = [
                [
                    (float(xform[d, a]) * box[a]).reshape([-1 if k == a else 1 for k in range(3)])
                    for a in range(3)
                ]
                for d in range(3)
            ]
            ends = [
                float(xform[0, 3]) + sum(float(t.min()) for t in terms[0]),
                float(xform[0, 3]) + sum(float(t.max()) for t in terms[0]),
            ]
            lo = int(np.clip(np.floor(ends[0]) - 1, 0, slices - 1))
            hi = int(np.clip(np.floor(ends[1]) + 2, 0, slices - 1))
            slab = volume[lo : hi + 1].to(torch.float32)[None, None]
            if self._intensity_first:
                slab = self._window(slab)
            # grid_sample takes (x, y, z) = (column, row, slice), normalised to [-1, 1]
            grid = torch.empty(
                (1, *(len(r) for r in box), 3), dtype=torch.float32, device=volume.device
            )
            for g, (d, offset, size) in enumerate(
                ((2, 0, columns), (1, 0, rows), (0, lo, hi - lo + 1))
            ):
                at = terms[d][0] + terms[d][1] + terms[d][2] + (float(xform[d, 3]) - offset)
                if align:
                    grid[0, ..., g] = at * (2 / max(size - 1, 1)) - 1
                else:
                    grid[0, ..., g] = (2 * at + 1) / size - 1
                del at
            index = [slice(None)] * 3
            index[axis] = slice(start, stop)
            out[(slice(None), *index)] = torch.nn.functional.grid_sample(
                slab,
                grid,
                mode=str(spacing.mode),
                padding_mode=str(spacing.padding_mode),
                align_corners=align,
            )[0]
            del slab, grid
        return out

    def _resample_separably(
        self,
        volume: torch.Tensor,
        xform: np.ndarray,
        dst_shape: tuple[int, ...],
        done: Callable[[int], object] | None = None,
    ) -> torch.Tensor:
        """Trilinear sampling as three linear ones, for a grid whose axes follow the
        volume's (the common case: an axial series, Orientation a flip of its axes).

        Trilinear interpolation is linear interpolation along each axis in turn, so the
        samples are those of ``grid_sample`` on the same points, summed in another order.
        Rows first, then columns, a few source slices at a time (the INT16 slices gathered
        before conversion), then along the slices: most of the work on the grid's few
        rows and columns rather than on every source voxel, and no float copy of the volume.
        """
        assert self._spacing is not None  # only the resampling path (see __call__) comes here
        spacing = self._spacing.sp_resample
        align = bool(spacing.align_corners)
        padding = str(spacing.padding_mode)
        sizes = tuple(int(n) for n in volume.shape)
        # source axis d is walked by output axis target[d], at pos[d] (source index units)
        target = [int(np.argmax(np.abs(xform[d, :3]))) for d in range(3)]
        pos = [
            float(xform[d, 3])
            + float(xform[d, target[d]])
            * torch.arange(dst_shape[target[d]], dtype=torch.float64, device=volume.device)
            for d in range(3)
        ]
        if align:  # grid_sample's corner convention, as the grid path normalises it
            pos = [p if n > 1 else torch.zeros_like(p) for p, n in zip(pos, sizes, strict=True)]
        s_lo, s_hi = _neighbours(pos[0], sizes[0])
        chunk = max(1, int(_SLAB_BYTES // (4 * sizes[1] * sizes[2])))
        # Each slab's planes are written where they go: a list joined at the end would hold
        # them twice for a moment.
        stack = torch.empty(
            (s_hi + 1 - s_lo, len(pos[1]), len(pos[2])), dtype=torch.float32, device=volume.device
        )
        for start in range(s_lo, s_hi + 1, chunk):
            stop = min(s_hi + 1, start + chunk)
            part = _lerp(volume[start:stop], 1, pos[1], sizes[1], padding, self._convert)
            stack[start - s_lo : stop - s_lo] = _lerp(part, 2, pos[2], sizes[2], padding)
            del part
            if done is not None:  # the slabs go front to back: these are read for good
                done(stop)
        out = _lerp(stack, 0, pos[0] - s_lo, sizes[0], padding, offset=s_lo)
        del stack
        # (slices, rows, columns) axes -> the output's (x, y, z)
        order = [target.index(a) for a in range(3)]
        return out.permute(*order).contiguous()[None]

    def _convert(self, voxels: torch.Tensor) -> torch.Tensor:
        """Source voxels to float32, through the intensity window when it comes first."""
        voxels = voxels.to(torch.float32)
        return self._window(voxels) if self._intensity_first else voxels

    def _window(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` through the bundle's ScaleIntensityRange (asked only where it has one)."""
        assert self._intensity is not None  # "intensity" is in the bundle's order
        # MONAI annotates its result as an array or a tensor; a tensor gives a tensor.
        return cast(torch.Tensor, self._intensity(image))

    def _output_grid(
        self, xyz_affine: np.ndarray, xyz_shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, tuple[int, ...], list[dict]]:
        """The grid Orientation and Spacing would give, computed by MONAI lazily: an expanded
        zero (no memory) stands for the voxels; and the trace they would leave (as applied).

        Each transform runs lazily on its own: a ``Compose(..., lazy=True)`` applies the
        pending operations when it ends, which resampled the whole (expanded, so first
        materialised) volume in float, 4.4 times its INT16 size at 512x512x600, for a
        grid that needs none of its voxels.
        """
        shell = MetaTensor(
            torch.zeros(1).expand(1, *xyz_shape),
            affine=torch.as_tensor(xyz_affine, dtype=torch.float64),
            meta={"space": "RAS"},
        )
        for transform in self.inverse.transforms:
            shell = transform({self._key: shell}, lazy=True)[self._key]
        affine = torch.as_tensor(shell.peek_pending_affine(), dtype=torch.float64)
        operations = []
        for pending in shell.pending_operations:
            op = {k: v for k, v in pending.items() if k not in _LAZY_KEYS}
            op[TraceKeys.LAZY] = False
            operations.append(op)
        return affine, tuple(int(n) for n in shell.peek_pending_shape()), operations


def _axis_aligned(xform: np.ndarray) -> bool:
    """Whether each source axis is walked by exactly one output axis (a permutation of
    scaled, possibly flipped, axes: no rotation)."""
    m = np.abs(xform[:3, :3])
    big = m > 1e-9 * m.max()
    return bool((big.sum(axis=0) == 1).all() and (big.sum(axis=1) == 1).all())


def _neighbours(pos: torch.Tensor, size: int) -> tuple[int, int]:
    """The first and last source index that linear interpolation at ``pos`` reads."""
    lo = int(np.clip(np.floor(float(pos.min())), 0, size - 1))
    hi = int(np.clip(np.floor(float(pos.max())) + 1, 0, size - 1))
    return lo, hi


def _lerp(
    x: torch.Tensor,
    axis: int,
    pos: torch.Tensor,
    size: int,
    padding: str,
    convert: Callable[[torch.Tensor], torch.Tensor] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``axis`` at ``pos`` (float64 source indices,
    ``offset`` being the index of ``x``'s first element along it, the full extent
    ``size``), padded as ``grid_sample`` pads: "border" clamps the position, "zeros" reads
    zero outside. ``convert`` turns the gathered values to float (INT16 voxels)."""
    full = pos + offset
    if padding == "border":
        full = full.clamp(0, size - 1)
    below = torch.floor(full)
    frac = (full - below).to(torch.float32)
    i0 = below.to(torch.int64)
    i1 = i0 + 1
    w0, w1 = 1 - frac, frac
    if padding == "zeros":
        w0 = w0 * ((i0 >= 0) & (i0 < size))
        w1 = w1 * ((i1 >= 0) & (i1 < size))
    shape = [1] * x.ndim
    shape[axis] = -1
    first = x.index_select(axis, (i0.clamp(0, size - 1) - offset).clamp(0, x.shape[axis] - 1))
    second = x.index_select(axis, (i1.clamp(0, size - 1) - offset).clamp(0, x.shape[axis] - 1))
    if convert is not None:
        first, second = convert(first), convert(second)
    # in place: both gathers are this function's own, and the products would be two more
    return first.mul_(w0.view(shape)).add_(second.mul_(w1.view(shape)))
