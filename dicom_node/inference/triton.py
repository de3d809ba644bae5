"""Segment volumes on one or more Triton servers (the ``spleen_seg`` model of ``model_repository``).

Transport. A CT volume is tens to hundreds of megabytes. When the server runs on this host
the volume and the label maps travel through a POSIX shared-memory region registered with
the server (``tritonclient.utils.shared_memory``): the gRPC messages then carry only the
region's name and offsets, and the data is copied once on each side instead of being
serialised into protobuf. Otherwise the tensors travel inside the gRPC messages, whose size
limits are raised to Triton's own maximum (2 GiB).

CUDA shared memory would take the volume from a GPU on this side to the server's GPU without
touching host memory. It fits in :class:`SystemShmRegion`'s place when both sides have a GPU
(``tritonclient.utils.cuda_shared_memory``: ``create_shared_memory_region`` +
``register_cuda_shared_memory(name, get_raw_handle(h), device_id, size)``, outputs read with
``as_shared_memory_tensor``); the node assembles volumes on the CPU, so there is nothing to
gain from it today and it is not wired in.

Several servers. Requests go round-robin to the next server whose model is ready; a server
that cannot be reached is skipped and the request is sent to the next one. Only when none
can serve it does :meth:`TritonBackend.segment` raise :class:`InferenceError`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
from tritonclient.utils import shared_memory as shm

from dicom_node.inference import InferenceError

if TYPE_CHECKING:
    from dicom_node.pipeline import SegmentationResult

log = logging.getLogger(__name__)

#: Triton's own limit on a gRPC message (src/core/constants.h).
_MAX_GRPC_MESSAGE = 2**31 - 1
#: Outputs are placed at offsets aligned like this inside the shared-memory region.
_ALIGN = 64
#: gRPC status codes that mean "this server cannot be reached": try the next one.
_UNREACHABLE = ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED")


def is_loopback(url: str) -> bool:
    """True when ``host:port`` names this host through a loopback address."""
    host = url.rsplit(":", 1)[0].strip("[]") if ":" in url else url
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except (OSError, ValueError):
            return False


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class _Unreachable(Exception):
    """The server could not be reached or is not ready: the next one may serve the request."""


class SystemShmRegion:
    """One POSIX shared-memory region registered with one server for one request.

    The input volume sits at offset 0 and each output at the next aligned offset.
    :meth:`release` unregisters and unlinks it and is safe to call in any state, so that
    neither the server nor ``/dev/shm`` keep a region when a request fails half-way.
    """

    def __init__(self, client: grpcclient.InferenceServerClient, byte_size: int) -> None:
        self.client = client
        # Unique per process and request: several requests (threads, nodes) run at once.
        self.name = f"dicom_node_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        self.byte_size = byte_size
        self.handle = None
        self.registered = False

    def open(self, timeout: float) -> None:
        self.handle = shm.create_shared_memory_region(
            self.name, f"/{self.name}", self.byte_size, create_only=True
        )
        self.client.register_system_shared_memory(
            self.name, f"/{self.name}", self.byte_size, client_timeout=timeout
        )
        self.registered = True

    def write(self, array: np.ndarray, offset: int) -> None:
        shm.set_shared_memory_region(self.handle, [array], offset=offset)

    def read(self, dtype: np.dtype, shape: Sequence[int], offset: int) -> np.ndarray:
        # get_contents_as_numpy returns a view of the mapping: copy it before the unlink.
        return np.array(shm.get_contents_as_numpy(self.handle, dtype, shape, offset=offset))

    def release(self) -> None:
        if self.registered:
            self.registered = False
            try:
                self.client.unregister_system_shared_memory(self.name, client_timeout=10.0)
            except InferenceServerException as exc:  # the server is gone: nothing to undo
                log.debug("could not unregister %s: %s", self.name, exc)
        if self.handle is not None:
            handle, self.handle = self.handle, None
            shm.destroy_shared_memory_region(handle)


class TritonBackend:
    """Client of the ``spleen_seg`` model (or one with the same inputs and outputs).

    ``urls`` are gRPC endpoints (``host:port``). ``transport`` is ``"grpc"``, ``"shm"`` (system
    shared memory with every server: they must run on this host) or ``"auto"`` (shared
    memory with servers at a loopback address, gRPC with the others). ``timeout`` bounds one
    request, in seconds.
    """

    def __init__(
        self,
        urls: Sequence[str],
        model: str = "spleen_seg",
        transport: str = "auto",
        timeout: float = 600.0,
        *,
        health_timeout: float = 5.0,
    ) -> None:
        if not urls:
            raise ValueError("TritonBackend needs at least one server URL")
        if transport not in ("auto", "grpc", "shm"):
            raise ValueError(f"transport must be 'auto', 'grpc' or 'shm', not {transport!r}")
        self.urls = [u.removeprefix("grpc://") for u in urls]
        self.model = model
        self.transport = transport
        self.timeout = timeout
        self.health_timeout = health_timeout
        self._clients = {url: _connect(url) for url in self.urls}
        self._next = 0
        self._lock = threading.Lock()

    def reconnect(self, url: str | None = None) -> None:
        """Open fresh connections to ``url`` (every server when ``None``).

        A gRPC channel whose server went away retries with a growing back-off and fails
        calls fast meanwhile, even once the server is back; a new channel connects at once.
        Calls in flight on the old channel finish on it: it closes when they drop it.
        """
        for u in [url] if url is not None else self.urls:
            self._clients[u] = _connect(u)

    def uses_shm(self, url: str) -> bool:
        """Whether requests to ``url`` travel through system shared memory."""
        return self.transport == "shm" or (self.transport == "auto" and is_loopback(url))

    def segment(self, hu: np.ndarray, affine: np.ndarray) -> SegmentationResult:
        """Segment ``hu`` (slices, rows, cols) on the next ready server.

        ``timings`` of the result holds the pipeline's "pre", "inference" and "post" seconds
        as measured in the server, "server" (the model's whole execution there) and
        "transfer" (everything else: moving the data, queueing, the network).
        """
        hu = _as_model_input(hu)
        affine = np.ascontiguousarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {affine.shape}")
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(self.urls)
        reasons = []
        for k in range(len(self.urls)):
            url = self.urls[(start + k) % len(self.urls)]
            try:
                return self._segment_on(url, hu, affine)
            except _Unreachable as exc:
                log.warning("Triton at %s cannot serve %s: %s", url, self.model, exc)
                reasons.append(f"{url}: {exc}")
                self.reconnect(url)
        raise InferenceError(
            f"no Triton server could run model {self.model!r} ({'; '.join(reasons)})"
        )

    def close(self) -> None:
        for client in self._clients.values():
            client.close()

    # ----------------------------------------------------------------- internals
    def _segment_on(self, url: str, hu: np.ndarray, affine: np.ndarray) -> SegmentationResult:
        from dicom_node.pipeline import SegmentationResult

        client = self._clients[url]
        self._check_ready(url, client)
        t0 = time.perf_counter()
        name, datatype = ("HU_INT16", "INT16") if hu.dtype == np.int16 else ("HU_FP32", "FP32")
        inputs = [
            grpcclient.InferInput(name, list(hu.shape), datatype),
            grpcclient.InferInput("AFFINE", [4, 4], "FP64"),
        ]
        inputs[1].set_data_from_numpy(affine)
        outputs = [grpcclient.InferRequestedOutput(n) for n in ("LABELS", "CONTOURS", "TIMINGS")]
        region = None
        try:
            if self.uses_shm(url):
                label_bytes = int(np.prod(hu.shape))  # UINT8 outputs, one byte a voxel
                offsets = [0, _align(hu.nbytes), _align(hu.nbytes) + _align(label_bytes)]
                region = SystemShmRegion(client, offsets[2] + label_bytes)
                region.open(self.health_timeout)
                region.write(hu, 0)
                inputs[0].set_shared_memory(region.name, hu.nbytes, offsets[0])
                outputs[0].set_shared_memory(region.name, label_bytes, offsets[1])
                outputs[1].set_shared_memory(region.name, label_bytes, offsets[2])
            else:
                inputs[0].set_data_from_numpy(hu)
            response = client.infer(
                self.model, inputs, outputs=outputs, client_timeout=self.timeout
            )
            if region is not None:
                labels = region.read(np.uint8, hu.shape, offsets[1])
                contours = region.read(np.uint8, hu.shape, offsets[2])
            else:
                labels = response.as_numpy("LABELS")
                contours = response.as_numpy("CONTOURS")
            server_timings = json.loads(response.as_numpy("TIMINGS")[0])
        except InferenceServerException as exc:
            raise _classify(exc, url, self.model, self.timeout) from exc
        except shm.SharedMemoryException as exc:
            raise InferenceError(
                f"could not place a {hu.nbytes} byte volume in shared memory ({exc}); "
                "is /dev/shm full?"
            ) from exc
        finally:
            if region is not None:
                region.release()
        total = time.perf_counter() - t0
        timings = {k: float(v) for k, v in server_timings.items()}
        timings["transfer"] = max(0.0, total - timings.get("server", 0.0))
        return SegmentationResult(labels=labels, contours=contours, timings=timings)

    def _check_ready(self, url: str, client: grpcclient.InferenceServerClient) -> None:
        try:
            ready = client.is_model_ready(self.model, client_timeout=self.health_timeout)
        except InferenceServerException as exc:
            raise _Unreachable(_reason(exc)) from exc
        if not ready:
            raise _Unreachable(f"model {self.model!r} is not ready")


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
    if status in _UNREACHABLE:
        return _Unreachable(_reason(exc))
    if status == "StatusCode.DEADLINE_EXCEEDED":
        return InferenceError(
            f"Triton at {url} did not finish model {model!r} within {timeout:.0f} s"
        )
    return InferenceError(f"Triton at {url} failed to run model {model!r}: {_reason(exc)}")
