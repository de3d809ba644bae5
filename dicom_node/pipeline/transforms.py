"""Bridge between the node's volume convention and MONAI's, and the bundle's transforms.

The node holds a volume as a (slices, rows, columns) array with a highdicom affine to LPS.
A MONAI bundle was trained on images as MONAI's readers load them: indexed (x, y, z) =
(column, row, slice), channel first, with an affine to RAS (the reader flips LPS x and y).
:func:`to_metatensor` builds exactly that view, so a bundle's Orientation/Spacing see the same
geometry they saw in training whichever order the node's slices are in. The transforms are MONAI's
array transforms on torch tensors, so they run on the pipeline's device. The training of the demo
bundle uses the same functions, so training and inference cannot drift apart.
"""

from __future__ import annotations

import inspect
from typing import cast

import numpy as np
import torch
from monai.config import DtypeLike
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    InvertibleTransform,
    Orientation,
    Orientationd,
    ScaleIntensityRange,
    Spacing,
    Spacingd,
    SpatialResample,
    Transform,
)
from monai.utils import get_equivalent_dtype

from dicom_node.pipeline.bundle import Preprocessing

#: Flips the x and y axes: LPS <-> RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: (slice, row, column) <-> (column, row, slice): the axes of a MONAI-read DICOM series.
_SRC_TO_XYZ = (2, 1, 0)

#: Axis labels of RAS+ space, what MONAI's readers and every model-zoo bundle assume.
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))

#: The precision a bundle's ``Spacingd`` resamples in when its config names none (every
#: bundle the fast path takes): its inverse (``Invertd``) resamples in it too.
BUNDLE_SPACING_DTYPE: torch.dtype = get_equivalent_dtype(
    inspect.signature(Spacingd).parameters["dtype"].default, torch.Tensor
)

#: Meta keys recording the input grid, used to resample the result back onto it.
INPUT_AFFINE = "dicom_node_input_affine"
INPUT_SHAPE = "dicom_node_input_shape"


def ras_affine(affine: np.ndarray) -> np.ndarray:
    """The MONAI (x, y, z) -> RAS affine of a (slice, row, column) -> LPS affine."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    permuted = affine[:, [*_SRC_TO_XYZ, 3]]
    return LPS_TO_RAS @ permuted


def to_metatensor(
    array: np.ndarray | torch.Tensor,
    affine: np.ndarray,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MetaTensor:
    """A channel-first MetaTensor (1, x, y, z) on ``device``, as MONAI's DICOM readers give it.

    ``array`` is (slices, rows, columns) and ``affine`` maps (slice, row, column, 1) to LPS mm.
    The array goes to the device once; the axis permutation is a view.
    """
    if array.ndim != 3:
        raise ValueError(
            f"expected a (slices, rows, columns) array, got shape {tuple(array.shape)}"
        )
    if isinstance(array, np.ndarray):
        array = np.ascontiguousarray(array)  # torch refuses negative strides (flipped views)
    # One copy: to the device in the stored layout, then converted into (x, y, z) order.
    # MONAI's resampling makes its input contiguous anyway; a permuted view would cost it a
    # second, transposed copy of the float volume.
    data = torch.as_tensor(array).to(device=device).permute(*_SRC_TO_XYZ)
    data = data.to(dtype=dtype, memory_format=torch.contiguous_format).unsqueeze(0)
    ras = torch.as_tensor(ras_affine(affine), dtype=torch.float64)
    meta = {
        "space": "RAS",
        "original_affine": ras.clone(),
        INPUT_AFFINE: ras.clone(),
        INPUT_SHAPE: tuple(int(n) for n in data.shape[1:]),
    }
    return MetaTensor(data, affine=ras, meta=meta)


def from_metatensor(image: torch.Tensor) -> torch.Tensor:
    """(1, x, y, z) -> (slices, rows, columns): the inverse axis order of :func:`to_metatensor`."""
    return image[0].permute(*_SRC_TO_XYZ)


def spatial_transforms(
    pre: Preprocessing, mode: str | None = None, dtype: torch.dtype = torch.float32
) -> list[InvertibleTransform]:
    """The bundle's Orientation and Spacing, in its order (``mode`` overrides, e.g. for labels;
    ``dtype`` is the precision Spacing resamples in)."""
    # MONAI annotates dtype as numpy's; it takes torch dtypes.
    spacing_dtype = cast(DtypeLike, dtype)
    steps: list[InvertibleTransform] = []
    for step in pre.order:
        if step == "orientation" and pre.axcodes:
            steps.append(Orientation(axcodes=pre.axcodes, labels=_RAS_LABELS))
        elif step == "spacing" and pre.pixdim:
            steps.append(
                Spacing(pixdim=pre.pixdim, mode=mode or pre.spacing_mode, dtype=spacing_dtype)
            )
    return steps


def spatial_dict_transforms(
    pre: Preprocessing, key: str, dtype: torch.dtype
) -> list[InvertibleTransform]:
    """The bundle's Orientation and Spacing as dictionary transforms on ``key``, in its order:
    what ``Invertd`` can undo."""
    # MONAI annotates dtype as numpy's; it takes torch dtypes.
    spacing_dtype = cast(DtypeLike, dtype)
    steps: list[InvertibleTransform] = []
    for step in pre.order:
        if step == "orientation" and pre.axcodes:
            steps.append(Orientationd(keys=key, axcodes=pre.axcodes, labels=_RAS_LABELS))
        elif step == "spacing" and pre.pixdim:
            steps.append(
                Spacingd(keys=key, pixdim=pre.pixdim, mode=pre.spacing_mode, dtype=spacing_dtype)
            )
    return steps


def intensity_transform(pre: Preprocessing) -> ScaleIntensityRange | None:
    """The bundle's ScaleIntensityRange, or ``None`` when it has none."""
    if "intensity" not in pre.order:
        return None
    return ScaleIntensityRange(
        a_min=pre.a_min,
        a_max=pre.a_max,
        b_min=pre.b_min,
        b_max=pre.b_max,
        clip=pre.clip,
        dtype=cast(DtypeLike, torch.float32),  # MONAI annotates numpy's; it takes torch's
    )


def image_transforms(pre: Preprocessing, dtype: torch.dtype = torch.float32) -> Compose:
    """The bundle's preprocessing of an image, as MONAI array transforms in the bundle's order
    (Spacing resampling in ``dtype``)."""
    spatial = iter(spatial_transforms(pre, dtype=dtype))
    steps: list[Transform] = []
    for step in pre.order:
        if step == "intensity":
            intensity = intensity_transform(pre)
            assert intensity is not None  # "intensity" is in the order
            steps.append(intensity)
        elif (step == "orientation" and pre.axcodes) or (step == "spacing" and pre.pixdim):
            steps.append(next(spatial))
    return Compose(steps)


def label_transforms(pre: Preprocessing) -> Compose:
    """The spatial part of the preprocessing with nearest-neighbour interpolation (for labels)."""
    return Compose(spatial_transforms(pre, mode="nearest"))


def resample_to_input(label: torch.Tensor, image: MetaTensor) -> torch.Tensor:
    """Resample a (1, x, y, z) label map on ``image``'s grid back onto the input grid.

    Nearest-neighbour, with the input's exact shape, as (slices, rows, columns).
    """
    data = label.as_tensor() if isinstance(label, MetaTensor) else label
    src = MetaTensor(data.to(torch.float32), affine=image.affine)
    # MONAI annotates dtype as numpy's; it takes torch dtypes.
    resample = SpatialResample(
        mode="nearest", padding_mode="zeros", dtype=cast(DtypeLike, torch.float32)
    )
    out = resample(
        src,
        dst_affine=torch.as_tensor(image.meta[INPUT_AFFINE], dtype=torch.float64),
        spatial_size=image.meta[INPUT_SHAPE],
    )
    return from_metatensor(torch.as_tensor(out))
