"""Peak memory of the node process for one 512x512x600 CT series, with each backend.

The node is started afresh for each backend, so that its peak (``VmHWM``) belongs to this
one series: received with DCMTK ``storescu``, segmented, encoded and sent to Orthanc. The
peer is the volume's own INT16 size; the target is at most 3x for both backends. With the
Triton backend the pipeline runs in Triton's processes (the node holds the volume in shared
memory); with the local backend it runs in the node's own.

``python -m bench memory`` (``BENCH_MEMORY_SLICES``, ``BENCH_MEMORY_BACKENDS`` to change the
series or the backends measured).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from dicom_node_testing.phantom import make_phantom
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.peers import NodeProcess, Orthanc, free_port

SLICES = int(os.environ.get("BENCH_MEMORY_SLICES", "600"))
BACKENDS = os.environ.get("BENCH_MEMORY_BACKENDS", "local,triton").split(",")
#: Slices of phantom painted; the series repeats them (painting 600 takes some 100 s here).
_PAINTED = 100


def peak_rss_mb(pid: int) -> float:
    """The peak resident set (``VmHWM``) of process ``pid``, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmHWM")


def write_series(root: Path, slices: int) -> tuple[Path, SeriesAttributes]:
    """A 512x512 CT series of ``slices`` slices, 400 mm long, written as DICOM files."""
    spacing = (400.0 / slices, 0.7, 0.7)
    painted = make_phantom(shape=(min(slices, _PAINTED), 512, 512), spacing=spacing, seed=5)
    repeat = -(-slices // painted.hu.shape[0])
    hu = np.repeat(painted.hu, repeat, axis=0)[:slices]
    attrs = SeriesAttributes(patient_id="BENCH-MEMORY")
    folder = root / f"s{slices}"
    write_ct_series(hu, folder, spacing=spacing, attrs=attrs)
    return folder, attrs


def _node(root: Path, pacs: Orthanc, backend: str) -> NodeProcess:
    inference: dict = {"backend": backend}
    if backend == "triton":
        inference.update(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    return NodeProcess(
        root,
        node={"settle_seconds": 10.0},
        inference=inference,
        destinations=[
            {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
        ],
    ).start(timeout=180)


def measure(root: Path, pacs: Orthanc, backend: str, folder: Path, uid: str) -> dict:
    """Peak RSS of a fresh node with ``backend`` receiving, processing and sending the series."""
    node = _node(root / f"node-{backend}", pacs, backend)
    try:
        idle = peak_rss_mb(node.proc.pid)
        started = time.monotonic()
        subprocess.run(
            ["storescu", "-aec", "DICOM_NODE", "+sd", "+r", "127.0.0.1", str(node.port)]
            + [str(folder)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def sent(jobs: list[dict]) -> bool:
            job = next((j for j in jobs if j["series_uid"] == uid), None)
            return bool(
                job
                and job["state"] == "done"
                and job["outbox"]
                and all(o["state"] == "sent" for o in job["outbox"])
            )

        node.wait_for(sent, 900, "results in the PACS", failures_allowed=False)
        return {
            "backend": backend,
            "peak": peak_rss_mb(node.proc.pid),
            "idle": idle,
            "seconds": time.monotonic() - started,
        }
    finally:
        node.stop()


def run() -> list[dict]:
    rows: list[dict] = []
    volume_mb = SLICES * 512 * 512 * 2 / 2**20
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        root = Path(tmp)
        folder, attrs = write_series(root, SLICES)
        pacs = Orthanc(root / "pacs").start()
        try:
            for backend in BACKENDS:
                got = measure(root, pacs, backend, folder, attrs.series_instance_uid)
                rows.append(
                    {
                        "figure": f"peak RSS of the node, 512x512x{SLICES} end to end, "
                        f"{backend} backend, MiB (idle {got['idle']:.0f}, "
                        f"{got['seconds']:.0f} s; peer: the volume's INT16 size; "
                        "target <= 3x)",
                        "this_project": round(got["peak"], 0),
                        "peer": round(volume_mb, 0),
                        "ratio": round(got["peak"] / volume_mb, 2),
                    }
                )
        finally:
            pacs.stop()
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
