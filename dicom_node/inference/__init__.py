"""Where segmentation runs: in this process or on Triton Inference Server.

Every backend has the same three methods (:class:`Backend`), so the job runner does not
care where the model runs. :func:`make_backend` builds the one the configuration asks for:

* ``backend = "local"``: :class:`~dicom_node.inference.local.LocalBackend`, the pipeline
  in-process (development, tests);
* ``backend = "triton"`` without ``triton_url``: the node starts the Triton server shipped
  with nvidia-pytriton on ``model_repository`` and talks to it over loopback (shared
  memory); the server is restarted before a request if it died;
* ``backend = "triton"`` with ``triton_url``: servers run elsewhere (an NGC container, a GPU
  host); requests are spread across them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from dicom_node.config import InferenceSettings, ModelSettings
    from dicom_node.inference.triton.client import TritonBackend
    from dicom_node.inference.triton.server import TritonServer
    from dicom_node.pipeline import SegmentationResult

__all__ = ["Backend", "InferenceError", "ManagedTritonBackend", "make_backend", "make_backends"]


class InferenceError(RuntimeError):
    """Segmentation could not run (server down, not ready, timed out); a retry may succeed."""


@runtime_checkable
class Backend(Protocol):
    """Runs the segmentation pipeline on a volume."""

    def segment(self, hu: np.ndarray, affine: np.ndarray) -> SegmentationResult:
        """Segment ``hu`` (slices, rows, cols) in HU, with ``affine`` (slice,row,col,1) -> LPS."""
        ...

    def takes_shared_memory(self) -> bool:
        """Whether a volume assembled into shared memory (:mod:`dicom_node.inference.triton.shm`)
        reaches the model without a copy."""
        ...

    def volume_allocator(self) -> Callable[[Sequence[int], Any], Any]:
        """Where to assemble a volume for this backend (``allocate(shape, dtype)``).

        ``numpy.empty``, a system shared-memory region for a server on this host, or GPU
        memory (:class:`~dicom_node.inference.triton.cuda_shm.CudaVolume`) for a server on this
        host whose model instances run on a GPU. The same object for every model that
        wants the same place, so that a series routed to several models can share one.
        """
        ...

    def close(self) -> None:
        """Release what the backend holds (connections, a server it started)."""
        ...


class ManagedTritonBackend:
    """A :class:`TritonBackend` to a :class:`TritonServer` this object starts and stops.

    Before each request the server is restarted if it died (a crash, the OOM killer), so
    that the job runner's next attempt after an :class:`InferenceError` finds it running.
    """

    def __init__(self, server: TritonServer, client: TritonBackend) -> None:
        self.server = server
        self.client = client

    def segment(self, hu: np.ndarray, affine: np.ndarray) -> SegmentationResult:
        if self.server.ensure_running():  # TritonStartError is an InferenceError
            self.client.reconnect()
        return self.client.segment(hu, affine)

    def takes_shared_memory(self) -> bool:
        return self.client.takes_shared_memory()

    def volume_allocator(self) -> Callable[[Sequence[int], Any], Any]:
        return self.client.volume_allocator()

    def close(self) -> None:
        self.client.close()
        self.server.stop()  # idempotent: several models may share one server


def bundle_env_name(triton_model: str) -> str:
    """The variable that tells a Triton model which bundle to load (``model.py`` reads it):
    ``DICOM_NODE_BUNDLE_`` and the model's name in upper case, any character other than an
    ASCII letter, digit or underscore as ``_``."""
    return "DICOM_NODE_BUNDLE_" + re.sub(r"[^A-Z0-9_]", "_", triton_model.upper())


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


def make_backends(
    settings: InferenceSettings, models: list[ModelSettings], data_dir: Path
) -> dict[str, Backend]:
    """One backend per model, by model name; a managed Triton server is shared by all.

    Several models share one server so that Triton schedules them together on the GPU.
    """
    if settings.backend == "local":
        from dicom_node.inference.local import LocalBackend

        return {m.name: LocalBackend(m.bundle, settings.device) for m in models}
    if settings.backend != "triton":
        raise ValueError(f"unknown inference backend {settings.backend!r}")

    from dicom_node.inference.triton.client import TritonBackend
    from dicom_node.inference.triton.repository import write_models
    from dicom_node.inference.triton.server import TritonServer

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
    models = named
    if settings.triton_url:
        return {m.name: client(settings.triton_url, m) for m in models}
    env = {bundle_env_name(m.triton_model): str(Path(m.bundle).resolve()) for m in models}
    if models and models[0].triton_model == "spleen_seg":
        env["DICOM_NODE_BUNDLE"] = str(Path(models[0].bundle).resolve())
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
            [m.triton_model for m in models if m.triton_model not in written],
        )
        + written,
        startup_timeout=settings.startup_timeout_seconds,
        env=env,
        extra_repositories=[generated] if written else [],
    )
    server.start()
    # KIND_AUTO instances run on the GPU whenever the server sees one, and it sees what this
    # process sees: volumes are then assembled in GPU memory when CUDA IPC works here.
    from dicom_node.inference.triton.cuda_shm import unavailable_reason

    gpu = settings.device != "cpu" and unavailable_reason() is None
    return {m.name: ManagedTritonBackend(server, client([server.grpc_url], m, gpu)) for m in models}


def make_backend(settings: InferenceSettings, data_dir: Path) -> Backend:
    """Build the backend ``settings`` ask for; a managed server is started before returning.

    ``data_dir`` is the node's data directory: a managed server keeps its backends and log in
    ``data_dir/triton``. Raises :class:`~dicom_node.inference.triton.server.TritonStartError` (an
    :class:`InferenceError`) when a managed server does not start.
    """
    from dicom_node.config import ModelSettings

    model = ModelSettings(name=settings.model, triton_model=settings.model, bundle=settings.bundle)
    return make_backends(settings, [model], data_dir)[settings.model]
