"""Where a request's tensors lie: shared-memory regions registered with a Triton server.

A CT volume is tens to hundreds of megabytes. When the server runs on this host the volume
and the label maps travel through POSIX shared-memory regions registered with the server
(:mod:`dicom_node.inference.triton.shm`): the gRPC messages then carry only the regions' names, a
volume the node assembled into shared memory is not copied at all, and the label map is read
where the server wrote it. A :class:`~dicom_node.inference.triton.cuda_shm.CudaVolume` is
registered as a CUDA region, which a model instance on that GPU reads without a host copy.

Each request registers its regions under fresh names and unregisters them however it ends
(the caller's :class:`contextlib.ExitStack`), so the server never keeps a registration.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from dicom_node.inference.triton.cuda_shm import CudaUnavailable, CudaVolume
from dicom_node.inference.triton.shm import Region, region_of, shared_empty, unlink

__all__ = ["Registration", "place_input", "place_outputs", "wait_for_releases"]

log = logging.getLogger(__name__)

#: How long a region may stay "in use" after its response arrived before it is given up.
_UNREGISTER_GRACE = 5.0


def on_host(hu: np.ndarray | CudaVolume) -> np.ndarray:
    """The volume in host memory (a CUDA volume is copied back)."""
    return hu.to_numpy() if isinstance(hu, CudaVolume) else hu


class Registration:
    """A shared-memory region registered with one server, under a name of its own.

    Each request registers its regions under fresh names, so that requests running at
    once (threads, models) never unregister each other's. :meth:`release` is safe to call
    in any state, so that the server keeps no registration when a request fails half-way.
    """

    def __init__(
        self,
        client: grpcclient.InferenceServerClient,
        region: Region | CudaVolume,
        timeout: float,
    ) -> None:
        self.client = client
        self.cuda = isinstance(region, CudaVolume)
        self.name = f"{region.name}_{uuid.uuid4().hex[:8]}"
        if isinstance(region, CudaVolume):
            client.register_cuda_shared_memory(
                self.name,
                region.raw_handle(),
                region.device_id,
                region.nbytes,
                client_timeout=timeout,
            )
        else:
            client.register_system_shared_memory(
                self.name, region.key, region.nbytes, client_timeout=timeout
            )
        self.registered = True

    def release(self) -> None:
        if self.registered:
            self.registered = False
            unregister = (
                self.client.unregister_cuda_shared_memory
                if self.cuda
                else self.client.unregister_system_shared_memory
            )
            # The server lets go of a region only once it has sent the response that read
            # it, a moment after the client holds that response: until then it answers
            # "currently in use". Retried briefly, or the registration would outlive us.
            deadline = time.monotonic() + _UNREGISTER_GRACE
            pause = 0.005
            while True:
                try:
                    unregister(self.name, client_timeout=10.0)
                    return
                except InferenceServerException as exc:
                    if "in use" in str(exc) and time.monotonic() < deadline:
                        time.sleep(pause)
                        pause = min(pause * 2, 0.2)
                        continue
                    # the server is gone (nothing to undo), or it never let go
                    log.debug("could not unregister %s: %s", self.name, exc)
                    return

    def release_later(self) -> None:
        """:meth:`release` in the background: the caller has its response and goes on.

        The server lets go of a region a moment after sending the response that read it;
        waiting for that in the request would add its retries to every series' latency.
        """
        global _queued, _releaser
        if not self.registered:
            return
        with _released:
            _queued += 1
            if _releaser is None or not _releaser.is_alive():
                _releaser = threading.Thread(
                    target=_release_queued, name="dicom-node-unregister", daemon=True
                )
                _releaser.start()
        _later.put(self)


_later: queue.SimpleQueue[Registration] = queue.SimpleQueue()
_released = threading.Condition()
_queued = 0  # registrations put on _later and not yet released
_releaser: threading.Thread | None = None


def _release_queued() -> None:
    global _queued
    while True:
        registration = _later.get()
        try:
            registration.release()
        finally:
            with _released:
                _queued -= 1
                _released.notify_all()


def wait_for_releases(timeout: float = 30.0) -> bool:
    """Whether every registration released in the background is gone from its server
    within ``timeout`` seconds (for a clean shutdown, and for tests)."""
    with _released:
        return _released.wait_for(lambda: _queued == 0, timeout)


def place_input(
    client: grpcclient.InferenceServerClient,
    hu: np.ndarray | CudaVolume,
    cuda: bool,
    timeout: float,
    cleanup: contextlib.ExitStack,
) -> str | None:
    """Register the volume where the server reads it; return the name it is under.

    A :class:`CudaVolume`, or any volume with ``cuda``, goes as a CUDA
    region (an ordinary one copied to the GPU first); otherwise a system region, a
    volume in ordinary memory first copied into one. ``None`` when no region can be
    made (no GPU, ``/dev/shm`` full): the volume then travels in the gRPC message.
    """
    if isinstance(hu, CudaVolume) or cuda:
        try:
            if isinstance(hu, CudaVolume):
                volume = hu
            else:
                volume = CudaVolume(hu.shape, hu.dtype)
                cleanup.callback(volume.release)
                volume.write(hu)
            return _register(client, volume, timeout, cleanup)
        except CudaUnavailable as exc:
            log.warning("volume sent through host memory: %s", exc)
    try:
        host = on_host(hu)
        source = region_of(host)
        if source is None:
            copy = shared_empty(host.shape, host.dtype)
            copy[...] = host
            source = _whole_region(copy)
            cleanup.callback(unlink, source)
    except OSError as exc:
        log.warning(
            "volume of %d bytes sent in gRPC messages: no room in shared memory (%s)",
            hu.nbytes,
            exc,
        )
        return None
    return _register(client, source, timeout, cleanup)


def place_outputs(
    client: grpcclient.InferenceServerClient,
    shape: tuple[int, ...],
    maps: int,
    timeout: float,
    cleanup: contextlib.ExitStack,
) -> tuple[np.ndarray, str] | None:
    """A registered system region for ``maps`` uint8 outputs of ``shape``.

    Returns the (maps, slices, rows, columns) array and its registered name, or
    ``None`` when ``/dev/shm`` has no room (the outputs then come in the response).
    """
    try:
        results = shared_empty((maps, *shape), np.uint8)
    except OSError as exc:
        log.warning("label maps sent in gRPC messages: no room in shared memory (%s)", exc)
        return None
    target = _whole_region(results)
    cleanup.callback(unlink, target)
    return results, _register(client, target, timeout, cleanup, later=True)


def _whole_region(array: np.ndarray) -> Region:
    """The region of an array :func:`~.shm.shared_empty` just made (it is the whole of one)."""
    region = region_of(array)
    assert region is not None
    return region


def _register(
    client: grpcclient.InferenceServerClient,
    region: Region | CudaVolume,
    timeout: float,
    cleanup: contextlib.ExitStack,
    later: bool = False,
) -> str:
    registration = Registration(client, region, timeout)
    # Released in the background only where nothing can need the key again soon: a label
    # map's region is the request's own. A volume's may be sent again at once (another
    # model, a retry), and Triton 2.51 registers a key it still holds with the descriptor
    # it closed after mapping it ("Invalid shared memory region"); a CUDA region is freed
    # right after the request.
    cleanup.callback(registration.release_later if later else registration.release)
    return registration.name
