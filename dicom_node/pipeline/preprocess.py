"""The fast path's preprocessing: the bundle's Orientation, Spacing and ScaleIntensityRange.

MONAI's array transforms want the volume channel-first in (x, y, z) order, while a CT series
arrives as (slice, row, column). Handing MONAI the volume in its order costs a transposed
float copy of the full-resolution volume (and Orientation a flipped one) before Spacing reads
every voxel once more, three full passes over ~200 MB at 512x512x200, when Spacing then
keeps one voxel in ten or more.

:class:`Preprocess` therefore resamples the volume where it lies: MONAI computes the output
grid (Orientation and Spacing applied lazily, on the geometry alone) and MONAI's
``SpatialResample`` samples the (slice, row, column) volume onto it directly. The sample
points are the same; only their float32 rounding differs from the chained transforms, which
moves an output value by at most ~1e-4 of a HU window's range (tested). The intensity step is
elementwise, so it runs where the bundle puts it, before or after the resampling.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing, SpatialResample

from dicom_node.pipeline.bundle import Preprocessing
from dicom_node.pipeline.transforms import (
    INPUT_AFFINE,
    INPUT_SHAPE,
    LPS_TO_RAS,
    image_transforms,
    intensity_transform,
    ras_affine,
    spatial_transforms,
    to_metatensor,
)


class Preprocess:
    """A bundle's preprocessing of a (slices, rows, columns) HU volume with an LPS affine.

    Without a Spacing step there is nothing to gain (Orientation alone is a flip), and
    with nearest-neighbour Spacing the rounding of a sample point lying half-way between two
    voxels (common: 1.625 = 13/8 voxels a step puts every eighth there) would pick the other
    voxel: in both cases MONAI's chain runs as the bundle states it.
    """

    def __init__(self, pre: Preprocessing) -> None:
        self.pre = pre
        self._chain = image_transforms(pre)
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
        self, hu: np.ndarray | torch.Tensor, affine: np.ndarray, device: torch.device
    ) -> MetaTensor:
        if self._spacing is None:
            return self._chain(to_metatensor(hu, affine, device))
        if hu.ndim != 3:
            raise ValueError(
                f"expected a (slices, rows, columns) array, got shape {tuple(hu.shape)}"
            )
        if isinstance(hu, np.ndarray):
            hu = np.ascontiguousarray(hu)  # torch refuses negative strides (flipped views)
        data = torch.as_tensor(hu).to(device=device, dtype=torch.float32)[None]
        xyz = ras_affine(affine)
        xyz_shape = tuple(int(n) for n in reversed(data.shape[1:]))
        dst_affine, dst_shape = self._output_grid(xyz, xyz_shape)
        stored = MetaTensor(
            data, affine=torch.as_tensor(LPS_TO_RAS @ np.asarray(affine, np.float64))
        )
        if self._intensity_first:
            stored = self._intensity(stored)
        spacing = self._spacing.sp_resample
        resample = SpatialResample(
            mode=spacing.mode,
            padding_mode=spacing.padding_mode,
            align_corners=spacing.align_corners,
            dtype=torch.float32,
        )
        out = resample(stored, dst_affine=dst_affine, spatial_size=dst_shape)
        del stored, data
        out = torch.as_tensor(out)
        if not self._intensity_first and self._intensity is not None:
            out = self._intensity(out)
        ras = torch.as_tensor(xyz, dtype=torch.float64)
        meta = {
            "space": "RAS",
            "original_affine": ras.clone(),
            INPUT_AFFINE: ras.clone(),
            INPUT_SHAPE: xyz_shape,
        }
        return MetaTensor(torch.as_tensor(out), affine=dst_affine, meta=meta)

    def _output_grid(
        self, xyz_affine: np.ndarray, xyz_shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The grid Orientation and Spacing would give, computed by MONAI lazily: an expanded
        zero (no memory) stands for the voxels.

        Each transform is made lazy on its own: a ``Compose(..., lazy=True)`` applies the
        pending operations when it ends, which resampled the whole (expanded, so first
        materialised) volume in float, 4.4 times its INT16 size at 512x512x600, for a
        grid that needs none of its voxels.
        """
        shell = MetaTensor(
            torch.zeros(1).expand(1, *xyz_shape),
            affine=torch.as_tensor(xyz_affine, dtype=torch.float64),
            meta={"space": "RAS"},
        )
        for transform in spatial_transforms(self.pre):  # new objects: lazy is theirs alone
            transform.lazy = True
            shell = transform(shell)
        affine = torch.as_tensor(shell.peek_pending_affine(), dtype=torch.float64)
        return affine, tuple(int(n) for n in shell.peek_pending_shape())
