"""The MONAI model zoo's CT bundles run on the node exactly as MONAI itself runs them.

``../shared/zoo`` holds the published configs of three bundles (spleen_ct_segmentation,
swin_unetr_btcv_segmentation, wholeBody_ct_segmentation: 1, 13 and 104 organs). Their weights
cannot be downloaded here: each test bundle gets a network built from its own ``network_def``
with ``torch.manual_seed(0)``, saved where its ``checkpointloader#load_path`` points. The
output of such a network means nothing clinically, but it is a deterministic function of the
input, so the node's labels can be compared voxel for voxel with the reference: MONAI's own
bundle workflow on a NIfTI of the same series (the bundle's ``preprocessing``, ``inferer``
and ``postprocessing`` as :class:`monai.bundle.ConfigParser` builds them, ``SaveImaged``
left out).

swin_unetr_btcv_segmentation 0.5.6 was published for MONAI 1.4: its ``network_def`` passes
SwinUNETR an ``img_size`` that MONAI 1.5 removed, so MONAI 1.6 (this node's) cannot build it
either. The node refuses it at install, saying so; the comparison runs on the config as the
zoo's later versions write it, without ``img_size``. Its ``LoadImaged`` names ITK's reader,
which the node never calls (it loads the series itself); the reference reads the NIfTI with
MONAI's default reader instead, since ITK is not installed here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.bundle import ConfigParser
from monai.transforms import Compose

from dicom_node.encode import segment_info_for
from dicom_node.pipeline import SegmentationPipeline, load_bundle, read_bundle_info
from dicom_node.pipeline.install import BundleInstallError, install_bundle, write_seeded_weights
from dicom_node.pipeline.transforms import ras_affine
from dicom_node.series.volume import assemble_series
from dicom_node_testing.phantom import make_phantom
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests import checks
from tests.peers import TEST_DATA
from tests.peers import testdata as shared_data

ZOO = shared_data().parent / "zoo"
BUNDLES = ["spleen_ct_segmentation", "swin_unetr_btcv_segmentation", "wholeBody_ct_segmentation"]

pytestmark = [
    pytest.mark.skipif(not ZOO.is_dir(), reason=f"no model-zoo configs at {ZOO}"),
    pytest.mark.cost(10),
]


def zoo_bundle(name: str, dest: Path, *, as_published: bool = False) -> Path:
    """A copy of the published bundle's configs with seeded weights."""
    root = dest / name
    shutil.copytree(ZOO / name / "configs", root / "configs")
    if name.startswith("swin_unetr") and not as_published:
        config = root / "configs" / "inference.json"
        doc = json.loads(config.read_text())
        doc["network_def"].pop("img_size")
        config.write_text(json.dumps(doc, indent=4))
    if as_published:
        return root
    write_seeded_weights(root)
    return root


def unseen_variant(dest: Path) -> Path:
    """A bundle laid out as the three are not: a YAML config, its CheckpointLoader among the
    handlers pointing at another weights file, its labels in the config rather than in
    metadata.json, and CropForegroundd before the network (made from the spleen bundle)."""
    root = dest / "spleen_variant"
    (root / "configs").mkdir(parents=True)
    config = json.loads((ZOO / "spleen_ct_segmentation/configs/inference.json").read_text())
    del config["checkpointloader"]
    config["initialize"] = ["$monai.utils.set_determinism(seed=123)"]
    config["handlers"].insert(
        0,
        {
            "_target_": "CheckpointLoader",
            "load_path": "$@bundle_root + '/models/weights_v2.pt'",
            "load_dict": {"model": "@network"},
        },
    )
    config["label_names"] = ["background", "spleen"]
    transforms = config["preprocessing"]["transforms"]
    at = next(i for i, t in enumerate(transforms) if t["_target_"] == "ScaleIntensityRanged")
    transforms.insert(
        at + 1,
        {
            "_target_": "CropForegroundd",
            "keys": "@image_key",
            "source_key": "@image_key",
            "allow_smaller": True,
        },
    )
    (root / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
    meta = json.loads((ZOO / "spleen_ct_segmentation/configs/metadata.json").read_text())
    meta["name"] = "Spleen variant"
    del meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    bundle = load_bundle(root)
    assert bundle.weights == root.resolve() / "models" / "weights_v2.pt"
    torch.manual_seed(0)
    network = bundle.build_network()
    bundle.weights.parent.mkdir()
    torch.save({"model": network.state_dict()}, bundle.weights)  # as CheckpointSaver saves
    return root


def _weights(parser: ConfigParser, config: dict) -> Path:
    if "checkpointloader" in config:
        return Path(parser.get_parsed_content("checkpointloader#load_path"))
    at = next(i for i, h in enumerate(config["handlers"]) if h["_target_"] == "CheckpointLoader")
    return Path(parser.get_parsed_content(f"handlers#{at}#load_path"))


def monai_reference(root: Path, hu: np.ndarray, affine: np.ndarray, tmp: Path) -> np.ndarray:
    """MONAI's own bundle workflow on a NIfTI of the series: labels (slices, rows, columns)."""
    nifti = tmp / f"{root.name}.nii.gz"
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0).astype(np.float32), ras_affine(affine)), nifti)
    parser = ConfigParser()
    (config_path,) = (root / "configs").glob("inference.*")
    parser.read_config(str(config_path))
    parser.read_meta(str(root / "configs" / "metadata.json"))
    parser["bundle_root"] = str(root)
    for item in parser["preprocessing"]["transforms"]:
        if item["_target_"] == "LoadImaged":
            item.pop("reader", None)  # ITKReader: see the module's docstring
    preprocessing = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    postprocessing = parser.get_parsed_content("postprocessing")
    network = parser.get_parsed_content("network_def")
    state = torch.load(_weights(parser, parser.get()), weights_only=True)
    network.load_state_dict(state.get("model", state))
    network.eval()
    data = preprocessing({"image": str(nifti)})
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    writers = ("SaveImaged",)
    data = Compose([t for t in postprocessing.transforms if type(t).__name__ not in writers])(data)
    pred = np.asarray(data["pred"])[0]
    return pred.transpose(2, 1, 0).round().astype(np.uint8)


def label_dice(labels: np.ndarray, reference: np.ndarray) -> dict[int, float]:
    """Dice of each label with at least 500 voxels in the reference (smaller ones move by
    more than their size allows from noise alone)."""
    values, counts = np.unique(reference, return_counts=True)
    return {
        int(v): checks.dice(labels == v, reference == v)
        for v, n in zip(values, counts, strict=True)
        if v != 0 and n >= 500
    }


def assert_same_labels(labels: np.ndarray, reference: np.ndarray, what: str) -> None:
    dice = label_dice(labels, reference)
    assert dice, f"{what}: no label of 500 voxels"
    mean, worst = float(np.mean(list(dice.values()))), min(dice.values())
    print(f"{what}: {len(dice)} labels, mean Dice vs MONAI {mean:.4f}, lowest {worst:.4f}")
    assert mean >= 0.99 and worst >= 0.95, (what, dice)


def _series(tmp: Path, columns: int):
    """A small abdominal phantom as a DICOM series, and its assembled volume."""
    phantom = make_phantom(
        (20, 40, columns), (5.0, 3.0, 3.0), seed=3, origin=(-1.5 * columns, -60.0, -560.0)
    )
    attrs = SeriesAttributes(patient_name="Zoo^Phantom", patient_id="ZOO-1")
    paths = write_ct_series(
        phantom.hu, tmp / "ct", spacing=phantom.spacing, origin=phantom.origin, attrs=attrs
    )
    return paths, assemble_series(paths), attrs


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """168 x 120 x 100 mm: at the bundles' 1.5 mm in-plane, two 96^3 windows side by side, so
    that the sliding window blends an overlap (two network runs per bundle)."""
    return _series(tmp_path_factory.mktemp("zoo-ct"), 56)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return Bundles(tmp_path_factory.mktemp("zoo"))


class Bundles(dict):
    """The test bundles by name, each made when first asked for (the BTCV and wholeBody
    networks' seeded weights take seconds to draw, and only some tests need them)."""

    def __init__(self, tmp: Path) -> None:
        super().__init__()
        self._tmp = tmp

    def __missing__(self, name: str) -> Path:
        made = (
            unseen_variant(self._tmp) if name == "spleen_variant" else zoo_bundle(name, self._tmp)
        )
        self[name] = made
        return made


class References(dict):
    """MONAI's labels for each bundle, computed when first asked for (BTCV's and
    wholeBody's take longest, and only the Triton test needs them)."""

    def __init__(self, bundles: dict[str, Path], volume, tmp: Path) -> None:
        super().__init__()
        self._bundles, self._volume, self._tmp = bundles, volume, tmp

    def __missing__(self, name: str) -> np.ndarray:
        root = self._bundles[name]
        self[name] = monai_reference(root, self._volume.array, self._volume.affine, self._tmp)
        return self[name]


@pytest.fixture(scope="module")
def references(bundles, series, tmp_path_factory):
    _, volume, _ = series
    return References(bundles, volume, tmp_path_factory.mktemp("zoo-reference"))


@pytest.mark.slow
# The BTCV and wholeBody networks take most of a minute on two cores: they are compared
# through Triton below, where the same pipeline runs.
@pytest.mark.parametrize("name", ["spleen_ct_segmentation", "spleen_variant"])
def test_in_process_labels_are_monai_s_own(name, bundles, references, series):
    _, volume, _ = series
    bundle = load_bundle(bundles[name])
    pipeline = SegmentationPipeline(bundle, "cpu")
    # The published spleen config's preprocessing is the fast path's; the variant crops.
    assert pipeline.path == ("fast" if name == "spleen_ct_segmentation" else "bundle")
    result = pipeline.run(volume.array, volume.affine, contours=False)
    reference = references[name]
    assert result.labels.shape == reference.shape == volume.array.shape
    assert len(np.unique(reference)) > 1, "the seeded network labels something"
    assert_same_labels(result.labels, reference, f"{name} in-process")


def test_a_bundle_laid_out_otherwise_installs(bundles, tmp_path):
    installed = install_bundle(str(bundles["spleen_variant"]), tmp_path)
    bundle = load_bundle(installed)
    assert bundle.labels == {1: "spleen"} and bundle.weights.name == "weights_v2.pt"
    assert not bundle.load_network().training


def test_the_published_btcv_config_is_refused_with_the_reason(tmp_path):
    root = zoo_bundle("swin_unetr_btcv_segmentation", tmp_path / "src", as_published=True)
    (root / "models").mkdir()
    (root / "models" / "model.pt").write_bytes(b"")
    with pytest.raises(BundleInstallError) as info:
        install_bundle(str(root), tmp_path / "installed")
    message = str(info.value)
    assert "img_size" in message and "made for MONAI 1.4.0" in message
    assert "\n" not in message
    assert not (tmp_path / "installed" / root.name).exists()


def test_labels_of_the_three_bundles_are_read_from_their_metadata(bundles, tmp_path):
    roots = {name: zoo_bundle(name, tmp_path, as_published=True) for name in BUNDLES}
    roots["spleen_variant"] = bundles["spleen_variant"]
    counts = {name: len(read_bundle_info(root).labels) for name, root in roots.items()}
    assert counts == {
        "spleen_ct_segmentation": 1,
        "swin_unetr_btcv_segmentation": 13,
        "wholeBody_ct_segmentation": 104,
        "spleen_variant": 1,
    }


#: Published configs of the zoo's other CT bundles (see tests/data/zoo/README.md).
MORE_CONFIGS = TEST_DATA / "zoo"


def published(name: str, dest: Path, *, metadata: dict | None = None) -> Path:
    """A bundle folder with a published config (and ``metadata`` instead of its own)."""
    root = dest / name
    shutil.copytree(MORE_CONFIGS / name / "configs", root / "configs")
    if metadata is not None:
        (root / "configs" / "metadata.json").write_text(json.dumps(metadata))
    return root


def _metadata(name: str) -> dict:
    return json.loads((MORE_CONFIGS / name / "configs" / "metadata.json").read_text())


def test_labels_named_by_metadata_label_def(tmp_path):
    info = read_bundle_info(published("pediatric_abdominal_ct_segmentation", tmp_path))
    assert info.labels == {1: "liver", 2: "spleen", 3: "pancreas"}
    assert info.labels_from.endswith("outputs.pred.label_def")


def test_labels_named_in_the_config_from_names_to_values(tmp_path):
    for name, key, labels in (
        (
            "pediatric_abdominal_ct_segmentation",
            "label_def",
            {1: "liver", 2: "spleen", 3: "pancreas"},
        ),
        ("spleen_deepedit_annotation", "channel_def", {1: "spleen"}),
    ):
        meta = _metadata(name)
        del meta["network_data_format"]["outputs"]["pred"][key]
        info = read_bundle_info(published(name, tmp_path, metadata=meta))
        assert info.labels == labels, name
        assert info.labels_from.endswith("(names to values)"), info.labels_from


def test_vista3d_labels_are_its_everything_classes_named_by_its_metadata(tmp_path):
    """VISTA-3D's labels: the 117 classes of its evaluator's everything_labels (an
    expression), named by its metadata's channel_def. The config imports the bundle's
    scripts package, which these expressions do not use: an empty one stands in for it."""
    root = published("vista3d", tmp_path)
    (root / "scripts").mkdir()
    (root / "scripts" / "__init__.py").write_text("")
    info = read_bundle_info(root)
    assert info.everything is not None and len(info.everything) == len(info.labels) == 117
    channel_def = _metadata("vista3d")["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert info.labels == {v: channel_def[str(v)] for v in info.everything}
    left_out = {2, 16, 18, 20, 21, 23, 24, 25, 26, 27, 128, 129, 130, 131, 132}
    assert set(info.labels) == set(range(1, 133)) - left_out
    assert "everything_labels" in info.labels_from
    generic = [n for n in info.labels.values() if segment_info_for(1, n).code.value == "123037004"]
    assert generic == [], generic


def test_what_cannot_apply_to_one_series_is_refused_in_one_true_sentence(tmp_path):
    cases = {
        "renalStructures_CECT_segmentation": (
            "loads 4 images (artery, vein, excret, label) per case: a CT series is one image"
        ),
        "pancreas_ct_dints_segmentation": "models/search_code_18590.pt, which is not there",
    }
    for name, reason in cases.items():
        root = published(name, tmp_path / "src")
        (root / "models").mkdir()
        (root / "models" / "model.pt").write_bytes(b"")
        with pytest.raises(BundleInstallError) as info:
            install_bundle(str(root), tmp_path / "installed")
        message = str(info.value)
        assert reason in message and "\n" not in message, message
        assert not (tmp_path / "installed" / name).exists()
