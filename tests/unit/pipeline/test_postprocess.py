"""The fast post-processing against MONAI's transforms chained, on varied geometries.

Logits are synthetic (blobs of different sizes on the model grid of a real preprocessing) or the
demo network's on a phantom. Every case checks the fast path against the MONAI way: the same
shape and dtype, Dice >= 0.999, the same connected component kept, contours that are the
in-plane boundary of the labels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from dicom_node.pipeline import Preprocessing, SegmentationPipeline, load_bundle
from dicom_node.pipeline.postprocess import (
    _axis_mapping,
    postprocess_fast,
    postprocess_monai,
)
from dicom_node.pipeline.transforms import image_transforms, to_metatensor
from dicom_node_testing.phantom import make_phantom
from tests.peers import ROOT

DEMO_BUNDLE = ROOT / "bundles" / "spleen_ct_demo"
#: The public spleen_ct_segmentation bundle's spatial preprocessing.
PRE = Preprocessing(
    axcodes="RAS",
    pixdim=(1.5, 1.5, 2.0),
    spacing_mode="bilinear",
    a_min=-57.0,
    a_max=164.0,
    b_min=0.0,
    b_max=1.0,
    clip=True,
)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def series_affine(spacing, origin=(-120.0, -90.0, -300.0), axes="axial", descending=False):
    """(slice, row, column) -> LPS affine of an axial or sagittal series."""
    ss, sr, sc = spacing
    affine = np.eye(4)
    if axes == "axial":  # columns +x, rows +y, slices +z
        affine[:3, :3] = [[0, 0, sc], [0, sr, 0], [ss, 0, 0]]
    else:  # sagittal: columns +y, rows -z, slices +x
        affine[:3, :3] = [[ss, 0, 0], [0, 0, sc], [0, -sr, 0]]
    if descending:
        affine[:3, 0] *= -1
    affine[:3, 3] = origin
    return affine


def model_grid(shape, affine) -> MetaTensor:
    """A blank series of ``shape`` preprocessed onto the 1.5 x 1.5 x 2 mm model grid."""
    return image_transforms(PRE)(to_metatensor(np.zeros(shape, dtype=np.float32), affine))


def blob_logits(grid_shape, blobs, classes=2) -> torch.Tensor:
    """(classes, x, y, z) logits: class ``label`` wins inside each (label, centre, radii) blob."""
    coords = np.ogrid[tuple(slice(0, n) for n in grid_shape)]
    logits = np.zeros((classes, *grid_shape), dtype=np.float32)
    logits[1:] = -1.0
    for label, centre, radii in blobs:
        distance = sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii, strict=True))
        np.maximum(logits[label], 1.0 - distance, out=logits[label])
    return torch.as_tensor(logits)


def random_blobs(grid_shape, seed, count=5, label=1):
    """``count`` blobs of decreasing size at random places (some may touch the border)."""
    rng = np.random.default_rng(seed)
    size = np.array(grid_shape, dtype=float)
    return [
        (label, rng.uniform(0.1, 0.9, 3) * size, rng.uniform(0.08, 0.2, 3) * size / (k + 1))
        for k in range(count)
    ]


def in_plane_boundary(labels: np.ndarray, value: int) -> np.ndarray:
    mask = np.pad(labels == value, ((0, 0), (1, 1), (1, 1)))  # outside the image: background
    interior = ndimage.binary_erosion(mask, structure=np.ones((1, 3, 3)))[:, 1:-1, 1:-1]
    return (labels == value) & ~interior


def check_same(logits, image, values, expect_foreground=True):
    """Assert that both ways agree; returns the fast result."""
    fast = postprocess_fast(logits, image, values)
    ref = postprocess_monai(logits, image, values)
    assert (
        fast.labels.shape == ref.labels.shape == tuple(image.meta["dicom_node_input_shape"])[::-1]
    )
    assert fast.contours.shape == ref.contours.shape == fast.labels.shape
    assert fast.labels.dtype == ref.labels.dtype == np.uint8
    assert fast.contours.dtype == ref.contours.dtype == np.uint8
    for value in values:
        ours, theirs = fast.labels == value, ref.labels == value
        assert ours.any() == theirs.any() == expect_foreground
        assert dice(ours, theirs) >= 0.999, value
        # The same component kept: one 26-connected component, with the reference's centre.
        _, count = ndimage.label(ours, structure=np.ones((3, 3, 3)))
        assert count == int(expect_foreground)
        if expect_foreground:
            np.testing.assert_allclose(
                ndimage.center_of_mass(ours), ndimage.center_of_mass(theirs), atol=0.5
            )
        assert np.array_equal(fast.contours == value, in_plane_boundary(fast.labels, value))
        assert dice(fast.contours == value, ref.contours == value) >= 0.99
    assert set(np.unique(fast.labels)) <= {0, *values}
    assert set(np.unique(fast.contours)) <= {0, *values}
    return fast, ref


GEOMETRIES = {
    # (series shape, spacing, affine options): odd shapes, anisotropic and non-square pixels,
    # spacings that put voxel centres halfway between model voxels, reversed and sagittal series.
    "thin-slices-ties": ((33, 77, 91), (1.0, 0.75, 0.75), {}),
    "thick-slices": ((21, 100, 60), (5.0, 0.9, 1.3), {}),
    "descending": ((45, 64, 57), (2.5, 0.7, 0.7), {"descending": True}),
    "sagittal": ((50, 70, 40), (1.2, 2.0, 1.1), {"axes": "sagittal"}),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_fast_path_matches_monai_on_blobs(name):
    shape, spacing, options = GEOMETRIES[name]
    image = model_grid(shape, series_affine(spacing, **options))
    assert _axis_mapping(image.shape[1:], image) is not None  # the gather path is tested
    for seed in range(2):
        logits = blob_logits(image.shape[1:], random_blobs(image.shape[1:], seed))
        _, count = ndimage.label(logits[1] > logits[0], structure=np.ones((3, 3, 3)))
        assert count > 1  # something for KeepLargestConnectedComponent to remove
        fast, ref = check_same(logits, image, [1])
        assert (fast.labels != ref.labels).mean() <= 1e-4


def test_no_foreground():
    image = model_grid((30, 50, 40), series_affine((2.0, 1.0, 1.0)))
    logits = torch.zeros((2, *image.shape[1:]))
    logits[0] = 1.0
    fast, _ = check_same(logits, image, [1], expect_foreground=False)
    assert not fast.labels.any() and not fast.contours.any()


def test_label_touching_the_border():
    image = model_grid((25, 60, 50), series_affine((3.0, 1.2, 1.2)))
    grid = np.array(image.shape[1:])
    # An ellipsoid wider than the grid: it crosses every face but leaves the corners out.
    fast, _ = check_same(blob_logits(grid, [(1, (grid - 1) / 2, 0.7 * grid)]), image, [1])
    labels, contours = fast.labels, fast.contours
    for face in (
        labels[0],
        labels[-1],
        labels[:, 0],
        labels[:, -1],
        labels[:, :, 0],
        labels[:, :, -1],
    ):
        assert face.any()
    # In-plane, voxels on the image edge are contour (outside counts as background).
    assert np.array_equal(contours[:, 0] > 0, labels[:, 0] > 0)
    assert np.array_equal(contours[:, :, -1] > 0, labels[:, :, -1] > 0)
    # Across slices there is no contour: the first slice's interior is not outlined.
    assert (labels[0] > contours[0]).any()


def test_equal_components_keep_the_one_monai_keeps():
    image = model_grid((20, 48, 48), series_affine((2.0, 1.5, 1.5)))
    logits = torch.zeros((2, *image.shape[1:]))
    logits[1] = -1.0
    logits[1, 5:12, 5:12, 3:8] = 1.0  # two cubes of the same size: MONAI's ranking decides
    logits[1, 30:37, 30:37, 3:8] = 1.0
    fast, ref = check_same(logits, image, [1])
    assert np.array_equal(fast.labels, ref.labels)


def test_two_labels_each_keep_their_largest_component():
    image = model_grid((31, 70, 66), series_affine((2.5, 0.8, 0.8)))
    grid = image.shape[1:]
    blobs = random_blobs(grid, seed=3, count=3, label=1) + random_blobs(
        grid, seed=4, count=3, label=2
    )
    logits = blob_logits(grid, blobs, classes=3)
    fast, ref = check_same(logits, image, [1, 2])
    assert {1, 2} <= set(np.unique(fast.labels))


def test_oblique_mapping_falls_back_to_monai_resample():
    image = model_grid((30, 50, 50), series_affine((2.0, 1.0, 1.0)))
    angle = np.deg2rad(20.0)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    tilted = MetaTensor(
        image.as_tensor(),
        affine=image.affine @ torch.as_tensor(rotation),
        meta={k: v for k, v in image.meta.items() if k != "affine"},
    )
    assert _axis_mapping(tilted.shape[1:], tilted) is None
    logits = blob_logits(tilted.shape[1:], random_blobs(tilted.shape[1:], seed=5))
    fast, ref = check_same(logits, tilted, [1])
    assert np.array_equal(fast.labels, ref.labels)


@pytest.mark.parametrize(
    "seed, shape, spacing, descending",
    [
        (11, (37, 83, 79), (4.0, 2.8, 3.1), False),
        (12, (44, 71, 90), (3.3, 3.0, 2.6), True),
    ],
)
def test_demo_network_on_phantoms_gives_the_same_result_either_way(
    seed, shape, spacing, descending
):
    bundle = load_bundle(DEMO_BUNDLE)
    phantom = make_phantom(shape, spacing, seed=seed)
    hu, affine, truth = phantom.hu, phantom.affine.copy(), phantom.labels
    if descending:  # the slices stored from head to feet
        affine[:3, 3] = (phantom.affine @ (shape[0] - 1, 0, 0, 1))[:3]
        affine[:3, 0] *= -1
        hu, truth = hu[::-1], truth[::-1]
    fast_pipeline = SegmentationPipeline(bundle, "cpu")
    monai_pipeline = SegmentationPipeline(bundle, "cpu", postprocess_mode="monai")
    assert fast_pipeline.postprocess_mode == "fast"
    image = fast_pipeline.preprocess(hu, affine)
    logits = fast_pipeline.infer(image)
    fast = fast_pipeline.postprocess(logits, image)
    ref = monai_pipeline.postprocess(logits, image)
    assert fast.labels.shape == ref.labels.shape == shape
    assert fast.labels.dtype == fast.contours.dtype == np.uint8
    assert dice(fast.labels == 1, ref.labels == 1) >= 0.999
    assert dice(fast.contours == 1, ref.contours == 1) >= 0.99
    assert dice(fast.labels == 1, truth == 1) >= 0.7  # the network found the spleen
    assert np.array_equal(fast.contours == 1, in_plane_boundary(fast.labels, 1))


def test_unknown_postprocess_mode_is_refused():
    with pytest.raises(ValueError, match="postprocess_mode must be one of"):
        SegmentationPipeline(load_bundle(DEMO_BUNDLE), "cpu", postprocess_mode="gpu")
