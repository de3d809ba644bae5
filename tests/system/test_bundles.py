"""Installing MONAI bundles: a folder is copied and checked; a broken one is refused clearly."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from dicom_node.cli import main
from dicom_node.config import PROJECT_ROOT
from dicom_node.pipeline import load_bundle

pytestmark = pytest.mark.cost(30)

DEMO = PROJECT_ROOT / "bundles" / "spleen_ct_demo"


def test_install_a_bundle_folder(tmp_path, capsys):
    assert main(["model", "install", str(DEMO), "--dest", str(tmp_path / "bundles")]) == 0
    installed = tmp_path / "bundles" / "spleen_ct_demo"
    bundle = load_bundle(installed)
    assert bundle.labels == load_bundle(DEMO).labels
    assert (installed / "models" / "model.ts").read_bytes() == (
        DEMO / "models" / "model.ts"
    ).read_bytes()
    out = capsys.readouterr().out
    assert f'bundle = "{installed}"' in out
    digest = hashlib.sha256((DEMO / "models" / "model.ts").read_bytes()).hexdigest()
    assert (
        "Spleen CT segmentation (demo) 0.1.0: 1 label, read from configs/metadata.json "
        "network_data_format.outputs.pred.channel_def"
    ) in out
    assert f"weights: models/model.ts, SHA-256 {digest}" in out
    assert "runs: the node's fast path; SlidingWindowInferer on 96x96x96 patches" in out
    # a second install does not overwrite
    assert main(["model", "install", str(DEMO), "--dest", str(tmp_path / "bundles")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_bundle_without_its_network_is_refused(tmp_path, capsys):
    broken = tmp_path / "src" / "broken_bundle"
    shutil.copytree(DEMO, broken)
    (broken / "models" / "model.ts").unlink()
    assert main(["model", "install", str(broken), "--dest", str(tmp_path / "bundles")]) == 2
    err = capsys.readouterr().err
    assert "is not a usable bundle" in err and "Traceback" not in err
    assert not (tmp_path / "bundles" / "broken_bundle").exists()


def test_export_triton_writes_models_a_server_loads(tmp_path, capsys):
    # A model configured by name and bundle only, exported for a Triton server elsewhere.
    from dicom_node.inference.triton.client import TritonBackend
    from dicom_node.inference.triton.server import TritonServer
    from dicom_node_testing.phantom import make_phantom

    config = tmp_path / "node.toml"
    config.write_text(
        f'[[models]]\nname = "spleen"\nbundle = "{PROJECT_ROOT / "bundles" / "spleen_ct_demo"}"\n'
    )
    repo = tmp_path / "repository"
    assert main(["model", "export-triton", "spleen", str(repo), "--config", str(config)]) == 0
    assert "spleen, spleen_network" in capsys.readouterr().out
    assert sorted(p.name for p in repo.iterdir()) == ["spleen", "spleen_network"]
    assert 'string_value: "spleen_network"' in (repo / "spleen" / "config.pbtxt").read_text()
    server = TritonServer(
        repo,
        tmp_path / "server",
        grpc_port=0,
        http_port=0,
        metrics_port=0,
        env={"CUDA_VISIBLE_DEVICES": ""},
    )
    with server:
        client = TritonBackend([server.grpc_url], "spleen", transport="grpc")
        phantom = make_phantom((24, 64, 64), (5.0, 4.0, 4.0), seed=11)
        result = client.segment(phantom.hu, phantom.affine)
        client.close()
    assert result.labels.shape == phantom.hu.shape and result.labels.any()


def test_export_triton_names_an_unknown_model(tmp_path, capsys):
    config = tmp_path / "node.toml"
    config.write_text(f'[[models]]\nname = "spleen"\nbundle = "{tmp_path}"\n')
    assert (
        main(["model", "export-triton", "liver", str(tmp_path / "r"), "--config", str(config)]) == 2
    )
    assert "no [[models]] entry is named 'liver' (configured: spleen)" in capsys.readouterr().err


def test_a_convolutional_network_runs_channels_last_on_a_cpu():
    """load_network puts a convolutional network's weights in channels-last order on a CPU
    (oneDNN's 3D convolutions are faster so); the function is the same, within rounding."""
    import torch
    from monai.networks.nets import UNet

    from dicom_node.pipeline.weights import channels_last_on_cpu

    bundle = load_bundle(PROJECT_ROOT / "bundles" / "spleen_ct_demo")
    loaded = bundle.load_network("cpu")
    kernels = [p for p in loaded.parameters() if p.ndim == 5]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in kernels)
    reference = torch.jit.load(str(bundle.path / "models" / "model.ts")).eval()
    patches = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(patches), reference(patches), rtol=1e-4, atol=1e-4)

    # a network with attention (Linear layers), and any network bound for a GPU, stay as
    # they are
    attention = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.Linear(4, 4))
    assert channels_last_on_cpu(attention, torch.device("cpu")) is attention
    unet = UNet(3, 1, 2, (4, 8), (2,))
    assert channels_last_on_cpu(unet, torch.device("cuda")) is unet
    wide = [p for p in unet.parameters() if p.ndim == 5 and p.shape[1] > 1]
    assert wide and not any(p.is_contiguous(memory_format=torch.channels_last_3d) for p in wide)


def test_a_served_torchscript_network_loads_without_monai(tmp_path):
    """A Triton network model's process: TorchScript weights load with torch alone, the same
    network as the whole bundle reading gives; an amp flag that is an expression takes the
    whole reading (MONAI's parser). State-dict weights, which need MONAI to build the
    network_def, are served in the zoo bundles' run through Triton (test_zoo_bundles)."""
    import json
    import subprocess
    import sys

    probe = (
        "import sys, torch\n"
        "from dicom_node.pipeline.served import load_served_network\n"
        "net, amp = load_served_network(sys.argv[1], 'cpu')\n"
        "x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))\n"
        "with torch.inference_mode():\n"
        "    print(float(net(x).sum()), amp, 'monai' in sys.modules)\n"
    )

    def served(bundle):
        out = subprocess.run(
            [sys.executable, "-c", probe, str(bundle)], capture_output=True, text=True, check=True
        ).stdout.split()
        return float(out[0]), out[1] == "True", out[2] == "True"

    total, amp, monai_loaded = served(DEMO)
    assert (amp, monai_loaded) == (False, False)
    # the same network, in the same layout, as Bundle.load_network gives
    import torch

    net = load_bundle(DEMO).load_network("cpu")
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert abs(float(net(x).sum()) - total) <= 1e-3 * max(1.0, abs(total))

    # amp as an expression: MONAI's parser evaluates it
    bundle = tmp_path / "amp_expression"
    shutil.copytree(DEMO, bundle)
    config = bundle / "configs" / "inference.json"
    doc = json.loads(config.read_text())
    doc.setdefault("evaluator", {"_target_": "SupervisedEvaluator"})["amp"] = "$False"
    config.write_text(json.dumps(doc))
    assert served(bundle)[1:] == (False, True)
