"""The deployment files parse, and agree with each other and with the node's configuration.

No container runs here: these checks catch a YAML slip, a node config the node would refuse,
or a config that names a service, port or path the deployment does not provide.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from dicom_node.config import settings_from_dict
from tests.peers import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

yaml = pytest.importorskip("yaml", reason="pyyaml is a dev dependency (pip install -e .[dev])")

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose"
K8S = DEPLOY / "k8s"


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> dict[tuple[str, str], dict]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_all(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc
    return objects


@pytest.fixture(scope="module")
def compose() -> dict:
    (doc,) = load_all(COMPOSE / "docker-compose.yml")
    return doc


def test_every_yaml_file_parses():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert {f.name for f in files} >= {"docker-compose.yml", "triton.yaml", "node.yaml"}
    for path in files:
        assert load_all(path), f"{path} is empty"


def test_compose_node_config_is_valid_and_points_at_the_services(compose):
    settings = settings_from_dict(tomllib.loads((COMPOSE / "node.toml").read_text()))
    services = compose["services"]
    assert settings.inference.backend == "triton"
    for url in settings.inference.triton_url:
        host, port = url.rsplit(":", 1)
        assert host in services, f"triton_url {url} names no compose service"
        command = " ".join(services[host]["command"])
        # Triton's default gRPC port unless the command sets another.
        assert f"--grpc-port={port}" in command or (port == "8001" and "--grpc-port" not in command)
    # Across containers there is no shared /dev/shm unless the node joins Triton's IPC.
    if services["node"].get("ipc") != "service:triton":
        assert settings.inference.transport == "grpc"
    (pacs,) = settings.destinations
    assert pacs.host in services
    orthanc_env = services[pacs.host]["environment"]
    assert orthanc_env["ORTHANC__DICOM_AET"] == pacs.ae_title
    assert int(orthanc_env["ORTHANC__DICOM_PORT"]) == pacs.port


def test_compose_mounts_what_the_node_config_names(compose):
    settings = settings_from_dict(tomllib.loads((COMPOSE / "node.toml").read_text()))
    node = compose["services"]["node"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in node["volumes"]}
    # data_dir is a named volume, declared at the top level: durable across containers.
    assert mounts[str(settings.data_dir)] in compose["volumes"]
    assert mounts["/etc/dicom-node/node.toml"] == "./node.toml"
    published = {p.split(":")[-1] for p in node["ports"]}
    assert str(settings.node.port) in published
    # The status pages show images: published on the host's loopback only.
    status = [p for p in node["ports"] if p.endswith(f":{settings.status.port}")]
    assert status and all(p.startswith("127.0.0.1:") for p in status)


def test_compose_reserves_a_gpu_and_shared_memory_for_triton(compose):
    triton = compose["services"]["triton"]
    (device,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert triton["shm_size"]
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    command = " ".join(triton["command"])
    for model in ("spleen_seg", "spleen_unet"):
        assert f"--load-model={model}" in command


def test_torch_is_pinned_in_pyproject_only_and_the_images_read_it_there():
    root = COMPOSE.parent.parent
    spec = importlib.util.spec_from_file_location("torch_pin", root / "tools" / "torch_pin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pin = module.torch_pin(root / "pyproject.toml")
    assert pin.startswith("torch==") and pin in (root / "pyproject.toml").read_text()
    node, triton = ((COMPOSE / f).read_text() for f in ("Dockerfile.node", "Dockerfile.triton"))
    assert "FROM python:3.11-slim" in node
    for text in (node, triton, (root / "Makefile").read_text()):
        assert "tools/torch_pin.py" in text
        assert pin not in text, "the pin is repeated instead of read from pyproject.toml"
    assert "!tools/torch_pin.py" in (COMPOSE / "Dockerfile.node.dockerignore").read_text()


def test_k8s_config_map_is_a_valid_node_config_pointing_at_the_triton_service():
    objects = k8s_objects()
    config = objects[("ConfigMap", "dicom-node-config")]["data"]["node.toml"]
    settings = settings_from_dict(tomllib.loads(config))
    service_ports = {p["port"] for p in objects[("Service", "triton")]["spec"]["ports"]}
    for url in settings.inference.triton_url:
        host, port = url.rsplit(":", 1)
        assert ("Service", host) in objects and int(port) in service_ports
    assert settings.inference.transport == "grpc"  # pods do not share /dev/shm

    node = objects[("StatefulSet", "dicom-node")]["spec"]
    (container,) = node["template"]["spec"]["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    # data_dir is the StatefulSet's PersistentVolumeClaim, not an emptyDir.
    claims = {t["metadata"]["name"] for t in node["volumeClaimTemplates"]}
    assert mounts[str(settings.data_dir)] in claims
    assert container["args"][-1] == "/etc/dicom-node/node.toml"
    assert mounts["/etc/dicom-node"] == "config"
    probes = {container[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")}
    assert probes == {"/healthz", "/readyz"}
    assert settings.status.enabled and settings.status.host == "0.0.0.0"

    dicom = objects[("Service", "dicom-node")]["spec"]
    assert [p["port"] for p in dicom["ports"]] == [settings.node.port] == [11112]
    assert dicom["externalTrafficPolicy"] == "Local"  # allowed_hosts sees the caller


def test_k8s_triton_has_a_gpu_and_a_readiness_probe():
    objects = k8s_objects()
    template = objects[("Deployment", "triton")]["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/dev/shm" in mounts
    # The Service selects the Triton pods, and its ports are the container's.
    service = objects[("Service", "triton")]["spec"]
    assert service["selector"].items() <= template["metadata"]["labels"].items()
    names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["ports"]} <= names
