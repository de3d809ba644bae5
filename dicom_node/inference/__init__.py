"""Where segmentation runs: a :class:`Backend` per model, built by the backend the
configuration names (``[inference] backend``).

Backends are registered by name (:data:`BACKENDS`): ``"local"`` runs the pipeline in the
node's process (:mod:`.local`), ``"triton"`` on Triton Inference Server, one the node starts
itself or remote ones (:mod:`.triton`). Adding a backend is one module with a factory
(``create_backends(settings, models, data_dir) -> {model name: Backend}``) and one entry
here; the factory is imported only when the configuration names it, so that a node never
loads what it does not use.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from dicom_node.config import InferenceSettings, ModelSettings
    from dicom_node.pipeline.result import HandOver, SegmentationResult

__all__ = [
    "BACKENDS",
    "Allocator",
    "Backend",
    "Backends",
    "BackendFactory",
    "InferenceError",
    "backend_names",
    "create_backends",
    "register_backend",
]

#: Where a volume is assembled: ``allocate(shape, dtype)``.
Allocator = Callable[[Sequence[int], Any], Any]


class InferenceError(RuntimeError):
    """Segmentation could not run (server down, not ready, timed out); a retry may succeed."""


@runtime_checkable
class Backend(Protocol):
    """Runs one model's segmentation pipeline on a volume."""

    #: Whether :meth:`segment` may be given a :class:`~dicom_node.pipeline.result.HandOver`:
    #: a volume the pipeline lets go of once preprocessed (the runner then keeps only its
    #: geometry). A backend that sends the volume elsewhere keeps its copy anyway.
    takes_hand_over: bool

    def ready(self) -> bool:
        """Whether a series would be segmented now (the status service's ``/readyz``)."""
        ...

    def segment(
        self, volume: np.ndarray | HandOver | Any, affine: np.ndarray
    ) -> SegmentationResult:
        """The label map of ``volume`` (slices, rows, columns) in HU, whose ``affine`` maps
        (slice, row, column, 1) to LPS mm; its ``timings`` say where the time went.
        Raises :class:`InferenceError` when a retry may succeed."""
        ...

    def volume_allocator(self) -> Allocator:
        """Where to assemble a volume for this backend: ordinary memory, a system
        shared-memory region for a server on this host, or GPU memory for such a server
        whose model runs on a GPU. The same object for every model that wants the same
        place, so that a series routed to several models can share one volume."""
        ...

    def close(self) -> None:
        """Release what the backend holds (connections, a server it started)."""
        ...


#: Builds the backends of ``models``, by model name.
BackendFactory = Callable[["InferenceSettings", Sequence["ModelSettings"], Path], Mapping[str, Any]]

#: The backends by name: a factory, or where to import it from ("module:function").
BACKENDS: dict[str, BackendFactory | str] = {
    "local": "dicom_node.inference.local:create_backends",
    "triton": "dicom_node.inference.triton:create_backends",
}


def register_backend(name: str, factory: BackendFactory | str) -> None:
    """Make ``[inference] backend = name`` build its backends with ``factory``."""
    BACKENDS[name] = factory


def backend_names() -> list[str]:
    return list(BACKENDS)


def create_backends(
    settings: InferenceSettings, models: Sequence[ModelSettings], data_dir: Path
) -> dict[str, Backend]:
    """One backend per model, by model name, from the backend ``settings`` name.

    ``data_dir`` is the node's data directory (a managed Triton server keeps its files in
    ``data_dir/triton``). Raises :class:`InferenceError` when the backends cannot start now
    (the runner tries again later) and ``ValueError`` for a backend nobody registered.
    """
    factory = BACKENDS.get(settings.backend)
    if factory is None:
        raise ValueError(
            f"unknown inference backend {settings.backend!r} (known: {', '.join(BACKENDS)})"
        )
    if isinstance(factory, str):
        module, _, name = factory.partition(":")
        factory = getattr(importlib.import_module(module), name)
    backends = dict(factory(settings, models, data_dir))
    for name, backend in backends.items():
        if not isinstance(backend, Backend):
            raise TypeError(f"the {settings.backend} backend of {name!r} is not a Backend")
    return backends


class Backends:
    """The backends of the configured models, created on first use (a Triton server takes
    a while to start, and a node that never segments never needs it), shared by the jobs."""

    def __init__(
        self, settings: InferenceSettings, models: Sequence[ModelSettings], data_dir: Path
    ) -> None:
        self.settings = settings
        self.models = list(models)
        self.data_dir = data_dir
        self._backends: dict[str, Backend] | None = None
        self._lock = threading.Lock()

    def get(self) -> dict[str, Backend]:
        """Every model's backend by name, created now if need be (see
        :func:`create_backends` for what it raises)."""
        with self._lock:
            if self._backends is None:
                self._backends = create_backends(self.settings, self.models, self.data_dir)
            return self._backends

    def ready(self) -> bool:
        """Whether a series would be segmented now. Before the backends exist: the local
        pipeline loads in a moment on first use and remote servers are asked per request,
        while a server the node starts is not running yet."""
        with self._lock:
            backends = self._backends
        if backends is None:
            return self.settings.backend != "triton" or bool(self.settings.triton_url)
        return all(b.ready() for b in backends.values())

    def close(self) -> None:
        with self._lock:
            for backend in (self._backends or {}).values():
                backend.close()
            self._backends = None
