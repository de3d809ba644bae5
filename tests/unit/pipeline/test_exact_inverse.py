"""The post-processing computed from the model grid gives MONAI's own labels, voxel for voxel.

A bundle's ``Invertd`` (with the argmax after it) is computed by
:func:`dicom_node.pipeline.postprocess.invert_labels` from the model grid; the reference is
the same transforms run by MONAI itself (``Compose``), on the same data dictionary: the
image as the bundle's own preprocessing traced it, and the same scores. Every comparison is
``np.array_equal``: not a voxel may differ.

The scores are random: smooth fields (regions with boundaries everywhere), plus exact ties
and near ties (1e-7 apart), where only the exact arithmetic of MONAI's resample decides.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    Invertd,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

from dicom_node.pipeline import Preprocessing, SegmentationPipeline, load_bundle
from dicom_node.pipeline.postprocess import (
    _AxisReads,
    _Difference,
    _Resample,
    _trilinear_points,
    invert_labels,
    run_postprocessing,
)
from dicom_node.pipeline.preprocess import Preprocess
from dicom_node.pipeline.transforms import from_metatensor
from dicom_node.pipeline.workflow import BundleWorkflow, loaded_image
from tests.peers import TEST_DATA, testdata

ZOO = testdata().parent / "zoo"
PUBLIC_SPLEEN = TEST_DATA / "spleen_ct_segmentation_inference.json"


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


#: (series shape, spacing (slice, row, column), affine options): voxel centres halfway
#: between model voxels, thick slices, odd sizes, head-first slices, a sagittal series.
GEOMETRIES = {
    "axial": ((24, 70, 66), (1.5, 0.78, 0.78), {}),
    "thin-slices-ties": ((17, 41, 45), (1.0, 0.75, 0.75), {}),
    "thick-slices": ((9, 50, 30), (5.0, 0.9, 1.3), {}),
    "descending": ((21, 32, 29), (2.5, 0.7, 0.7), {"descending": True}),
    "sagittal": ((25, 35, 20), (1.2, 2.0, 1.1), {"axes": "sagittal"}),
}


def scores(classes: int, shape, seed: int) -> torch.Tensor:
    """(classes, *shape) float32 logits: smooth random fields, with exact and near ties."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn((classes, *shape), generator=g)
    smooth = torch.nn.functional.avg_pool3d(raw[None], 3, 1, 1, count_include_pad=False)[0]
    logits = smooth * 6
    flat = logits.reshape(classes, -1)
    n = flat.shape[1]
    ties = torch.randperm(n, generator=g)[: n // 20]
    flat[1, ties] = flat[0, ties]  # exact ties: the first class wins
    near = torch.randperm(n, generator=g)[: n // 20]
    flat[classes - 1, near] = flat[0, near] * (1 + 1e-7)
    return logits


def pre_and_post(
    spacing_kwargs: dict | None = None,
    nearest_interp: bool = False,
    softmax: bool = True,
    argmax_first: bool = False,
):
    """A zoo-style preprocessing (Orientation RAS, Spacing 1.5 x 1.5 x 2 mm) and its
    postprocessing: [softmax], Invertd, argmax (or argmax first, then a nearest Invertd)."""
    pre = Compose(
        [
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=(1.5, 1.5, 2.0), **(spacing_kwargs or {})),
            ScaleIntensityRanged(
                keys="image", a_min=-57, a_max=164, b_min=0.0, b_max=1.0, clip=True
            ),
        ]
    )
    post = [Activationsd(keys="pred", softmax=True)] if softmax else []
    invert = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=nearest_interp)
    argmax = AsDiscreted(keys="pred", argmax=True)
    post += [argmax, invert] if argmax_first else [invert, argmax]
    return pre, post


def preprocessed(pre, name: str) -> dict:
    shape, spacing, options = GEOMETRIES[name]
    hu = np.zeros(shape, dtype=np.int16)
    return pre({"image": loaded_image(hu, series_affine(spacing, **options))})


def with_scores(data: dict, logits: torch.Tensor) -> dict:
    image = data["image"]
    meta = {k: v for k, v in image.meta.items() if k != "affine"}
    return {"image": image, "pred": MetaTensor(logits.clone(), affine=image.affine, meta=meta)}


def labels_of(data: dict) -> np.ndarray:
    pred = torch.as_tensor(data["pred"])
    return from_metatensor(pred).round().to(torch.uint8).contiguous().numpy()


def assert_monai_s_labels(post, data: dict, logits: torch.Tensor, computed: bool = True):
    ours = run_postprocessing(post, with_scores(data, logits))
    theirs = Compose(post)(with_scores(data, logits))
    if computed:  # the Invertd was ours, not MONAI's
        assert ours["pred"].dtype == torch.uint8
    ours, theirs = labels_of(ours), labels_of(theirs)
    assert ours.shape == theirs.shape == tuple(data["image"].meta["dicom_node_input_shape"])[::-1]
    assert np.array_equal(ours, theirs), f"{(ours != theirs).sum()} voxels differ"
    return ours


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
@pytest.mark.parametrize("classes", [2, 5])
def test_trilinear_inverse_then_argmax_is_monai_s(name, classes):
    pre, post = pre_and_post()
    data = preprocessed(pre, name)
    logits = scores(classes, data["image"].shape[1:], seed=classes)
    labels = assert_monai_s_labels(post, data, logits)
    assert len(np.unique(labels)) == classes  # every class has a region somewhere


@pytest.mark.parametrize(
    "spacing_kwargs",
    [
        {"padding_mode": "zeros"},
        {"align_corners": True},
        {"dtype": torch.float32},
        {"padding_mode": "zeros", "align_corners": True, "dtype": torch.float32},
    ],
    ids=["zeros", "align-corners", "float32", "all"],
)
@pytest.mark.parametrize("classes", [2, 3])
def test_other_resample_settings_are_monai_s(spacing_kwargs, classes):
    pre, post = pre_and_post(spacing_kwargs)
    for name in ("axial", "descending"):
        data = preprocessed(pre, name)
        assert_monai_s_labels(post, data, scores(classes, data["image"].shape[1:], seed=7))


def test_logits_without_softmax_and_a_nearest_inverse_are_monai_s():
    for softmax, nearest in ((False, False), (True, True)):
        pre, post = pre_and_post(nearest_interp=nearest, softmax=softmax)
        data = preprocessed(pre, "thin-slices-ties")
        assert_monai_s_labels(post, data, scores(4, data["image"].shape[1:], seed=11))


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_argmax_then_nearest_inverse_is_monai_s(name):
    """wholeBody's chain: softmax, argmax on the model grid, a nearest Invertd of the map."""
    pre, post = pre_and_post(nearest_interp=True, argmax_first=True)
    data = preprocessed(pre, name)
    assert_monai_s_labels(post, data, scores(14, data["image"].shape[1:], seed=3))


def test_no_foreground_and_all_foreground():
    pre, post = pre_and_post()
    data = preprocessed(pre, "axial")
    grid = data["image"].shape[1:]
    logits = torch.zeros((2, *grid))
    logits[0] = 1.0
    assert not assert_monai_s_labels(post, data, logits).any()
    assert (assert_monai_s_labels(post, data, -logits) == 1).all()


def test_an_oblique_series_runs_monai_s_own_invertd():
    pre, post = pre_and_post()
    shape, spacing, _ = GEOMETRIES["axial"]
    affine = series_affine(spacing)
    angle = np.deg2rad(20.0)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    data = pre({"image": loaded_image(np.zeros(shape, np.int16), rotation @ affine)})
    logits = scores(2, data["image"].shape[1:], seed=5)
    image = data["image"]
    assert invert_labels(logits, image.affine, image.applied_operations, argmax=True) is None
    assert_monai_s_labels(post, data, logits, computed=False)


def test_an_operation_it_does_not_undo_runs_monai_s_own_invertd():
    """CropForegroundd after Spacing (a bundle laid out as none of the zoo's is)."""
    from monai.transforms import CropForegroundd

    pre, post = pre_and_post()
    pre = Compose([*pre.transforms, CropForegroundd(keys="image", source_key="image")])
    post[1].transform = pre
    shape, spacing, _ = GEOMETRIES["axial"]
    hu = np.full(shape, -1000, np.int16)
    hu[4:20, 10:60, 12:50] = 40
    data = pre({"image": loaded_image(hu, series_affine(spacing))})
    assert_monai_s_labels(post, data, scores(2, data["image"].shape[1:], seed=8), computed=False)


def zoo_bundle(name: str, dest: Path, highres: bool = True) -> Path:
    root = dest / f"{name}-{highres}"
    shutil.copytree(ZOO / name / "configs", root / "configs")
    config = root / "configs" / "inference.json"
    doc = json.loads(config.read_text())
    doc["network_def"].pop("img_size", None)  # MONAI 1.6 builds BTCV's SwinUNETR without it
    if not highres:
        doc["displayable_configs"]["highres"] = False
    config.write_text(json.dumps(doc))
    return root


ZOO_CASES = [
    ("spleen_ct_segmentation", True),
    ("swin_unetr_btcv_segmentation", True),
    ("wholeBody_ct_segmentation", True),
    ("wholeBody_ct_segmentation", False),
]


@pytest.mark.skipif(not ZOO.is_dir(), reason=f"no model-zoo configs at {ZOO}")
@pytest.mark.parametrize("name, highres", ZOO_CASES, ids=[f"{n}-{h}" for n, h in ZOO_CASES])
def test_zoo_bundles_postprocessing_is_monai_s_own(name, highres, tmp_path):
    """The bundle path: the bundle's own preprocessing and post transforms, as its config
    builds them (wholeBody's 1.5 and 3 mm grids, 105 classes)."""
    bundle = load_bundle(zoo_bundle(name, tmp_path, highres))
    workflow = BundleWorkflow(bundle)
    for geometry in ("axial", "descending", "sagittal"):
        shape, spacing, options = GEOMETRIES[geometry]
        hu = np.random.default_rng(1).integers(-200, 300, size=shape).astype(np.int16)
        data = workflow.preprocess(hu, series_affine(spacing, **options))
        logits = scores(bundle.num_classes, data["image"].shape[1:], seed=len(geometry))
        data = with_scores(data, logits)
        computed = run_postprocessing(workflow._post.transforms, dict(data))
        assert computed["pred"].dtype == torch.uint8  # not MONAI's Invertd
        ours = labels_of(computed)
        assert np.array_equal(ours, workflow.postprocess(dict(data)))
        theirs = labels_of(workflow._post(dict(data)))
        assert np.array_equal(ours, theirs), (geometry, int((ours != theirs).sum()))
        assert len(np.unique(ours)) > 1


def test_the_fast_path_image_is_inverted_as_monai_inverts_it(tmp_path):
    """The fast path's image carries the trace of Orientation and Spacing run on its
    geometry: MONAI's own Invertd undoes it (the reference), and its computed labels are
    the same; the trace is the one MONAI's eager preprocessing leaves."""
    root = tmp_path / "spleen"
    (root / "configs").mkdir(parents=True)
    shutil.copy(PUBLIC_SPLEEN, root / "configs" / "inference.json")
    meta = {
        "name": "spleen",
        "version": "0.1",
        "network_data_format": {
            "outputs": {
                "pred": {"num_channels": 2, "channel_def": {"0": "background", "1": "spleen"}}
            }
        },
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    bundle = load_bundle(root)
    pipeline = SegmentationPipeline(bundle, "cpu")
    assert pipeline.path == "fast" and bundle.fast_postprocessing is None
    workflow = BundleWorkflow(bundle)
    for name in sorted(GEOMETRIES):
        shape, spacing, options = GEOMETRIES[name]
        affine = series_affine(spacing, **options)
        hu = np.zeros(shape, np.int16)
        image = pipeline.preprocess(hu, affine)
        eager = workflow.preprocess(hu, affine)["image"]
        assert torch.equal(image.affine, eager.affine)
        ops, eager_ops = image.applied_operations, eager.applied_operations
        assert [op["class"] for op in ops] == [op["class"] for op in eager_ops]
        assert torch.equal(
            ops[1]["extra_info"]["src_affine"], eager_ops[1]["extra_info"]["src_affine"]
        )
        assert ops[1]["extra_info"]["dtype"] == eager_ops[1]["extra_info"]["dtype"] == "float64"
        logits = scores(2, image.shape[1:], seed=len(name))
        ours = pipeline.postprocess(logits, image, contours=False).labels
        pipeline.postprocess_mode = "monai"
        theirs = pipeline.postprocess(logits, image, contours=False).labels
        pipeline.postprocess_mode = "fast"
        assert np.array_equal(ours, theirs), name
        data = with_scores({"image": eager}, logits)
        assert np.array_equal(ours, workflow.postprocess(data)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("align", [False, True])
def test_the_points_are_grid_sample_s_bit_for_bit(dtype, padding, align):
    """The uncertain voxels' arithmetic against torch's own CPU kernel, at random points
    (some outside the grid, some on its planes)."""
    g = torch.Generator().manual_seed(0)
    values = torch.rand((3, 7, 9, 11), generator=g)
    sizes = {0: 5, 1: 6, 2: 4}  # output (x, y, z) lengths
    final = []
    for out_axis, model_axis in enumerate((1, 0, 2)):  # axes permuted
        n = sizes[out_axis]
        coords = (torch.rand(n, generator=g, dtype=torch.float64) * 2.6 - 1.3).to(dtype)
        coords[0] = -1.0
        final.append(_AxisReads(model_axis, coords=coords))
    resample = _Resample("bilinear", padding, align, dtype, final, np.eye(4))
    zz, yy, xx = torch.meshgrid(*(torch.arange(sizes[a]) for a in (2, 1, 0)), indexing="ij")
    position = [zz.reshape(-1), yy.reshape(-1), xx.reshape(-1)]
    ours = _trilinear_points(values, position, final, resample)
    grid = torch.empty((1, 1, 1, len(position[0]), 3), dtype=dtype)
    for dim, reads in zip((2, 1, 0), final, strict=True):
        grid[0, 0, 0, :, 2 - reads.model_axis] = reads.coords[position[dim]]
    theirs = torch.nn.functional.grid_sample(
        values.to(dtype)[None], grid, mode="bilinear", padding_mode=padding, align_corners=align
    )[0, :, 0, 0].to(torch.float32)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("align", [False, True])
def test_two_classes_difference_outside_its_band_is_grid_sample_s_label(padding, align):
    """Of two classes, the interpolated difference decides a label only where torch's CPU
    kernel (in float64, then compared in float32, as MONAI's resample and argmax) gives that
    label: at random points, with scores near ties and some points outside the grid."""
    g = torch.Generator().manual_seed(1)
    values = torch.rand((2, 9, 8, 10), generator=g)
    values[1] = torch.where(torch.rand(values[0].shape, generator=g) < 0.3, values[0], values[1])
    values[1] += 1e-5 * torch.randn(values[0].shape, generator=g)  # about the band's width
    sizes = {0: 40, 1: 37, 2: 23}  # output (x, y, z) lengths
    final = []
    for out_axis, model_axis in enumerate((2, 0, 1)):
        coords = torch.linspace(-1.1, 1.05, sizes[out_axis], dtype=torch.float64)
        final.append(_AxisReads(model_axis, coords=coords))
    resample = _Resample("bilinear", padding, align, torch.float64, final, np.eye(4))
    difference = _Difference(values)
    difference.read_at(final, resample, sizes[0])
    zz, pp = torch.meshgrid(
        torch.arange(sizes[2]), torch.arange(sizes[1] * sizes[0]), indexing="ij"
    )
    z, p = zz.reshape(-1), pp.reshape(-1)
    ours = difference(z, p)
    grid = torch.empty((1, 1, 1, len(z), 3), dtype=torch.float64)
    for index, reads in zip((p % sizes[0], p // sizes[0], z), final, strict=True):
        grid[0, 0, 0, :, 2 - reads.model_axis] = reads.coords[index]
    sampled = torch.nn.functional.grid_sample(
        values.double()[None], grid, mode="bilinear", padding_mode=padding, align_corners=align
    )[0, :, 0, 0].to(torch.float32)
    theirs = sampled[1] > sampled[0]
    decided = ours.abs() > difference.band
    assert 0 < int((~decided).sum()) < len(z) // 10  # near ties fall in the band, few others
    assert torch.equal((ours > 0)[decided], theirs[decided])
    assert bool(theirs[decided].any()) and not bool(theirs[decided].all())


def test_preprocessing_records_the_bundle_s_spacing_precision():
    pre = Preprocess(
        Preprocessing(
            axcodes="RAS",
            pixdim=(1.5, 1.5, 2.0),
            spacing_mode="bilinear",
            a_min=-57.0,
            a_max=164.0,
            b_min=0.0,
            b_max=1.0,
            clip=True,
        )
    )
    image = pre(np.zeros((10, 30, 30), np.int16), series_affine((2.0, 1.0, 1.0)), "cpu")
    (orientation, spacing) = image.applied_operations
    assert orientation["class"] == "Orientation" and spacing["class"] == "SpatialResample"
    assert spacing["extra_info"]["dtype"] == "float64"  # Spacingd's default, not the resample's
    assert not spacing["lazy"]
