"""The ``"triton"`` backend: one :class:`~.client.TritonBackend` per model, to servers the
node runs itself or to remote ones (``[inference] triton_url``).

* Without ``triton_url`` the node starts the Triton server shipped with nvidia-pytriton
  (:mod:`.server`) on ``model_repository`` and the models it writes for bundles
  (:mod:`.repository`), and talks to it over loopback (shared memory); the server is
  restarted before a request if it died (:class:`ManagedTritonBackend`).
* With ``triton_url`` the servers run elsewhere (an NGC container, a GPU host); requests
  are spread across them (:mod:`.rotation`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.config import InferenceSettings, ModelSettings
from dicom_node.inference import Allocator
from dicom_node.inference.triton.client import TritonBackend
from dicom_node.inference.triton.models import bundle_env_name
from dicom_node.inference.triton.server import TritonServer
from dicom_node.pipeline.result import SegmentationResult

__all__ = ["ManagedTritonBackend", "create_backends", "models_to_load"]


class ManagedTritonBackend:
    """A :class:`TritonBackend` to a :class:`TritonServer` the node started.

    Before each request the server is restarted if it died (a crash, the OOM killer), so
    that the job runner's next attempt after an
    :class:`~dicom_node.inference.InferenceError` finds it running.
    """

    #: The volume travels to the server: the runner keeps its own copy.
    takes_hand_over = False

    def __init__(self, server: TritonServer, client: TritonBackend) -> None:
        self.server = server
        self.client = client

    def ready(self) -> bool:
        """Whether the server the node started runs (it restarts it on the next request)."""
        return self.server.is_alive()

    def segment(self, volume: np.ndarray | Any, affine: np.ndarray) -> SegmentationResult:
        if self.server.ensure_running():  # TritonStartError is an InferenceError
            self.client.reconnect()
        return self.client.segment(volume, affine)

    def volume_allocator(self) -> Allocator:
        return self.client.volume_allocator()

    def close(self) -> None:
        self.client.close()
        self.server.stop()  # idempotent: several models may share one server


def models_to_load(repository: Path, triton_models: list[str]) -> list[str]:
    """The segmentation models and the network models they call through BLS.

    A managed server loads only what the node's configuration uses: each model costs start-up
    time and memory (its network, a backend stub process). The configurations are read with
    Triton's own protobuf schema, as the server reads them.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    names: list[str] = []
    for model in triton_models:
        names.append(model)
        path = Path(repository) / model / "config.pbtxt"
        if path.exists():
            config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
            if "network_model" in config.parameters:
                names.append(config.parameters["network_model"].string_value)
    return list(dict.fromkeys(names))


def create_backends(
    settings: InferenceSettings, models: Sequence[ModelSettings], data_dir: Path
) -> dict[str, TritonBackend | ManagedTritonBackend]:
    """One backend per model; a server the node starts is shared by all of them, so that
    Triton schedules them together on the GPU. Raises
    :class:`~.server.TritonStartError` (an ``InferenceError``) when it does not start."""
    from dicom_node.inference.triton.cuda_shm import unavailable_reason
    from dicom_node.inference.triton.repository import write_models

    def client(urls: list[str], m: ModelSettings, gpu: bool = False) -> TritonBackend:
        return TritonBackend(
            urls, m.triton_model, settings.transport, settings.timeout_seconds, gpu_server=gpu
        )

    # A model without a triton_model is served by models written for its bundle: by the
    # node into its data directory for its own server, by `dicom-node model export-triton`
    # for remote ones, under the model's name.
    generated = Path(data_dir) / "triton" / "models"
    written: list[str] = []
    named = []
    for m in models:
        if not m.triton_model:
            if not settings.triton_url:
                written += write_models(m.name, m.bundle, generated)
            m = dataclasses.replace(m, triton_model=m.name)
        named.append(m)
    if settings.triton_url:
        return {m.name: client(settings.triton_url, m) for m in named}
    env = {bundle_env_name(m.triton_model): str(Path(m.bundle).resolve()) for m in named}
    if settings.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # instance groups of kind AUTO then land on the CPU
    server = TritonServer(
        model_repository=Path(settings.model_repository),
        work_dir=Path(data_dir) / "triton",
        grpc_port=settings.grpc_port,
        http_port=settings.http_port,
        metrics_port=settings.metrics_port,
        models=models_to_load(
            Path(settings.model_repository),
            [m.triton_model for m in named if m.triton_model not in written],
        )
        + written,
        startup_timeout=settings.startup_timeout_seconds,
        env=env,
        extra_repositories=[generated] if written else [],
    )
    server.start()
    # KIND_AUTO instances run on the GPU whenever the server sees one, and it sees what this
    # process sees: volumes are then assembled in GPU memory when CUDA IPC works here.
    gpu = settings.device != "cpu" and unavailable_reason() is None
    return {m.name: ManagedTritonBackend(server, client([server.grpc_url], m, gpu)) for m in named}
