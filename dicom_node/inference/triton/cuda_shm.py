"""Volumes in GPU memory that a Triton server on this host reads in place (CUDA IPC).

When the server's model instances run on a GPU, a volume sent through system shared memory
is copied from host memory to the GPU inside the server. A CUDA shared-memory region is
device memory that this process allocates and the server opens with ``cudaIpcOpenMemHandle``:
the volume is written to the GPU slice by slice while it is assembled, and the model's
pre-processing reads it where it lies, so nothing volume-sized is left to move when the
request is made.

The regions are tritonclient's own (:mod:`tritonclient.utils.cuda_shared_memory`, which needs
the ``cuda-python`` package: ``pip install 'dicom-node[cuda]'``). This module adds what that
helper lacks: a volume-shaped handle whose slices can be written one at a time (tritonclient
only writes a region whole, from its start), so that assembly fills it without first
holding the whole volume in host memory. No torch is needed in the node's process.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: Every CUDA region of the node is named ``<PREFIX>_<pid>_<random>``.
PREFIX = "dicom_node_cuda"


class CudaUnavailable(RuntimeError):
    """No CUDA device, or no ``cuda-python`` for tritonclient's CUDA shared memory."""


@functools.cache
def unavailable_reason(device_id: int = 0) -> str | None:
    """Why CUDA shared memory cannot be used on ``device_id``; ``None`` when it can."""
    try:
        import tritonclient.utils.cuda_shared_memory  # noqa: F401
        from cuda.bindings import runtime as cudart
    except (ImportError, RuntimeError) as exc:
        return f"tritonclient's CUDA shared memory needs cuda-python ({exc})"
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        return "no CUDA device"
    if device_id >= count:
        return f"no CUDA device {device_id} ({count} present)"
    return None


class CudaVolume:
    """A C-contiguous (slices, rows, columns) array in a CUDA shared-memory region.

    Write it slice by slice with ``volume[k] = slice_array`` (host to device), read it back
    with :meth:`to_numpy`. :meth:`release` frees the device memory; a server that still
    has the region registered must be told first (``unregister_cuda_shared_memory``).
    Raises :class:`CudaUnavailable` when no region can be made.
    """

    def __init__(self, shape: Sequence[int], dtype: np.dtype | type, device_id: int = 0) -> None:
        reason = unavailable_reason(device_id)
        if reason is not None:
            raise CudaUnavailable(reason)
        import tritonclient.utils.cuda_shared_memory as cudashm

        self.shape = tuple(int(n) for n in shape)
        if len(self.shape) != 3:
            raise ValueError(f"a volume is (slices, rows, columns), not {self.shape}")
        self.dtype = np.dtype(dtype)
        self.device_id = device_id
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.name = f"{PREFIX}_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        try:
            self._handle: Any = cudashm.create_shared_memory_region(
                self.name, max(self.nbytes, 1), device_id
            )
        except cudashm.CudaSharedMemoryException as exc:
            raise CudaUnavailable(f"no CUDA region of {self.nbytes} bytes: {exc}") from exc

    ndim = 3

    @property
    def size(self) -> int:
        return self.nbytes // self.dtype.itemsize

    @property
    def slice_nbytes(self) -> int:
        return self.shape[1] * self.shape[2] * self.dtype.itemsize

    def __setitem__(self, index: int, value: np.ndarray) -> None:
        """Copy one (rows, columns) slice to the GPU, converted to the volume's dtype."""
        if not isinstance(index, (int, np.integer)):
            raise TypeError("a CudaVolume is written one whole slice at a time")
        k = int(index) + (self.shape[0] if index < 0 else 0)
        if not 0 <= k < self.shape[0]:
            raise IndexError(f"slice {index} of a {self.shape[0]}-slice volume")
        data = np.ascontiguousarray(np.broadcast_to(value, self.shape[1:]), dtype=self.dtype)
        self._copy_in(data, k * self.slice_nbytes)

    def write(self, array: np.ndarray) -> None:
        """Copy a whole host volume of this shape to the GPU."""
        data = np.ascontiguousarray(array, dtype=self.dtype)
        if data.shape != self.shape:
            raise ValueError(f"shape {data.shape} is not the volume's {self.shape}")
        self._copy_in(data, 0)

    def to_numpy(self) -> np.ndarray:
        """A host copy of the volume."""
        from cuda.bindings import runtime as cudart

        out = np.empty(self.shape, self.dtype)
        self._check(
            cudart.cudaMemcpy(
                out.ctypes.data,
                int(self._handle._base_addr),
                self.nbytes,
                cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
            )
        )
        return out

    def raw_handle(self) -> bytes:
        """The serialized CUDA IPC handle a server registers the region with (base64)."""
        import tritonclient.utils.cuda_shared_memory as cudashm

        return cudashm.get_raw_handle(self._handle)

    def release(self) -> None:
        """Free the device memory (idempotent)."""
        import tritonclient.utils.cuda_shared_memory as cudashm

        handle, self._handle = getattr(self, "_handle", None), None
        if handle is not None:
            cudashm.destroy_shared_memory_region(handle)

    def _copy_in(self, data: np.ndarray, offset: int) -> None:
        from cuda.bindings import runtime as cudart

        if self._handle is None:
            raise ValueError("the CUDA volume was released")
        # Synchronous: the host slice may be reused as soon as this returns.
        self._check(
            cudart.cudaMemcpy(
                int(self._handle._base_addr) + offset,
                data.ctypes.data,
                data.nbytes,
                cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
            )
        )

    @staticmethod
    def _check(result: Any) -> None:
        from cuda.bindings import runtime as cudart

        err = result[0] if isinstance(result, tuple) else result
        if err != cudart.cudaError_t.cudaSuccess:
            raise CudaUnavailable(f"CUDA copy failed: {cudart.cudaGetErrorString(err)[1]!r}")


@functools.cache
def cuda_allocate(device_id: int = 0) -> Callable[[Sequence[int], Any], CudaVolume | np.ndarray]:
    """The allocator (``allocate(shape, dtype)``) of volumes on ``device_id`` (one per device).

    Falls back to a numpy array when no region can be made, as
    :func:`dicom_node.inference.triton.shm.allocate` falls back to ordinary memory.
    """

    def allocate(shape: Sequence[int], dtype: np.dtype | type) -> CudaVolume | np.ndarray:
        try:
            return CudaVolume(shape, dtype, device_id)
        except CudaUnavailable:
            from dicom_node.inference.triton.shm import allocate as host_allocate

            return host_allocate(shape, dtype)

    return allocate
