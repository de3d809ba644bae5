"""The zoo's CT bundles whose configs import their own ``scripts/``, on the node and through
Triton, against MONAI's own workflow (slow: run beside the suite, not in it).

Run with ``DICOM_NODE_SLOW=1``, and ``DICOM_NODE_MODEL_ZOO`` naming a checkout of
Project-MONAI/model-zoo (the folder holding ``models/``) unless ``../shared/zoo`` holds these
bundles' ``scripts/`` (their code is not copied into this repository, see
``tests/data/zoo/README.md``)::

    DICOM_NODE_SLOW=1 DICOM_NODE_MODEL_ZOO=/path/to/model-zoo \\
        .venv/bin/pytest -q -p no:cacheprovider --timeout 1200 tests/slow

Each bundle is built from its published configs (``tests/data/zoo``) and scripts, with
weights drawn from its own ``network_def`` (``torch.manual_seed(0)``). The reference is the
bundle run as ``monai.bundle.run`` runs it: its own evaluator (VISTA-3D's
``Vista3dEvaluator`` from its ``scripts/``, with no prompt: its everything mode) over a NIfTI
of the series, its ``SaveImaged`` writing the labels read back here. The node's labels (in
process, and through a node serving the bundles on its Triton server, read back from the SEG
in the PACS) must equal them: Dice 1.0 on every label present.

VISTA-3D is 218 M parameters (some 30 s for one 128^3 patch on two cores): its phantom fits
one patch.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from dicom_node.pipeline import SegmentationPipeline, load_bundle, read_bundle_info
from dicom_node.pipeline.install import write_seeded_weights
from dicom_node.pipeline.metadata import read_config
from dicom_node.pipeline.transforms import ras_affine
from tests import checks
from tests.peers import TEST_DATA, NodeProcess, Orthanc, managed_triton, pacs_destination, storescu
from tests.peers import testdata as shared_data
from tests.system.test_zoo_bundles import _series

CONFIGS = TEST_DATA / "zoo"


def _zoo() -> Path | None:
    """Where the bundles' ``scripts/`` are: ``DICOM_NODE_MODEL_ZOO`` (a model-zoo checkout,
    or a folder of bundles), else ``../shared/zoo`` if it holds them."""
    for base in (os.environ.get("DICOM_NODE_MODEL_ZOO"), str(shared_data().parent / "zoo")):
        for folder in (Path(base) / "models", Path(base)) if base else ():
            if all((folder / name / "scripts").is_dir() for name in BUNDLES):
                return folder
    return None


#: The bundles, and the model name each is served as.
BUNDLES = {
    "vista3d": "vista",
    "spleen_deepedit_annotation": "deepedit",
    "pediatric_abdominal_ct_segmentation": "pediatric",
    "renalStructures_UNEST_segmentation": "unest",
}
ZOO = _zoo()

pytestmark = [
    pytest.mark.skipif(not os.environ.get("DICOM_NODE_SLOW"), reason="DICOM_NODE_SLOW unset"),
    pytest.mark.skipif(ZOO is None, reason="no model-zoo scripts (DICOM_NODE_MODEL_ZOO)"),
]


def zoo_bundle(name: str, dest: Path) -> Path:
    """The published configs, the bundle's own scripts and seeded weights, in ``dest``."""
    root = dest / name
    shutil.copytree(CONFIGS / name / "configs", root / "configs")
    assert ZOO is not None
    shutil.copytree(ZOO / name / "scripts", root / "scripts")
    write_seeded_weights(root)
    return root


def monai_run(root: Path, hu: np.ndarray, affine: np.ndarray, tmp: Path) -> np.ndarray:
    """The bundle as ``monai.bundle.run`` runs it on a NIfTI of the series: its evaluator,
    its transforms and inferer, its ``SaveImaged``; the labels (slices, rows, columns)."""
    from monai.bundle import ConfigWorkflow

    nifti = tmp / f"{root.name}.nii.gz"
    image = hu.transpose(2, 1, 0).astype(np.float32)
    nib.save(nib.Nifti1Image(image, ras_affine(affine)), nifti)
    out = tmp / f"{root.name}-out"
    (config,) = (root / "configs").glob("inference.*")
    override = {
        "bundle_root": str(root),
        "output_dir": str(out),
        "device": torch.device("cpu"),
        "dataloader#num_workers": 0,
    }
    # one case, the image alone: for VISTA-3D no prompt, its everything mode
    override["dataset#data"] = [{"image": str(nifti)}]
    # DeepEdit's and the pediatric bundle's LoadImaged name ITK's reader; MONAI's default
    # reader loads a NIfTI alike, and ITK is not installed here (nor needed by the node).
    workflow = ConfigWorkflow(
        config_file=str(config),
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        # renalStructures_UNEST_segmentation names its run "evaluating"
        run_id="run" if "run" in read_config(config, root) else "evaluating",
        **override,
    )
    for at, _item in _loaders(workflow.parser.get()):
        workflow.parser[f"{at}#reader"] = None
    workflow.initialize()
    workflow.run()
    (saved,) = out.rglob("*.nii.gz")
    labels = np.asarray(nib.load(saved).dataobj)
    labels = labels.reshape(labels.shape[:3])
    return np.nan_to_num(labels, nan=255).transpose(2, 1, 0).round().astype(np.uint8)


def _loaders(config, at=""):
    if isinstance(config, dict):
        if str(config.get("_target_", "")).endswith("LoadImaged") and "reader" in config:
            yield at, config
        items = config.items()
    elif isinstance(config, list):
        items = enumerate(config)
    else:
        return
    for key, child in items:
        yield from _loaders(child, f"{at}#{key}" if at else str(key))


def assert_identical(labels: np.ndarray, reference: np.ndarray, what: str) -> None:
    present = [int(v) for v in np.unique(reference) if v != 0]
    assert present, f"{what}: the reference labels nothing"
    dice = {v: checks.dice(labels == v, reference == v) for v in present}
    print(f"{what}: {len(present)} labels present, lowest Dice {min(dice.values()):.4f}")
    assert sorted(np.unique(labels)) == sorted(np.unique(reference)), what
    assert all(d == 1.0 for d in dice.values()), (what, dice)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """144 x 120 x 100 mm: one 128^3 patch for VISTA-3D at its 1.5 mm."""
    return _series(tmp_path_factory.mktemp("zoo-slow-ct"), 48)


class Bundles(dict):
    """Each bundle folder, made when first asked for (VISTA-3D's weights are 870 MB)."""

    def __init__(self, tmp: Path) -> None:
        super().__init__()
        self._tmp = tmp

    def __missing__(self, name: str) -> Path:
        self[name] = zoo_bundle(name, self._tmp)
        return self[name]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return Bundles(tmp_path_factory.mktemp("zoo-slow"))


class References(dict):
    """MONAI's labels for each bundle, computed when first asked for, each in a process of
    its own: VISTA-3D's run takes some 5 GB, which a process that ends gives back."""

    def __init__(self, bundles: Bundles, volume, tmp: Path) -> None:
        super().__init__()
        self._bundles, self._volume, self._tmp = bundles, volume, tmp

    def __missing__(self, name: str) -> np.ndarray:
        volume = self._volume
        self[name] = in_child(
            monai_run, self._bundles[name], volume.array, volume.affine, self._tmp
        )
        return self[name]


def in_child(function, *args):
    """``function(*args)`` in a process of its own, which gives its memory back when done."""
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as child:
        return child.submit(function, *args).result()


def node_labels(root: Path, hu: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The node's labels, its pipeline and the bundle's network in this process."""
    result = SegmentationPipeline(load_bundle(root), "cpu").run(hu, affine, contours=False)
    return result.labels


@pytest.fixture(scope="module")
def references(bundles, series, tmp_path_factory):
    _, volume, _ = series
    return References(bundles, volume, tmp_path_factory.mktemp("zoo-slow-ref"))


@pytest.mark.parametrize("name", list(BUNDLES))
def test_in_process_labels_are_monai_s_own(name, bundles, references, series):
    _, volume, _ = series
    labels = in_child(node_labels, bundles[name], volume.array, volume.affine)
    assert labels.shape == volume.array.shape
    assert_identical(labels, references[name], f"{name} in process")


def test_vista3d_returns_its_117_classes_named_from_its_metadata(bundles):
    info = read_bundle_info(bundles["vista3d"])
    assert len(info.labels) == len(info.everything) == 117
    assert info.labels[3] == "spleen" and 2 not in info.labels  # "kidney": left and right
    assert "everything_labels" in info.labels_from


#: The bundles each node serves through its Triton server, one node at a time: VISTA-3D's
#: network and its logits (0.98 GB a patch) take memory enough on their own.
GROUPS = (
    ("vista3d",),
    (
        "spleen_deepedit_annotation",
        "pediatric_abdominal_ct_segmentation",
        "renalStructures_UNEST_segmentation",
    ),
)


def serve(names: tuple[str, ...], bundles: Bundles, series, tmp: Path) -> dict[str, Path]:
    """The series pushed to a node serving ``names`` on its Triton server; each bundle's SEG
    as the PACS holds it (by algorithm name), every result object checked by dciodvfy."""
    paths, _, attrs = series
    pacs = Orthanc(tmp / "pacs").start()
    node = NodeProcess(
        tmp / "node",
        node={"settle_seconds": 1.0},
        inference=managed_triton(startup_timeout_seconds=600),
        models=[{"name": BUNDLES[n], "bundle": str(bundles[n])} for n in names],
        routes=[{"models": [BUNDLES[n] for n in names]}],
        destinations=[pacs_destination(pacs)],
    )
    try:
        node.start()
        assert storescu(node.port, paths).returncode == 0

        node.wait_for_results_sent(
            attrs.series_instance_uid, timeout=1800, what="the results in the PACS"
        )
        segs = {}
        for path in pacs.download_study(attrs.study_instance_uid, tmp):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if ds.Modality == "SEG":
                ident = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
                segs[str(ident.AlgorithmName)] = path
            if ds.Modality != "CT":
                assert checks.dciodvfy_errors(path) == [], (ds.Modality, ds.SeriesDescription)
        return segs
    finally:
        node.stop()
        pacs.stop()


class Served(dict):
    """Each bundle's SEG through Triton; a group's node runs when one of its bundles is
    first asked for, and is stopped before the next starts."""

    def __init__(self, bundles: Bundles, series, tmp_path_factory) -> None:
        super().__init__()
        self._bundles, self._series, self._tmp = bundles, series, tmp_path_factory

    def __missing__(self, name: str) -> Path:
        (group,) = (g for g in GROUPS if name in g)
        segs = serve(group, self._bundles, self._series, self._tmp.mktemp("zoo-slow-triton"))
        for member in group:
            self[member] = segs[read_bundle_info(self._bundles[member]).name]
        return self[name]


@pytest.fixture(scope="module")
def through_triton(bundles, series, tmp_path_factory):
    return Served(bundles, series, tmp_path_factory)


@pytest.mark.parametrize("name", list(BUNDLES))
def test_labels_through_triton_are_monai_s_own(name, bundles, references, series, through_triton):
    _, volume, _ = series
    info = read_bundle_info(bundles[name])
    seg = hd.seg.segread(through_triton[name])
    (ident,) = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence
    assert f"weights_sha256={info.weights_sha256}" in ident.AlgorithmParameters
    by_name = {v: k for k, v in info.labels.items()}
    labels = np.zeros(volume.array.shape, np.uint8)
    for item in seg.SegmentSequence:
        labels[checks.seg_mask(seg, volume, int(item.SegmentNumber))] = by_name[
            str(item.SegmentLabel)
        ]
    assert_identical(labels, references[name], f"{name} through Triton")
