"""Ingest: the same 200-slice 512x512 CT series pushed with DCMTK ``storescu`` to the node
(fsync per instance), to DCMTK ``storescp`` (writing to disk) and to Orthanc, in one run.

Prints instances/s for each receiver and the node's ratio to each; never asserts a time.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dicom_node.synthetic import SeriesAttributes, write_ct_series
from tests.peers import NodeProcess, Orthanc, free_port, wait_port

SLICES = int(os.environ.get("BENCH_INGEST_SLICES", "200"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))


def _series(root: Path, run: int) -> Path:
    rng = np.random.default_rng(run)
    hu = rng.normal(40, 30, size=(SLICES, 512, 512)).clip(-1024, 3000).astype(np.int16)
    out = root / f"series{run}"
    write_ct_series(hu, out, spacing=(1.0, 0.7, 0.7), attrs=SeriesAttributes())
    return out


def _push(port: int, aet: str, folder: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(["storescu", "-aec", aet, "+sd", "+r", "127.0.0.1", str(port), str(folder)],
                       capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"storescu to {aet} failed: {r.stderr[-500:]}")
    return SLICES / dt


def run() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)
        series = [_series(root, i) for i in range(RUNS)]  # fresh UIDs per run: no de-duplication

        node = NodeProcess(root / "node", node={"settle_seconds": 3600.0}).start()
        try:
            node_rates = [_push(node.port, "DICOM_NODE", s) for s in series]
        finally:
            node.stop()

        port = free_port()
        out = root / "storescp"
        out.mkdir()
        scp = subprocess.Popen(["storescp", "-od", str(out), "-aet", "STORESCP", str(port)],
                               env=dict(os.environ, TCP_NODELAY="1"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port, 30, scp)
            scp_rates = [_push(port, "STORESCP", s) for s in series]
        finally:
            scp.terminate()
            scp.wait(30)

        pacs = Orthanc(root / "orthanc").start()
        try:
            orthanc_rates = [_push(pacs.dicom_port, pacs.aet, s) for s in series]
        finally:
            pacs.stop()
        shutil.rmtree(root / "node", ignore_errors=True)

    node_ips = statistics.median(node_rates)
    for peer, rates in (("DCMTK storescp", scp_rates), ("Orthanc 1.10", orthanc_rates)):
        peer_ips = statistics.median(rates)
        rows.append({
            "figure": f"ingest {SLICES}x512x512, instances/s (node fsyncs) vs {peer}",
            "this_project": round(node_ips, 1),
            "peer": round(peer_ips, 1),
            "ratio": round(node_ips / peer_ips, 3),
        })
    return rows


def main() -> None:
    for row in run():
        print(f"{row['figure']}: node {row['this_project']}, peer {row['peer']}, "
              f"ratio {row['ratio']}")


if __name__ == "__main__":
    sys.exit(main())
