"""The MONAI pipeline on a phantom written as DICOM, and the bundle loader.

The phantom below uses a seed the demo model never saw (training uses seeds >= 900). It goes
through the node's real path: CT files written by ``write_ct_series``, assembled by
``assemble_series`` (whose slice order may differ from the files'), segmented in-process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from dicom_node.inference.local import LocalBackend
from dicom_node.pipeline import BundleError, SegmentationPipeline, load_bundle
from dicom_node.series.volume import assemble_series
from dicom_node_testing.phantom import make_phantom
from dicom_node_testing.synthetic import write_ct_series
from tests.peers import ROOT, TEST_DATA

DEMO_BUNDLE = ROOT / "bundles" / "spleen_ct_demo"
PUBLIC_INFERENCE = TEST_DATA / "spleen_ct_segmentation_inference.json"
SHAPE = (40, 96, 96)
SPACING = (5.0, 3.5, 3.5)
ORIGIN = (-160.0, -170.0, -600.0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(phantom, assembled volume, expected spleen mask on the volume's grid)."""
    phantom = make_phantom(SHAPE, SPACING, seed=7, origin=ORIGIN)
    paths = write_ct_series(phantom.hu, tmp_path_factory.mktemp("ct"), SPACING, ORIGIN)
    volume = assemble_series(paths)
    # Map every slice of the assembled volume to the phantom slice at its position.
    positions = np.array([volume.affine @ (k, 0, 0, 1) for k in range(volume.array.shape[0])])
    index = np.rint((positions[:, 2] - ORIGIN[2]) / SPACING[0]).astype(int)
    assert sorted(index) == list(range(SHAPE[0]))
    # Rows and columns keep the phantom's in-plane axes.
    np.testing.assert_allclose(volume.affine[:3, 1:3], phantom.affine[:3, 1:3], atol=1e-6)
    assert np.array_equal(volume.array, phantom.hu[index])
    return phantom, volume, phantom.spleen[index]


@pytest.fixture(scope="module")
def backend():
    return LocalBackend(DEMO_BUNDLE, device="cpu")


@pytest.fixture(scope="module")
def result(backend, case):
    _, volume, _ = case
    return backend.segment(volume.array, volume.affine, contours=True)


def test_contours_only_when_asked_for(backend, case, result):
    _, volume, _ = case
    plain = backend.segment(volume.array, volume.affine)
    assert plain.contours is None
    np.testing.assert_array_equal(plain.labels, result.labels)


def test_demo_model_finds_the_spleen_of_an_unseen_phantom(result, case):
    _, _, expected = case
    assert dice(result.labels == 1, expected) >= 0.9


def test_result_is_on_the_input_grid(result, case):
    _, volume, _ = case
    assert result.labels.shape == volume.array.shape
    assert result.contours.shape == volume.array.shape
    assert result.labels.dtype == np.uint8 and result.contours.dtype == np.uint8
    assert set(np.unique(result.labels)) == {0, 1}
    assert set(result.timings) == {"pre", "inference", "post"}
    assert all(t > 0 for t in result.timings.values())


def test_only_the_largest_component_is_kept(result):
    _, count = ndimage.label(result.labels == 1, structure=np.ones((3, 3, 3)))
    assert count == 1


def test_contours_are_the_in_plane_boundary_of_the_labels(result):
    labels, contours = result.labels, result.contours
    assert contours.any()
    assert np.all(labels[contours > 0] == contours[contours > 0]), "contours within labels"
    mask = np.pad(labels == 1, ((0, 0), (1, 1), (1, 1)))  # outside the image is background
    interior = ndimage.binary_erosion(mask, structure=np.ones((1, 3, 3)))[:, 1:-1, 1:-1]
    boundary = (labels == 1) & ~interior
    assert np.array_equal(contours == 1, boundary)


def test_slice_order_does_not_change_the_result(backend, case, result):
    _, volume, _ = case
    flipped_affine = volume.affine.copy()
    flipped_affine[:3, 3] = (volume.affine @ (volume.array.shape[0] - 1, 0, 0, 1))[:3]
    flipped_affine[:3, 0] *= -1
    flipped = backend.segment(volume.array[::-1], flipped_affine)
    assert dice(flipped.labels[::-1] == 1, result.labels == 1) > 0.99


def test_a_predictor_sees_patches_of_the_bundle_roi(backend, case, result):
    # Triton's model passes such a predictor; the pre- and postprocessing stay the same.
    _, volume, _ = case
    network = backend.bundle.load_network("cpu")
    seen = []

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        seen.append((tuple(batch.shape), batch.dtype, float(batch.min()), float(batch.max())))
        return network(batch)

    pipeline = SegmentationPipeline(backend.bundle, "cpu")
    out = pipeline.run(volume.array, volume.affine, predictor=predictor)
    assert np.array_equal(out.labels, result.labels)
    assert seen and all(s[0][1:] == (1, 96, 96, 96) and s[0][0] <= 4 for s in seen)
    assert all(s[1] == torch.float32 and 0.0 <= s[2] <= s[3] <= 1.0 for s in seen)


def test_demo_bundle_metadata():
    bundle = load_bundle(DEMO_BUNDLE)
    assert bundle.labels == {1: "spleen"}
    assert bundle.num_classes == 2
    assert bundle.roi_size == (96, 96, 96)
    assert bundle.overlap == 0.25 and bundle.sw_batch_size == 4
    assert (DEMO_BUNDLE / "models" / "model.ts").stat().st_size < 2_000_000


def _bundle_with(tmp_path: Path, inference: dict | str, metadata: dict | None = None) -> Path:
    root = tmp_path / "bundle"
    (root / "configs").mkdir(parents=True)
    text = inference if isinstance(inference, str) else json.dumps(inference)
    (root / "configs" / "inference.json").write_text(text)
    meta = metadata or json.loads((DEMO_BUNDLE / "configs" / "metadata.json").read_text())
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    return root


def test_public_spleen_bundle_config_is_understood(tmp_path):
    root = _bundle_with(tmp_path, PUBLIC_INFERENCE.read_text())
    bundle = load_bundle(root)
    assert bundle.roi_size == (96, 96, 96)
    assert bundle.sw_batch_size == 4 and bundle.overlap == 0.5
    pre = bundle.preprocessing
    assert pre.axcodes == "RAS"
    assert pre.pixdim == (1.5, 1.5, 2.0) and pre.spacing_mode == "bilinear"
    assert (pre.a_min, pre.a_max, pre.b_min, pre.b_max, pre.clip) == (-57, 164, 0, 1, True)
    assert pre.order == ("orientation", "spacing", "intensity")
    network = bundle.build_network()
    assert tuple(network.channels) == (16, 32, 64, 128, 256)
    assert tuple(network.strides) == (2, 2, 2, 2) and network.num_res_units == 2
    with pytest.raises(BundleError, match="model.ts"):
        bundle.load_network()


def test_state_dict_weights_load_into_network_def(tmp_path):
    # Model-zoo bundles ship models/model.pt (a state dict) beside or instead of model.ts.
    root = _bundle_with(tmp_path, PUBLIC_INFERENCE.read_text())
    bundle = load_bundle(root)
    trained = bundle.build_network()
    (root / "models").mkdir()
    torch.save({"model": trained.state_dict()}, root / "models" / "model.pt")
    network = bundle.load_network("cpu")
    assert not network.training
    for name, value in trained.state_dict().items():
        assert torch.equal(network.state_dict()[name], value), name


def test_missing_weights_is_a_clear_error(tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(DEMO_BUNDLE / "configs", root / "configs")
    with pytest.raises(
        BundleError, match=r"no trained weights: neither models/model\.ts nor models/model\.pt"
    ):
        LocalBackend(root, device="cpu")


def test_other_preprocessing_runs_as_monai_transforms(tmp_path):
    # Not the fast path's chain: the bundle's own transforms run (the "bundle" path).
    config = json.loads(PUBLIC_INFERENCE.read_text())
    config["preprocessing"]["transforms"].insert(
        3, {"_target_": "NormalizeIntensityd", "keys": "@image_key"}
    )
    bundle = load_bundle(_bundle_with(tmp_path, config))
    assert bundle.preprocessing is None and not bundle.fast_path
    assert SegmentationPipeline(bundle).path == "bundle"


def test_other_inferers_run_as_the_bundle_says(tmp_path):
    config = json.loads(PUBLIC_INFERENCE.read_text())
    config["inferer"] = {"_target_": "SimpleInferer"}
    bundle = load_bundle(_bundle_with(tmp_path, config))
    assert bundle.roi_size is None and not bundle.fast_path


@pytest.mark.parametrize(
    ("transform", "reason"),
    [
        (
            {"_target_": "ConcatItemsd", "keys": ["image", "pet"], "name": "image"},
            r"combines several images \(ConcatItemsd\): a CT series is one image",
        ),
        (
            {"_target_": "LoadImaged", "keys": ["image", "pet"]},
            r"loads 2 images \(image, pet\) per case",
        ),
    ],
)
def test_a_bundle_that_needs_several_images_is_refused(tmp_path, transform, reason):
    config = json.loads(PUBLIC_INFERENCE.read_text())
    config["preprocessing"]["transforms"].insert(1, transform)
    with pytest.raises(BundleError, match=reason):
        load_bundle(_bundle_with(tmp_path, config))


def test_labels_come_from_the_metadata_or_the_config(tmp_path):
    meta = json.loads((DEMO_BUNDLE / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    with pytest.raises(BundleError, match="names no labels"):
        load_bundle(_bundle_with(tmp_path / "a", PUBLIC_INFERENCE.read_text(), meta))
    config = json.loads(PUBLIC_INFERENCE.read_text())
    config["label_names"] = {"0": "background", "1": "spleen"}
    assert load_bundle(_bundle_with(tmp_path / "b", config, meta)).labels == {1: "spleen"}


def test_a_yaml_config_is_read_as_monai_reads_it(tmp_path):
    import yaml

    config = json.loads(PUBLIC_INFERENCE.read_text())
    root = _bundle_with(tmp_path, config)
    (root / "configs" / "inference.json").unlink()
    (root / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
    bundle = load_bundle(root)
    assert bundle.preprocessing is not None and bundle.preprocessing.pixdim == (1.5, 1.5, 2.0)


def test_weights_are_where_the_checkpoint_loader_points(tmp_path):
    config = json.loads(PUBLIC_INFERENCE.read_text())
    config["checkpointloader"]["load_path"] = "$@bundle_root + '/models/other.pt'"
    root = _bundle_with(tmp_path, config)
    bundle = load_bundle(root)
    assert bundle.weights == root.resolve() / "models" / "other.pt"
    with pytest.raises(BundleError, match=r"models/other\.pt \(checkpointloader#load_path\)"):
        bundle.load_network()
    (root / "models").mkdir()
    torch.save(bundle.build_network().state_dict(), root / "models" / "other.pt")
    assert not bundle.load_network().training


def test_imports_and_the_bundles_own_scripts_are_honoured(tmp_path):
    config = json.loads(PUBLIC_INFERENCE.read_text())
    config["imports"] = ["$import scripts.intensity"]
    config["preprocessing"]["transforms"].append(
        {"_target_": "scripts.intensity.Offsetd", "keys": "@image_key", "offset": 0.5}
    )
    root = _bundle_with(tmp_path, config)
    (root / "scripts").mkdir()
    (root / "scripts" / "__init__.py").write_text("")
    (root / "scripts" / "intensity.py").write_text(
        "from monai.transforms import MapTransform\n\n"
        "class Offsetd(MapTransform):\n"
        "    def __init__(self, keys, offset):\n"
        "        super().__init__(keys)\n"
        "        self.offset = offset\n\n"
        "    def __call__(self, data):\n"
        "        d = dict(data)\n"
        "        for key in self.key_iterator(d):\n"
        "            d[key] = d[key] + self.offset\n"
        "        return d\n"
    )
    bundle = load_bundle(root)
    assert not bundle.fast_path
    pipeline = SegmentationPipeline(bundle)
    data = pipeline._workflow.preprocess(np.zeros((4, 8, 8), np.int16), np.eye(4))
    # ScaleIntensityRange clips HU 0 to (0 + 57) / 221, then the bundle's own offset
    np.testing.assert_allclose(float(data["image"].max()), 57 / 221 + 0.5, rtol=1e-5)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="configs/inference.json"):
        load_bundle(tmp_path / "empty")
