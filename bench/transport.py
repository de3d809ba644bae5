"""What moving a CT volume to Triton and back costs, per transport.

A 512 x 512 x 300 INT16 volume (150 MiB, a typical abdominal CT) goes through the ``echo``
model of ``model_repository`` and back over HTTP, gRPC and system shared memory (the
transport the node uses with a server on its own host). The server is the one the node
starts (nvidia-pytriton's ``tritonserver``) on free loopback ports. Every round trip is
checked to return the volume unchanged; the median of several runs is reported, with the
HTTP transport as the reference.

Run ``python -m bench.transport`` (``--runs``, ``--shape``).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from dicom_node.inference.triton.placement import Registration
from dicom_node.inference.triton.server import TritonServer
from dicom_node.inference.triton.shm import region_of, shared_empty, unlink

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODEL = "echo"
DEFAULT_SHAPE = (300, 512, 512)  # (slices, rows, cols)


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echo_http(url: str) -> Callable[[np.ndarray], np.ndarray]:
    """Round trip over HTTP/REST with the binary tensor extension (no JSON for the data)."""
    client = httpclient.InferenceServerClient(url, network_timeout=600.0, connection_timeout=60.0)

    def call(volume: np.ndarray) -> np.ndarray:
        inp = httpclient.InferInput("INPUT", list(volume.shape), "INT16")
        inp.set_data_from_numpy(volume, binary_data=True)
        out = httpclient.InferRequestedOutput("OUTPUT", binary_data=True)
        return client.infer(MODEL, [inp], outputs=[out]).as_numpy("OUTPUT")

    return call


def echo_grpc(url: str) -> Callable[[np.ndarray], np.ndarray]:
    """Round trip with the tensors inside the gRPC messages."""
    client = grpcclient.InferenceServerClient(url)

    def call(volume: np.ndarray) -> np.ndarray:
        inp = grpcclient.InferInput("INPUT", list(volume.shape), "INT16")
        inp.set_data_from_numpy(volume)
        return client.infer(MODEL, [inp]).as_numpy("OUTPUT")

    return call


def echo_shm(url: str) -> Callable[[np.ndarray], np.ndarray]:
    """Round trip through system shared memory, as the node sends volumes.

    Like :class:`~dicom_node.inference.triton.client.TritonBackend` with a volume in ordinary
    memory, every call copies it into a region of its own, registers that and an output
    region, and unregisters and unlinks both, so the figure includes that overhead.
    """
    client = grpcclient.InferenceServerClient(url)

    def call(volume: np.ndarray) -> np.ndarray:
        staged = shared_empty(volume.shape, volume.dtype)
        staged[...] = volume
        result = shared_empty(volume.shape, volume.dtype)
        regions = [region_of(staged), region_of(result)]
        registrations = []
        try:
            registrations = [Registration(client, r, timeout=30.0) for r in regions]
            inp = grpcclient.InferInput("INPUT", list(volume.shape), "INT16")
            inp.set_shared_memory(registrations[0].name, volume.nbytes)
            out = grpcclient.InferRequestedOutput("OUTPUT")
            out.set_shared_memory(registrations[1].name, volume.nbytes)
            client.infer(MODEL, [inp], outputs=[out])
            return result
        finally:
            for registration in registrations:
                registration.release()
            for region in regions:
                unlink(region)

    return call


def measure(call: Callable[[np.ndarray], np.ndarray], volume: np.ndarray, runs: int) -> float:
    """Median seconds of ``runs`` round trips after one warm-up; checks every result."""
    times = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        result = call(volume)
        elapsed = time.perf_counter() - t0
        if not np.array_equal(result, volume):
            raise AssertionError("the echo model returned a different volume")
        if i:  # the first run pays for connections and the stub's memory growth
            times.append(elapsed)
    return statistics.median(times)


def run(runs: int = 5, shape: Sequence[int] = DEFAULT_SHAPE) -> list[dict]:
    """Measure the three transports; rows compare gRPC and shared memory with HTTP.

    Each row: ``figure`` (what is compared), ``this_project`` (seconds with the transport),
    ``peer`` (seconds over HTTP) and ``ratio`` (peer / this_project: how many times faster).
    """
    volume = np.random.default_rng(0).integers(-1024, 3072, size=tuple(shape), dtype=np.int16)
    with tempfile.TemporaryDirectory(prefix="dicom-node-bench-") as work:
        server = TritonServer(
            PROJECT_ROOT / "model_repository",
            Path(work),
            grpc_port=free_port(),
            http_port=free_port(),
            metrics_port=free_port(),
            models=[MODEL],
            startup_timeout=120.0,
        )
        with server:
            seconds = {
                "HTTP": measure(echo_http(server.http_url), volume, runs),
                "gRPC": measure(echo_grpc(server.grpc_url), volume, runs),
                "shared memory": measure(echo_shm(server.grpc_url), volume, runs),
            }
    mb = volume.nbytes / 1e6
    print(
        f"echo round trip of a {'x'.join(map(str, shape))} INT16 volume ({mb:.0f} MB), "
        f"median of {runs}"
    )
    print(f"{'transport':<15}{'seconds':>10}{'MB/s':>10}{'vs HTTP':>10}")
    for name, t in seconds.items():
        print(f"{name:<15}{t:>10.3f}{2 * mb / t:>10.0f}{seconds['HTTP'] / t:>9.1f}x")
    label = f"echo round trip {'x'.join(map(str, shape))} int16, s"
    return [
        {
            "figure": f"{label}: {name} vs HTTP",
            "this_project": round(seconds[name], 4),
            "peer": round(seconds["HTTP"], 4),
            "ratio": round(seconds["HTTP"] / seconds[name], 2),
        }
        for name in ("gRPC", "shared memory")
    ]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--shape", type=int, nargs=3, default=DEFAULT_SHAPE, metavar=("SLICES", "ROWS", "COLS")
    )
    args = parser.parse_args(argv)
    return run(args.runs, args.shape)


if __name__ == "__main__":
    main()
