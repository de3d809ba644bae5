"""CUDA shared memory between the node and a Triton server on this host.

The CUDA path itself needs a GPU and is measured by ``python -m bench gpu``; here, on any
machine, what a node without one does: it says why, and falls back to host memory.
"""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node.inference.triton.client import TRANSPORTS, TritonBackend
from dicom_node.inference.triton.cuda_shm import (
    CudaUnavailable,
    CudaVolume,
    cuda_allocate,
    unavailable_reason,
)
from dicom_node.inference.triton.shm import region_of, unlink

no_gpu = pytest.mark.skipif(unavailable_reason() is None, reason="a usable GPU is present")


@no_gpu
def test_without_a_gpu_a_cuda_volume_is_refused_with_the_reason():
    reason = unavailable_reason()
    assert reason and ("cuda-python" in reason or "CUDA device" in reason)
    with pytest.raises(CudaUnavailable, match="cuda-python|CUDA device"):
        CudaVolume((4, 8, 8), np.int16)


@no_gpu
def test_without_a_gpu_the_allocator_falls_back_to_a_host_region():
    volume = cuda_allocate()((3, 16, 16), np.int16)
    assert isinstance(volume, np.ndarray) and volume.shape == (3, 16, 16)
    region = region_of(volume)
    assert region is not None  # system shared memory: the server still reads it in place
    volume[1] = 7
    assert int(volume[1].sum()) == 7 * 256
    unlink(region)


def test_cuda_shm_is_a_transport_and_others_are_refused():
    assert "cuda_shm" in TRANSPORTS
    backend = TritonBackend(["127.0.0.1:1"], transport="cuda_shm")
    assert backend.uses_shm("127.0.0.1:1")
    backend.close()
    with pytest.raises(ValueError, match="transport must be one of"):
        TritonBackend(["127.0.0.1:1"], transport="cuda")


@no_gpu
def test_volume_allocator_follows_where_the_server_reads():
    from dicom_node.inference.triton.shm import allocate

    remote = TritonBackend(["127.0.0.1:8001"], transport="grpc")
    local = TritonBackend(["127.0.0.1:8001"], transport="auto", gpu_server=True)
    cuda = TritonBackend(["127.0.0.1:8001"], transport="cuda_shm")
    try:
        assert remote.volume_allocator() is np.empty  # tensors in the gRPC messages
        # Without CUDA IPC here, a local server on a GPU still reads a system region.
        assert local.volume_allocator() is allocate
        assert cuda.volume_allocator() is allocate
    finally:
        for backend in (remote, local, cuda):
            backend.close()


def test_one_cuda_allocator_per_device():
    assert cuda_allocate(0) is cuda_allocate(0)
    assert cuda_allocate(0) is not cuda_allocate(1)
