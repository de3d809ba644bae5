"""Segment volumes on one or more Triton servers (the ``spleen_seg`` model of ``model_repository``).

Transport. When the server runs on this host the volume and the label maps travel through
shared-memory regions registered with it (:mod:`dicom_node.inference.triton.placement`);
otherwise the tensors travel inside the gRPC messages, whose size limits are raised to
Triton's own maximum (2 GiB).

CUDA shared memory takes the volume from this process straight to the server's GPU
(:mod:`dicom_node.inference.triton.cuda_shm`): a volume assembled into a
:class:`~dicom_node.inference.triton.cuda_shm.CudaVolume` is registered with the server as a CUDA
region, and a model instance on that GPU reads it without a host copy. The label map still
comes back through a system region: the encoders need it in host memory. ``transport =
"cuda_shm"`` also sends an ordinary volume this way, copying it to the GPU first.

Several servers. Requests go round-robin over the servers. Before each request the chosen
server is asked whether the model is ready (a health check that costs one small gRPC call);
a server that cannot be reached, is not ready, or drops the model between the check and the
request (it is shutting down) is skipped and the request goes to the next one. Inference is
a pure function of its inputs, so sending the same request again elsewhere is safe.

A server that failed is set aside for a while (1 s, doubling with each further failure, at
most 30 s by default) so that requests do not each pay for its failure again: a host that is
switched off does not refuse connections, it lets each one wait for the health check's
timeout. Set-aside servers are still tried, last, when no other server can take a request,
and the first request after the pause checks the server again: once it answers ready it is
back in the rotation. Only when every server failed does a request raise
:class:`InferenceError`.

Why one module of this size (~400 lines): it is one client, its transports and its choice
of server; where the volume lies is :mod:`~dicom_node.inference.triton.placement`'s, which server
is next :mod:`~dicom_node.inference.triton.rotation`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from dicom_node.common.network import is_loopback
from dicom_node.inference import InferenceError
from dicom_node.inference.triton.cuda_shm import (
    CudaVolume,
    cuda_allocate,
    unavailable_reason,
)
from dicom_node.inference.triton.placement import (
    on_host,
    place_input,
    place_outputs,
    wait_for_releases,
)
from dicom_node.inference.triton.rotation import Rotation
from dicom_node.inference.triton.shm import allocate

if TYPE_CHECKING:
    from dicom_node.pipeline.result import SegmentationResult

log = logging.getLogger(__name__)

#: Triton's own limit on a gRPC message (src/core/constants.h).
_MAX_GRPC_MESSAGE = 2**31 - 1
#: gRPC status codes that mean "this server cannot be reached": try the next one.
_UNREACHABLE = ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED")
#: gRPC status of a request for a model the server does not have (any more): a server that is
#: shutting down unloads its models between the readiness check and the request.
_NOT_FOUND = "StatusCode.NOT_FOUND"

_T = TypeVar("_T")

#: What :class:`TritonBackend` takes as ``transport``.
TRANSPORTS = ("auto", "grpc", "shm", "cuda_shm")


class _Unreachable(Exception):
    """The server could not be reached or is not ready: the next one may serve the request."""


class TritonBackend:
    """Client of the ``spleen_seg`` model (or one with the same inputs and outputs).

    ``urls`` are gRPC endpoints (``host:port``). ``transport`` is ``"grpc"``, ``"shm"`` (system
    shared memory with every server: they must run on this host), ``"cuda_shm"`` (as
    ``"shm"``, the volume in GPU memory) or ``"auto"`` (shared memory with servers at a
    loopback address, gRPC with the others; CUDA for a volume already on the GPU). ``timeout`` bounds one
    request, in seconds; ``health_timeout`` bounds the readiness check before it.

    ``gpu_server`` says that the servers on this host run the model on a GPU: volumes are
    then assembled in GPU memory (see :meth:`volume_allocator`).

    A server that failed is set aside for ``down_seconds``, doubled with each further
    failure up to ``max_down_seconds`` (see the module's docstring). One object is shared by
    the node's workers: every method may be called from several threads at once.
    """

    #: The volume travels to the server: the runner keeps its own copy.
    takes_hand_over = False

    def __init__(
        self,
        urls: Sequence[str],
        model: str = "spleen_seg",
        transport: str = "auto",
        timeout: float = 600.0,
        *,
        health_timeout: float = 5.0,
        down_seconds: float = 1.0,
        max_down_seconds: float = 30.0,
        gpu_server: bool = False,
    ) -> None:
        if not urls:
            raise ValueError("TritonBackend needs at least one server URL")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
        # dict.fromkeys: a URL listed twice would get twice the share of requests.
        self.urls = list(dict.fromkeys(u.removeprefix("grpc://") for u in urls))
        self.model = model
        self.transport = transport
        self.timeout = timeout
        self.health_timeout = health_timeout
        self.gpu_server = gpu_server
        self._rotation = Rotation(self.urls, down_seconds, max_down_seconds)
        self._clients = {url: _connect(url) for url in self.urls}

    def reconnect(self, url: str | None = None) -> None:
        """Open fresh connections to ``url`` (every server when ``None``) and trust it again.

        A gRPC channel whose server went away retries with a growing back-off and fails
        calls fast meanwhile, even once the server is back; a new channel connects at once.
        Calls in flight on the old channel finish on it: it closes when they drop it.
        Call it when a server is known to be back (it was restarted): it leaves the set-aside
        servers at once instead of after its pause.
        """
        for u in [url] if url is not None else self.urls:
            self._clients[u] = _connect(u)
            self._rotation.trust(u)

    def uses_shm(self, url: str) -> bool:
        """Whether requests to ``url`` travel through shared memory (system or CUDA)."""
        return self.transport in ("shm", "cuda_shm") or (
            self.transport == "auto" and is_loopback(url, resolve=True)
        )

    def takes_shared_memory(self) -> bool:
        """Whether volumes go to some server through shared memory (see :meth:`segment`)."""
        return any(self.uses_shm(url) for url in self.urls)

    def volume_allocator(self) -> Callable[[Sequence[int], Any], Any]:
        """GPU memory for a local server on a GPU (or ``transport="cuda_shm"``) when CUDA
        IPC works here, a system region for any other local server, else ``numpy.empty``."""
        if not self.takes_shared_memory():
            return np.empty
        if (self.gpu_server or self.transport == "cuda_shm") and unavailable_reason() is None:
            return cuda_allocate()
        return allocate

    def healthy_urls(self) -> list[str]:
        """The servers in the rotation now: those not set aside after a failure."""
        return self._rotation.healthy()

    def ready(self) -> bool:
        """Whether some server answers that the model is ready (for a readiness probe).

        Asks the servers in turn and stops at the first that is ready; it does not change
        which servers are set aside, so a probe never takes a server out of the rotation.
        """
        for url in self.urls:
            try:
                if self._clients[url].is_model_ready(
                    self.model, client_timeout=self.health_timeout
                ):
                    return True
            except InferenceServerException:
                # A fresh channel, or the next probe would fail fast in its back-off even
                # once the server is back.
                self._clients[url] = _connect(url)
        return False

    def segment(
        self, hu: np.ndarray | CudaVolume, affine: np.ndarray, *, contours: bool = False
    ) -> SegmentationResult:
        """Segment ``hu`` (slices, rows, cols) on the next ready server.

        ``timings`` of the result holds the pipeline's "pre", "inference" and "post" seconds
        as measured in the server, "server" (the model's whole execution there) and
        "transfer" (everything else: moving the data, queueing, the network). The contour
        map is asked for only with ``contours``: the encoders trace the label map, and
        another volume-sized array would only cost memory and transfer.

        ``hu`` made by :func:`~dicom_node.inference.triton.shm.shared_empty` (host) or a
        :class:`~dicom_node.inference.triton.cuda_shm.CudaVolume` (GPU) is read by a local server
        where it lies.
        """
        if isinstance(hu, CudaVolume):
            if hu.dtype not in (np.dtype(np.int16), np.dtype(np.float32)):
                raise ValueError(f"a CUDA volume must be int16 or float32, not {hu.dtype}")
        else:
            hu = _as_model_input(hu)
        affine = np.ascontiguousarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {affine.shape}")
        return self._balanced(self.model, lambda url: self._segment_on(url, hu, affine, contours))

    def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        model: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Run ``model`` (default: this backend's) on named tensors; return the named outputs.

        The same balancing and fail-over as :meth:`segment`, for any model. The tensors
        travel inside the gRPC messages whatever ``transport`` says: shared memory needs the
        output sizes before the request, which only a model-specific client knows.
        """
        model = model or self.model
        arrays = {name: np.ascontiguousarray(a) for name, a in inputs.items()}

        def run(url: str) -> dict[str, np.ndarray]:
            client = self._clients[url]
            self._check_ready(client, model)
            tensors = []
            for name, array in arrays.items():
                tensor = grpcclient.InferInput(
                    name, list(array.shape), np_to_triton_dtype(array.dtype)
                )
                tensor.set_data_from_numpy(array)
                tensors.append(tensor)
            requested = [grpcclient.InferRequestedOutput(n) for n in outputs]
            try:
                response = client.infer(
                    model, tensors, outputs=requested, client_timeout=self.timeout
                )
            except InferenceServerException as exc:
                raise _classify(exc, url, model, self.timeout) from exc
            return {n: response.as_numpy(n) for n in outputs}

        return self._balanced(model, run)

    def close(self) -> None:
        wait_for_releases(timeout=10.0)  # they use these clients
        for client in self._clients.values():
            client.close()

    # ----------------------------------------------------------------- balancing
    def _balanced(self, model: str, request: Callable[[str], _T]) -> _T:
        """Send ``request`` to the servers in turn until one serves it."""
        reasons = []
        for url in self._rotation.order():
            try:
                result = request(url)
            except _Unreachable as exc:
                self._set_aside(url, model, str(exc))
                reasons.append(f"{url}: {exc}")
                continue
            self._trust(url)
            return result
        raise InferenceError(f"no Triton server could run model {model!r} ({'; '.join(reasons)})")

    def _set_aside(self, url: str, model: str, reason: str) -> None:
        pause, failures = self._rotation.set_aside(url)
        first = failures == 1
        # Warn when a server leaves the rotation; its further failures are expected.
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "Triton at %s cannot serve %s (%s); set aside for %.3g s",
            url,
            model,
            reason,
            pause,
        )
        # A fresh channel for the next attempt (see reconnect); not a reset of its health.
        self._clients[url] = _connect(url)

    def _trust(self, url: str) -> None:
        failures = self._rotation.trust(url)
        if failures:
            log.info("Triton at %s serves again after %d failure(s)", url, failures)

    # ----------------------------------------------------------------- internals
    def _segment_on(
        self, url: str, hu: np.ndarray | CudaVolume, affine: np.ndarray, contours: bool
    ) -> SegmentationResult:
        from dicom_node.pipeline.result import SegmentationResult

        client = self._clients[url]
        self._check_ready(client, self.model)
        t0 = time.perf_counter()
        name, datatype = ("HU_INT16", "INT16") if hu.dtype == np.int16 else ("HU_FP32", "FP32")
        inputs = [
            grpcclient.InferInput(name, list(hu.shape), datatype),
            grpcclient.InferInput("AFFINE", [4, 4], "FP64"),
        ]
        inputs[1].set_data_from_numpy(affine)
        maps = ["LABELS", "CONTOURS"] if contours else ["LABELS"]
        outputs = [grpcclient.InferRequestedOutput(n) for n in (*maps, "TIMINGS")]
        # Unregisters and unlinks whatever a request placed in shared memory, however it ends.
        with contextlib.ExitStack() as cleanup:
            try:
                input_name = results = None
                if self.uses_shm(url):
                    input_name = place_input(
                        client, hu, self.transport == "cuda_shm", self.health_timeout, cleanup
                    )
                    results = place_outputs(
                        client, hu.shape, len(maps), self.health_timeout, cleanup
                    )
                if input_name is not None:
                    inputs[0].set_shared_memory(input_name, hu.nbytes)
                else:
                    inputs[0].set_data_from_numpy(on_host(hu))
                if results is not None:
                    results_array, output_name = results
                    for i, output in enumerate(outputs[: len(maps)]):
                        output.set_shared_memory(output_name, hu.size, offset=i * hu.size)
                response = client.infer(
                    self.model, inputs, outputs=outputs, client_timeout=self.timeout
                )
                # From shared memory: views of the region the server wrote, not copies; the
                # region's memory is freed with the last of them.
                arrays = (
                    list(results_array)
                    if results is not None
                    else [response.as_numpy(n) for n in maps]
                )
                server_timings = json.loads(response.as_numpy("TIMINGS").tobytes())
            except InferenceServerException as exc:
                raise _classify(exc, url, self.model, self.timeout) from exc
        total = time.perf_counter() - t0
        timings = {k: float(v) for k, v in server_timings.items()}
        timings["transfer"] = max(0.0, total - timings.get("server", 0.0))
        return SegmentationResult(
            labels=arrays[0], contours=arrays[1] if contours else None, timings=timings
        )

    def _check_ready(self, client: grpcclient.InferenceServerClient, model: str) -> None:
        try:
            ready = client.is_model_ready(model, client_timeout=self.health_timeout)
        except InferenceServerException as exc:
            raise _Unreachable(_reason(exc)) from exc
        if not ready:
            raise _Unreachable(f"model {model!r} is not ready")


def _connect(url: str) -> grpcclient.InferenceServerClient:
    # Message limits spelled out rather than left to tritonclient's defaults: a volume
    # travels in one message when shared memory is not used.
    return grpcclient.InferenceServerClient(
        url,
        channel_args=[
            ("grpc.max_send_message_length", _MAX_GRPC_MESSAGE),
            ("grpc.max_receive_message_length", _MAX_GRPC_MESSAGE),
            # Without it, channels to one address share a process-wide connection, and a
            # fresh channel (reconnect) inherits the old one's reconnection back-off.
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )


def _as_model_input(hu: np.ndarray) -> np.ndarray:
    """HU as the model takes them: INT16 when lossless (CT pixel data is), FP32 otherwise."""
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"expected a (slices, rows, cols) volume, got shape {hu.shape}")
    if hu.dtype == np.int16 or hu.dtype == np.float32:
        return np.ascontiguousarray(hu)
    if np.issubdtype(hu.dtype, np.integer):
        info = np.iinfo(np.int16)
        if hu.size == 0 or (hu.min() >= info.min and hu.max() <= info.max):
            return np.ascontiguousarray(hu, dtype=np.int16)
    return np.ascontiguousarray(hu, dtype=np.float32)


def _reason(exc: InferenceServerException) -> str:
    status = exc.status() or ""
    if status in _UNREACHABLE:
        return "the server cannot be reached (connection refused or lost)"
    if status == "StatusCode.DEADLINE_EXCEEDED":
        return "the server did not answer in time"
    return exc.message() or str(exc)


def _classify(exc: InferenceServerException, url: str, model: str, timeout: float) -> Exception:
    """Turn a tritonclient error into :class:`_Unreachable` (try elsewhere) or InferenceError."""
    status = exc.status() or ""
    if status in _UNREACHABLE or status == _NOT_FOUND:
        return _Unreachable(_reason(exc))
    # Not failed over: another server would make the request wait its whole timeout again,
    # and an error the model raised would be raised there too. The job runner retries.
    if status == "StatusCode.DEADLINE_EXCEEDED":
        return InferenceError(
            f"Triton at {url} did not finish model {model!r} within {timeout:.0f} s"
        )
    return InferenceError(f"Triton at {url} failed to run model {model!r}: {_reason(exc)}")
