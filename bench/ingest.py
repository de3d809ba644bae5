"""Ingest: the same 200-slice 512x512 CT series pushed with DCMTK ``storescu`` to the node
(fsync per instance), to DCMTK ``storescp`` (writing to disk) and to Orthanc, in one run.

The three receivers run side by side and each run pushes its series to all three in turn,
in a rotating order, so that a burst of load from other work on the machine weighs on
every receiver alike rather than on whichever was measured at the time. Dirty pages left
by the previous push (``storescp`` does not sync) are flushed before each timed push, so
that no receiver's writes are paid for in another's ``fsync``.

Prints instances/s for each receiver and the node's ratio to each; never asserts a time.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.peers import NodeProcess, Orthanc, free_port, wait_port

SLICES = int(os.environ.get("BENCH_INGEST_SLICES", "200"))
# storescp alone swings between ~200 and ~320 inst/s from run to run here: 5 runs per receiver
RUNS = int(os.environ.get("BENCH_INGEST_RUNS", "5"))


def _series(root: Path, run: int) -> Path:
    rng = np.random.default_rng(run)
    hu = rng.normal(40, 30, size=(SLICES, 512, 512)).clip(-1024, 3000).astype(np.int16)
    out = root / f"series{run}"
    write_ct_series(hu, out, spacing=(1.0, 0.7, 0.7), attrs=SeriesAttributes())
    return out


def _push(port: int, aet: str, folder: Path) -> float:
    os.sync()  # untimed: start from a clean page cache
    t0 = time.perf_counter()
    r = subprocess.run(
        ["storescu", "-aec", aet, "+sd", "+r", "127.0.0.1", str(port), str(folder)],
        capture_output=True,
        text=True,
    )
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"storescu to {aet} failed: {r.stderr[-500:]}")
    return SLICES / dt


def _storescp(root: Path, stack: ExitStack) -> int:
    port = free_port()
    out = root / "storescp"
    out.mkdir()
    scp = subprocess.Popen(
        ["storescp", "-od", str(out), "-aet", "STORESCP", str(port)],
        env=dict(os.environ, TCP_NODELAY="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def stop() -> None:
        scp.terminate()
        scp.wait(30)

    stack.callback(stop)
    wait_port(port, 30, scp)
    return port


def run() -> list[dict]:
    rates: dict[str, list[float]] = {"node": [], "DCMTK storescp": [], "Orthanc 1.10": []}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        series = [_series(root, i) for i in range(RUNS)]  # fresh UIDs per run: no de-duplication

        node = NodeProcess(
            root / "node", node={"settle_seconds": 3600.0, "complete_on_release": False}
        ).start()
        stack.callback(node.stop)
        scp_port = _storescp(root, stack)
        pacs = Orthanc(root / "orthanc").start()
        stack.callback(pacs.stop)

        receivers = [
            ("node", node.port, "DICOM_NODE"),
            ("DCMTK storescp", scp_port, "STORESCP"),
            ("Orthanc 1.10", pacs.dicom_port, pacs.aet),
        ]
        for i, folder in enumerate(series):
            turn = i % len(receivers)
            for name, port, aet in receivers[turn:] + receivers[:turn]:
                rates[name].append(_push(port, aet, folder))

    node_ips = statistics.median(rates["node"])
    rows = []
    for peer in ("DCMTK storescp", "Orthanc 1.10"):
        peer_ips = statistics.median(rates[peer])
        rows.append(
            {
                "figure": f"ingest {SLICES}x512x512, instances/s (node fsyncs) vs {peer}",
                "this_project": round(node_ips, 1),
                "peer": round(peer_ips, 1),
                "ratio": round(node_ips / peer_ips, 3),
            }
        )
    return rows


def main() -> None:
    for row in run():
        print(
            f"{row['figure']}: node {row['this_project']}, peer {row['peer']}, ratio {row['ratio']}"
        )


if __name__ == "__main__":
    sys.exit(main())
