"""Several models on one Triton server: the spleen and liver demo models side by side.

The suite's one server (nvidia-pytriton's tritonserver, on the CPU; ``tests/conftest.py``)
loads spleen_seg, spleen_unet, liver_seg and liver_unet; a phantom neither model saw is
segmented by both at once.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from dicom_node.inference.triton.client import TritonBackend
from dicom_node.inference.triton.managed import models_to_load
from dicom_node.inference.triton.models import bundle_env_name, bundle_path_from_config
from dicom_node.pipeline import load_bundle
from dicom_node_testing.phantom import make_phantom
from tests.peers import LIVER_BUNDLE, MODEL_REPOSITORY, ROOT, SPLEEN_BUNDLE

pytestmark = [pytest.mark.slow, pytest.mark.cost(35)]

REPOSITORY, SPLEEN, LIVER = MODEL_REPOSITORY, SPLEEN_BUNDLE, LIVER_BUNDLE
MODELS = ["spleen_unet", "spleen_seg", "liver_unet", "liver_seg"]
#: Training used seeds from 1000 and evaluation 900-902: the models never saw this one.
SEED = 11

needs_bundles = pytest.mark.skipif(
    not all((b / "models" / "model.ts").is_file() for b in (SPLEEN, LIVER)),
    reason="the demo bundles are not trained yet (tools/train_demo_bundle.py)",
)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((40, 96, 96), (5.0, 3.5, 3.5), seed=SEED)


def network_calls(server) -> dict[str, int]:
    """Patches each demo network has computed since the server started (Triton's count)."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        return {
            m: int(
                client.get_inference_statistics(m, as_json=True)["model_stats"][0].get(
                    "inference_count", 0
                )
            )
            for m in ("spleen_unet", "liver_unet")
        }
    finally:
        client.close()


@pytest.fixture(scope="module")
def both(triton, phantom):
    """Both models' results for the same phantom, requested at the same moment, and the
    patches each network computed for them (the server is shared with other tests)."""
    server = triton
    before = network_calls(server)
    clients = {m: TritonBackend([server.grpc_url], model=m) for m in ("spleen_seg", "liver_seg")}
    start = threading.Barrier(len(clients))
    outcome: dict[str, object] = {}

    def segment(model: str) -> None:
        start.wait()
        try:
            outcome[model] = clients[model].segment(phantom.hu, phantom.affine, contours=True)
        except Exception as exc:  # noqa: BLE001 - reported by the test below
            outcome[model] = exc

    threads = [threading.Thread(target=segment, args=(m,)) for m in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for client in clients.values():
        client.close()
    for model, value in outcome.items():
        if isinstance(value, Exception):
            raise AssertionError(f"{model} failed: {value}") from value
    assert set(outcome) == set(clients), "a request did not finish"
    after = network_calls(server)
    return outcome, {m: after[m] - before[m] for m in after}


@pytest.fixture
def results(both):
    return both[0]


# ------------------------------------------------------------------------- the demo bundles


def test_liver_bundle_defines_the_liver_as_label_1():
    bundle = load_bundle(LIVER)
    assert bundle.labels == {1: "liver"}
    assert bundle.num_classes == 2
    # One preprocessing for both organs: a volume is resampled the same way for each.
    assert bundle.preprocessing == load_bundle(SPLEEN).preprocessing


# ------------------------------------------------------------------------- two models at once


@needs_bundles
def test_spleen_and_liver_segmented_at_once(results, phantom):
    spleen, liver = results["spleen_seg"].labels, results["liver_seg"].labels
    assert spleen.shape == liver.shape == phantom.hu.shape
    assert dice(spleen == 1, phantom.spleen) >= 0.9
    assert dice(liver == 1, phantom.organs["liver"]) >= 0.9
    # Each model answers with its own label only.
    for result in (results["spleen_seg"], results["liver_seg"]):
        assert set(np.unique(result.labels)) == {0, 1}
        assert set(np.unique(result.contours)) == {0, 1}


@needs_bundles
def test_each_segmentation_model_calls_its_own_network(both):
    _, counts = both
    # Same grid and sliding window: each network computed the patches of one volume.
    assert counts["spleen_unet"] > 0
    assert counts["liver_unet"] == counts["spleen_unet"]


# ------------------------------------------------------------------------- bundle selection


def _config(name: str, bundle: str, **parameters: str) -> dict:
    values = {"bundle": bundle, **parameters}
    return {"name": name, "parameters": {k: {"string_value": v} for k, v in values.items()}}


def test_bundle_comes_from_the_config_without_overrides(monkeypatch, tmp_path):
    for name in ("DICOM_NODE_BUNDLE_LIVER_SEG", "DICOM_NODE_BUNDLE_LIVER_UNET"):
        monkeypatch.delenv(name, raising=False)
    model_dir = tmp_path / "repo" / "liver_seg"
    config = _config("liver_seg", "../bundles/liver_ct_demo")
    assert bundle_path_from_config(config, model_dir) == tmp_path / "bundles" / "liver_ct_demo"


def test_per_model_override_and_network_model_follows_its_caller(monkeypatch, tmp_path):
    monkeypatch.delenv("DICOM_NODE_BUNDLE_LIVER_UNET", raising=False)
    monkeypatch.setenv("DICOM_NODE_BUNDLE_LIVER_SEG", str(tmp_path / "liver"))
    seg = _config("liver_seg", "../bundles/liver_ct_demo", network_model="liver_unet")
    unet = _config("liver_unet", "../bundles/liver_ct_demo", segmentation_model="liver_seg")
    repo = tmp_path / "repo"
    assert bundle_path_from_config(seg, repo / "liver_seg") == tmp_path / "liver"
    assert bundle_path_from_config(unet, repo / "liver_unet") == tmp_path / "liver"
    # The network model's own variable wins over its caller's.
    monkeypatch.setenv("DICOM_NODE_BUNDLE_LIVER_UNET", str(tmp_path / "unet"))
    assert bundle_path_from_config(unet, repo / "liver_unet") == tmp_path / "unet"


def _repository_config(model: str) -> dict:
    """A model's config.pbtxt as the server reads it, in the form model.py receives it."""
    text = (REPOSITORY / model / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


@pytest.mark.parametrize("organ", ["spleen", "liver"])
def test_repository_pairs_each_segmentation_model_with_its_network(monkeypatch, organ):
    for suffix in (f"_{organ.upper()}_SEG", f"_{organ.upper()}_UNET"):
        monkeypatch.delenv(f"DICOM_NODE_BUNDLE{suffix}", raising=False)
    seg, unet = _repository_config(f"{organ}_seg"), _repository_config(f"{organ}_unet")
    assert seg["name"] == f"{organ}_seg" and unet["name"] == f"{organ}_unet"
    assert seg["parameters"]["network_model"]["string_value"] == unet["name"]
    assert unet["parameters"]["segmentation_model"]["string_value"] == seg["name"]
    bundle = ROOT / "bundles" / f"{organ}_ct_demo"
    assert bundle_path_from_config(seg, REPOSITORY / seg["name"]) == bundle
    assert bundle_path_from_config(unet, REPOSITORY / unet["name"]) == bundle


def test_a_segmentation_model_brings_its_network_model(tmp_path):
    """A managed server loads what the configured models call, read from their config.pbtxt
    as Triton reads it (parameters in any order and layout)."""
    repo = tmp_path / "models"
    (repo / "a_seg").mkdir(parents=True)
    (repo / "a_seg" / "config.pbtxt").write_text(
        'name: "a_seg"\nbackend: "python"\n'
        "parameters [\n"
        '  { key: "bundle" value: { string_value: "../b" } },\n'
        '  {\n    key: "network_model"\n    value: { string_value: "a_unet" }\n  }\n]\n'
    )
    assert models_to_load(repo, ["a_seg", "echo"]) == ["a_seg", "a_unet", "echo"]
    assert bundle_env_name("liver-seg.v2") == "DICOM_NODE_BUNDLE_LIVER_SEG_V2"
