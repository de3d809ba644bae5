"""The fast path's preprocessing samples the volume where it lies: the same grid and values as
MONAI's Orientation, Spacing and ScaleIntensityRange chained, to float32 rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dicom_node.pipeline import preprocess
from dicom_node.pipeline.bundle import Preprocessing
from dicom_node.pipeline.preprocess import Preprocess
from dicom_node.pipeline.transforms import (
    INPUT_AFFINE,
    INPUT_SHAPE,
    image_transforms,
    to_metatensor,
)

CPU = torch.device("cpu")
SHAPE = (23, 61, 57)  # (slices, rows, columns): odd sizes catch off-by-one grids


def _pre(order=("orientation", "spacing", "intensity"), axcodes="RAS", mode="bilinear"):
    return Preprocessing(
        axcodes=axcodes,
        pixdim=(1.7, 1.3, 2.9),
        spacing_mode=mode,
        a_min=-57.0,
        a_max=164.0,
        b_min=0.0,
        b_max=1.0,
        clip=True,
        order=order,
    )


def _affine(kind: str) -> np.ndarray:
    """(slice, row, column) -> LPS for series laid out in several ways."""
    a = np.eye(4)
    if kind == "axial":  # columns to the patient's left, rows to posterior, slices up
        a[:3, :3] = [[0, 0, 0.7], [0, 0.8, 0], [2.5, 0, 0]]
    elif kind == "axial_down":  # slices stored head to feet
        a[:3, :3] = [[0, 0, 0.7], [0, 0.8, 0], [-2.5, 0, 0]]
    elif kind == "sagittal":
        a[:3, :3] = [[1.9, 0, 0], [0, 0, 0.8], [0, -0.75, 0]]
    elif kind == "oblique":
        c, s = np.cos(0.2), np.sin(0.2)
        a[:3, :3] = np.array([[0, s, c], [0, c, -s], [1, 0, 0]]) * [2.0, 0.75, 0.75]
    a[:3, 3] = [-31.5, 12.25, 101.0]
    return a


@pytest.mark.parametrize("kind", ["axial", "axial_down", "sagittal", "oblique"])
@pytest.mark.parametrize(
    "order",
    [
        ("orientation", "spacing", "intensity"),
        ("intensity", "orientation", "spacing"),
        ("orientation", "intensity", "spacing"),
    ],
)
@pytest.mark.parametrize("slab_slices", [None, 5])
def test_same_grid_and_values_as_monai_chained(kind, order, slab_slices, monkeypatch):
    if slab_slices is not None:  # a few source slices a slab: many slabs, as at 512x512x600
        monkeypatch.setattr(preprocess, "_SLAB_BYTES", slab_slices * 4 * SHAPE[1] * SHAPE[2])
    rng = np.random.default_rng(7)
    hu = rng.normal(40, 120, SHAPE).astype(np.int16)
    pre = _pre(order)
    affine = _affine(kind)
    ours = Preprocess(pre)(hu, affine, CPU)
    ref = image_transforms(pre)(to_metatensor(hu, affine))
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours.affine.numpy(), ref.affine.numpy(), atol=1e-9)
    diff = (ours.as_tensor() - ref.as_tensor()).abs().max().item()
    assert diff <= 2e-4, diff
    # the inverse of the preprocessing needs the input grid, as MONAI's chain records it
    np.testing.assert_allclose(ours.meta[INPUT_AFFINE], ref.meta[INPUT_AFFINE])
    assert ours.meta[INPUT_SHAPE] == ref.meta[INPUT_SHAPE]


def test_nearest_spacing_is_monai_s_chain():
    hu = np.random.default_rng(3).integers(-1000, 1000, SHAPE).astype(np.int16)
    pre = _pre(mode="nearest")
    affine = _affine("axial")
    ours = Preprocess(pre)(hu, affine, CPU)
    ref = image_transforms(pre)(to_metatensor(hu, affine))
    assert torch.equal(ours.as_tensor(), ref.as_tensor())


def test_without_spacing_the_chain_is_monai_s_own():
    pre = Preprocessing(
        axcodes="RAS", pixdim=None, spacing_mode="bilinear", a_min=0, a_max=1, b_min=0,
        b_max=1, clip=False, order=("orientation", "intensity"),
    )  # fmt: skip
    hu = np.random.default_rng(1).normal(0, 1, SHAPE).astype(np.float32)
    ours = Preprocess(pre)(hu, _affine("axial"), CPU)
    ref = image_transforms(pre)(to_metatensor(hu, _affine("axial")))
    assert torch.equal(ours.as_tensor(), ref.as_tensor())
