"""The Triton hosting against a real server: nvidia-pytriton's tritonserver, on the CPU.

The suite's one server (echo, spleen_unet, spleen_seg; see ``tests/conftest.py``) serves most
tests; the restart and start-failure tests start servers of their own.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from dicom_node.common.network import is_loopback
from dicom_node.config import InferenceSettings, ModelSettings
from dicom_node.inference import Backend, InferenceError, create_backends
from dicom_node.inference.triton.client import TritonBackend
from dicom_node.inference.triton.cuda_shm import unavailable_reason
from dicom_node.inference.triton.managed import ManagedTritonBackend
from dicom_node.inference.triton.placement import Registration, wait_for_releases
from dicom_node.inference.triton.server import TritonServer, TritonStartError
from dicom_node.inference.triton.shm import named_regions, region_of, shared_empty, unlink
from tests.peers import MODEL_REPOSITORY, SPLEEN_BUNDLE, free_port

pytestmark = [pytest.mark.slow, pytest.mark.cost(55)]

REPOSITORY = MODEL_REPOSITORY
BUNDLE = SPLEEN_BUNDLE
PHANTOM_SHAPE = (40, 96, 96)
PHANTOM_SPACING = (5.0, 3.5, 3.5)

needs_bundle = pytest.mark.skipif(
    not (BUNDLE / "models" / "model.ts").is_file(),
    reason="the demo bundle is not trained yet (make demo-bundle)",
)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="session")
def server(triton):
    """The suite's shared server (``echo``, ``spleen_unet``, ``spleen_seg``: conftest)."""
    return triton


@pytest.fixture(scope="module")
def phantom():
    from dicom_node_testing.phantom import make_phantom

    return make_phantom(PHANTOM_SHAPE, PHANTOM_SPACING, seed=3)


@pytest.fixture(scope="module")
def grpc_result(server, phantom):
    # The first URL refuses connections: the request must fail over to the live server.
    client = TritonBackend([f"127.0.0.1:{free_port()}", server.grpc_url], transport="grpc")
    try:
        return client.segment(phantom.hu, phantom.affine, contours=True)
    finally:
        client.close()


@pytest.fixture(scope="module")
def shm_result(server, phantom):
    client = TritonBackend([server.grpc_url], transport="auto")
    assert client.uses_shm(server.grpc_url)
    try:
        return client.segment(phantom.hu, phantom.affine, contours=True)
    finally:
        client.close()


# ------------------------------------------------------------------------- transport


def test_echo_round_trip_grpc_and_shm(server):
    volume = np.random.default_rng(1).integers(-1024, 3072, size=(17, 64, 48), dtype=np.int16)
    client = grpcclient.InferenceServerClient(server.grpc_url)

    inp = grpcclient.InferInput("INPUT", list(volume.shape), "INT16")
    inp.set_data_from_numpy(volume)
    over_grpc = client.infer("echo", [inp]).as_numpy("OUTPUT")

    both = shared_empty((2, *volume.shape), np.int16)
    region = region_of(both)
    registration = Registration(client, region, timeout=10.0)
    try:
        status = client.get_system_shared_memory_status(as_json=True)
        assert registration.name in status["regions"]
        both[0] = volume
        inp = grpcclient.InferInput("INPUT", list(volume.shape), "INT16")
        inp.set_shared_memory(registration.name, volume.nbytes, 0)
        out = grpcclient.InferRequestedOutput("OUTPUT")
        out.set_shared_memory(registration.name, volume.nbytes, volume.nbytes)
        client.infer("echo", [inp], outputs=[out])
        over_shm = both[1]
    finally:
        registration.release()
        unlink(region)

    np.testing.assert_array_equal(over_grpc, volume)
    np.testing.assert_array_equal(over_shm, volume)
    # Released: the server keeps no registration and the name is gone from /dev/shm; the
    # memory itself goes with the last array viewing it.
    assert client.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}
    assert not region.path.exists()
    client.close()


def test_a_port_another_server_holds_is_refused_before_starting(server, tmp_path):
    other = TritonServer(
        REPOSITORY,
        tmp_path,
        grpc_port=server.grpc_port,
        http_port=0,
        metrics_port=0,
        models=["echo"],
        startup_timeout=30.0,
    )
    with pytest.raises(TritonStartError, match=rf"port {server.grpc_port} \(grpc_port\).*in use"):
        other.start()
    assert not other.is_alive()


def test_readiness_is_asked_of_the_server_this_node_started(server, tmp_path):
    # Whatever answers on the ports must be the process started with this object's --id.
    other = TritonServer(REPOSITORY, tmp_path, grpc_port=server.grpc_port, models=["echo"])
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert server._ready(client)
        with pytest.raises(TritonStartError, match="another Triton server .* answers"):
            other._ready(client)
    finally:
        client.close()


def test_loopback_detection():
    assert is_loopback("127.0.0.1:8001") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert is_loopback("localhost:8001")
    assert is_loopback("[::1]:8001")
    assert not is_loopback("10.1.2.3:8001")
    assert not TritonBackend(["10.1.2.3:8001"], transport="auto").uses_shm("10.1.2.3:8001")


# ------------------------------------------------------------------------- spleen_seg


@needs_bundle
def test_spleen_seg_finds_the_phantom_spleen(grpc_result, phantom):
    labels = grpc_result.labels
    assert labels.shape == PHANTOM_SHAPE and labels.dtype == np.uint8
    assert dice(labels == 1, phantom.spleen) >= 0.9
    # Contours are label voxels on the boundary of the label.
    contours = grpc_result.contours
    assert contours.any()
    assert np.all(labels[contours > 0] == contours[contours > 0])
    for key in ("pre", "inference", "post", "server", "transfer"):
        assert grpc_result.timings[key] >= 0.0


@needs_bundle
def test_shared_memory_and_grpc_give_the_same_result(grpc_result, shm_result):
    np.testing.assert_array_equal(shm_result.labels, grpc_result.labels)
    np.testing.assert_array_equal(shm_result.contours, grpc_result.contours)
    assert _named_regions() == []


@needs_bundle
def test_cuda_transport_without_a_gpu_falls_back_to_system_shared_memory(
    server, grpc_result, phantom, caplog
):
    # No GPU (or no cuda-python) on this side: the volume goes through a system region and
    # the request still succeeds with the same labels, saying why in the log.
    if unavailable_reason() is None:
        pytest.skip("a GPU is present: the CUDA path itself is measured by bench gpu")
    client = TritonBackend([server.grpc_url], transport="cuda_shm")
    try:
        with caplog.at_level("WARNING", logger="dicom_node.inference.triton.client"):
            result = client.segment(phantom.hu, phantom.affine)
    finally:
        client.close()
    np.testing.assert_array_equal(result.labels, grpc_result.labels)
    assert "volume sent through host memory" in caplog.text
    assert _named_regions() == []


def _named_regions() -> list[str]:
    return named_regions(os.getpid())


@needs_bundle
def test_volume_in_shared_memory_is_read_in_place(server, grpc_result, phantom, monkeypatch):
    """A volume assembled into shared memory goes to the server without a copy, and the
    label map comes back as a view of the region the server wrote."""
    unregister = Registration.release

    def slowly(self):  # a server slow to let go: whatever is released later is still held
        time.sleep(0.3)
        unregister(self)

    monkeypatch.setattr(Registration, "release", slowly)
    hu = shared_empty(phantom.hu.shape, np.int16)
    hu[...] = phantom.hu
    client = TritonBackend([server.grpc_url], transport="auto")
    assert client.takes_shared_memory()
    try:
        result = client.segment(hu, phantom.affine)
        # The volume's own key is unregistered before segment returns (Triton 2.51 would
        # register it again with a descriptor it closed), so the same volume can go again
        # at once, as for a second model or a retry.
        held = grpcclient.InferenceServerClient(server.grpc_url).get_system_shared_memory_status(
            as_json=True
        )
        assert region_of(hu).key not in {r["key"] for r in held.get("regions", {}).values()}
        again = client.segment(hu, phantom.affine)
    finally:
        client.close()
    np.testing.assert_array_equal(result.labels, grpc_result.labels)
    np.testing.assert_array_equal(again.labels, grpc_result.labels)
    assert result.contours is None  # not asked for
    # the labels are where the server wrote them: a region whose name is already gone
    out = region_of(result.labels)
    assert out is not None and not out.path.exists()
    # The server holds no registration (once the background releases are done); only the
    # volume's own region is still named.
    assert wait_for_releases(timeout=10.0)
    status = grpcclient.InferenceServerClient(server.grpc_url)
    assert status.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}
    assert _named_regions() == [region_of(hu).name]
    del hu
    assert _named_regions() == []


def _one_backend(settings: InferenceSettings, data_dir):
    """The backend ``settings`` name for the spleen demo model alone."""
    model = ModelSettings(name="spleen_seg", triton_model="spleen_seg", bundle=BUNDLE)
    return create_backends(settings, [model], data_dir)["spleen_seg"]


@needs_bundle
def test_triton_matches_the_local_backend(grpc_result, phantom, tmp_path):
    settings = InferenceSettings(backend="local", bundle=BUNDLE, device="cpu")
    local = _one_backend(settings, tmp_path)
    assert isinstance(local, Backend)
    try:
        result = local.segment(phantom.hu, phantom.affine, contours=True)
    finally:
        local.close()
    np.testing.assert_array_equal(result.labels, grpc_result.labels)
    np.testing.assert_array_equal(result.contours, grpc_result.contours)


@needs_bundle
def test_float_volume_gives_the_same_labels(server, grpc_result, phantom):
    client = TritonBackend([server.grpc_url], transport="shm")
    try:
        result = client.segment(phantom.hu.astype(np.float32), phantom.affine)
    finally:
        client.close()
    np.testing.assert_array_equal(result.labels, grpc_result.labels)


@needs_bundle
def test_request_without_a_volume_is_refused_by_spleen_seg(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    affine = grpcclient.InferInput("AFFINE", [4, 4], "FP64")
    affine.set_data_from_numpy(np.eye(4))
    with pytest.raises(InferenceServerException, match="exactly one of HU_INT16 and HU_FP32"):
        client.infer("spleen_seg", [affine])
    client.close()


def test_model_that_is_not_loaded_is_an_inference_error(server):
    client = TritonBackend([server.grpc_url], model="no_such_model")
    with pytest.raises(InferenceError, match="'no_such_model' is not ready"):
        client.segment(np.zeros((4, 8, 8), np.int16), np.eye(4))
    client.close()


def test_affine_must_be_4x4():
    client = TritonBackend([f"127.0.0.1:{free_port()}"])
    with pytest.raises(ValueError, match="affine must be 4x4"):
        client.segment(np.zeros((4, 8, 8), np.int16), np.eye(4)[:3])
    client.close()


def test_no_reachable_server_is_an_inference_error():
    client = TritonBackend([f"127.0.0.1:{free_port()}", f"localhost:{free_port()}"])
    with pytest.raises(InferenceError, match="no Triton server could run"):
        client.segment(np.zeros((4, 8, 8), np.int16), np.eye(4))
    client.close()


# ------------------------------------------------------------------------- supervision


@pytest.fixture
def managed(tmp_path):
    """A node's managed Triton backend (spleen_seg, spleen_unet), its server started."""
    settings = InferenceSettings(
        backend="triton",
        model_repository=REPOSITORY,
        bundle=BUNDLE,
        device="cpu",
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        startup_timeout_seconds=180.0,
    )
    backend = _one_backend(settings, tmp_path)
    assert isinstance(backend, ManagedTritonBackend)
    try:
        yield backend
    finally:
        backend.close()
    assert not backend.server.is_alive()


@needs_bundle
def test_killed_server_fails_the_job_and_is_restarted_for_the_retry(managed, phantom):
    backend = managed
    first_pid = backend.server.pid
    stats = grpcclient.InferenceServerClient(backend.server.grpc_url)
    outcome: dict[str, object] = {}

    def job():
        try:
            outcome["result"] = backend.segment(phantom.hu, phantom.affine)
        except InferenceError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=job)
    worker.start()
    # Kill once the job is inside spleen_seg: its first patches reached spleen_unet.
    while worker.is_alive():
        model_stats = stats.get_inference_statistics("spleen_unet", as_json=True)
        if int(model_stats["model_stats"][0].get("execution_count", 0)) > 0:
            os.kill(first_pid, signal.SIGKILL)
            break
    worker.join(timeout=120)
    stats.close()
    assert "error" in outcome, "the job finished before the server was killed"
    # Clients see the connection drop a moment before the process can be reaped.
    deadline = time.monotonic() + 30
    while backend.server.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not backend.server.is_alive()

    result = backend.segment(phantom.hu, phantom.affine)  # the job runner's retry
    assert backend.server.pid != first_pid
    assert not group_alive(first_pid), "stubs of the killed server still run"
    assert dice(result.labels == 1, phantom.spleen) >= 0.9


def _broken_repository(root: Path, body: str) -> Path:
    model = root / "repo" / "broken"
    (model / "1").mkdir(parents=True)
    config = (REPOSITORY / "echo" / "config.pbtxt").read_text()
    (model / "config.pbtxt").write_text(config.replace('name: "echo"', 'name: "broken"'))
    (model / "1" / "model.py").write_text(body)
    return model.parent


def _start_broken(repo: Path, work: Path, timeout: float, **kwargs) -> pytest.ExceptionInfo:
    srv = TritonServer(
        repo, work, free_port(), free_port(), free_port(), ["broken"], timeout, **kwargs
    )
    with pytest.raises(TritonStartError) as info:
        srv.start()
    assert not srv.is_alive()
    return info


def test_model_that_cannot_import_is_a_start_error(tmp_path):
    repo = _broken_repository(tmp_path, 'raise ImportError("no such thing as model 42")\n')
    info = _start_broken(repo, tmp_path / "work", 120.0)
    assert "no such thing as model 42" in str(info.value)


def test_stub_that_cannot_run_is_a_start_error(tmp_path):
    # The stub built for another Python cannot find its libpython.
    repo = _broken_repository(tmp_path, "")
    info = _start_broken(repo, tmp_path / "work", 120.0, python_version="3.8")
    assert "stub cannot start" in str(info.value)


def test_model_stuck_loading_is_a_start_error_after_the_timeout(tmp_path):
    repo = _broken_repository(
        tmp_path,
        "import time\n\n\nclass TritonPythonModel:\n"
        "    def initialize(self, args):\n        time.sleep(3600)\n",
    )
    info = _start_broken(repo, tmp_path / "work", 5.0)
    assert "not ready within 5 s" in str(info.value)
