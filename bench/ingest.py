"""Ingest: CT series pushed with DCMTK ``storescu`` to the node (fsync per instance), to
DCMTK ``storescp`` (writing to disk, no sync) and to Orthanc, in one run; and the disk's
own limit beside them.

* **One association**: the same 200-slice 512x512 series pushed by one ``storescu`` to each
  receiver in turn.
* **Four associations**: four ``storescu`` at once, each pushing a series of its own, to
  the node and to ``storescp --fork`` (a process per association: the same parallelism).
* **The disk**: a file of the instance's size written and ``fdatasync``ed per instance, one
  writer and four, in a directory on the node's file system: what ingest with a sync per
  instance cannot beat.

Each run pushes to every receiver in a rotating order, so that a burst of load from other
work on the machine weighs on every receiver alike rather than on whichever was measured at
the time. Dirty pages left by the previous push (``storescp`` does not sync) are flushed
before each timed push, so that no receiver's writes are paid for in another's ``fsync``.
Every run uses fresh UIDs: nothing is a duplicate to the node.

Prints instances/s for each receiver and the node's ratio to each; never asserts a time.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.peers import NodeProcess, Orthanc, free_port, wait_port

SLICES = int(os.environ.get("BENCH_INGEST_SLICES", "200"))
# storescp alone swings between ~200 and ~320 inst/s from run to run here: 5 runs per receiver
RUNS = int(os.environ.get("BENCH_INGEST_RUNS", "5"))
#: Associations at once in the parallel rows, and the slices each one pushes.
PARALLEL = int(os.environ.get("BENCH_INGEST_PARALLEL", "4"))
PARALLEL_SLICES = int(os.environ.get("BENCH_INGEST_PARALLEL_SLICES", "100"))


def _series(root: Path, name: str, slices: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    hu = rng.normal(40, 30, size=(slices, 512, 512)).clip(-1024, 3000).astype(np.int16)
    out = root / name
    write_ct_series(hu, out, spacing=(1.0, 0.7, 0.7), attrs=SeriesAttributes())
    return out


def _push(port: int, aet: str, folders: list[Path]) -> float:
    """Instances/s of ``storescu`` pushes of ``folders``, one association each, all at once."""
    os.sync()  # untimed: start from a clean page cache
    count = sum(len(list(f.iterdir())) for f in folders)
    t0 = time.perf_counter()
    pushes = [
        subprocess.Popen(
            ["storescu", "-aec", aet, "+sd", "+r", "127.0.0.1", str(port), str(folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for folder in folders
    ]
    errors = [p.communicate()[1] for p in pushes]
    dt = time.perf_counter() - t0
    for p, err in zip(pushes, errors, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"storescu to {aet} failed: {err[-500:]}")
    return count / dt


def _disk(directory: Path, size: int, files: int, writers: int) -> float:
    """Files/s of ``writers`` threads each creating, writing and ``fdatasync``ing files of
    ``size`` bytes, as the node writes a spool file (one ``write``, one ``fdatasync``)."""
    os.sync()
    directory.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)

    def write(w: int) -> None:
        for k in range(files // writers):
            fd = os.open(directory / f"{w}-{k}.dcm", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fdatasync(fd)
            finally:
                os.close(fd)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    for f in directory.iterdir():
        f.unlink()
    return (files // writers) * writers / dt


def _storescp(root: Path, stack: ExitStack, name: str, *options: str) -> int:
    port = free_port()
    out = root / name
    out.mkdir()
    scp = subprocess.Popen(
        ["storescp", *options, "-od", str(out), "-aet", "STORESCP", str(port)],
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


def _row(figure: str, node: list[float], peer: list[float]) -> dict:
    if not node or not peer:  # not measured (BENCH_INGEST_PARALLEL below 2)
        return {"figure": figure, "this_project": None, "peer": None, "ratio": None}
    node_ips, peer_ips = statistics.median(node), statistics.median(peer)
    return {
        "figure": figure,
        "this_project": round(node_ips, 1),
        "peer": round(peer_ips, 1),
        "ratio": round(node_ips / peer_ips, 3),
        "runs": {"this_project": [round(r, 1) for r in node], "peer": [round(r, 1) for r in peer]},
    }


def run() -> list[dict]:
    one = ("node", "DCMTK storescp", "Orthanc 1.10")
    many = ("node x4", "DCMTK storescp --fork x4")
    rates: dict[str, list[float]] = {name: [] for name in (*one, *many, "disk", "disk x4")}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        # fresh UIDs per run and per association: nothing is a duplicate
        series = [_series(root, f"series{i}", SLICES, i) for i in range(RUNS)]
        parallel = [
            [
                _series(root, f"parallel{i}-{a}", PARALLEL_SLICES, 1000 + PARALLEL * i + a)
                for a in range(PARALLEL)
            ]
            for i in range(RUNS)
        ]
        instance_size = next(series[0].iterdir()).stat().st_size

        node = NodeProcess(
            root / "node", node={"settle_seconds": 3600.0, "complete_on_release": False}
        ).start()
        stack.callback(node.stop)
        scp_port = _storescp(root, stack, "storescp")
        forking_port = _storescp(root, stack, "storescp-fork", "--fork")
        pacs = Orthanc(root / "orthanc").start()
        stack.callback(pacs.stop)
        disk = node.data_dir / "disk-limit"  # the node's file system

        pushes = [
            ("node", lambda i: _push(node.port, "DICOM_NODE", [series[i]])),
            ("DCMTK storescp", lambda i: _push(scp_port, "STORESCP", [series[i]])),
            ("Orthanc 1.10", lambda i: _push(pacs.dicom_port, pacs.aet, [series[i]])),
            ("node x4", lambda i: _push(node.port, "DICOM_NODE", parallel[i])),
            ("DCMTK storescp --fork x4", lambda i: _push(forking_port, "STORESCP", parallel[i])),
            ("disk", lambda i: _disk(disk, instance_size, SLICES, 1)),
            ("disk x4", lambda i: _disk(disk, instance_size, PARALLEL * PARALLEL_SLICES, PARALLEL)),
        ]
        if PARALLEL < 2:  # BENCH_INGEST_PARALLEL=0 or 1: one association only
            pushes = [push for push in pushes if not push[0].endswith("x4")]
        for i in range(RUNS):
            turn = i % len(pushes)
            for name, push in pushes[turn:] + pushes[:turn]:
                rates[name].append(push(i))

    kib = instance_size / 1024
    rows = [
        _row(
            f"ingest {SLICES}x512x512, 1 association, instances/s (node fsyncs) vs DCMTK storescp",
            rates["node"],
            rates["DCMTK storescp"],
        ),
        _row(
            f"ingest {SLICES}x512x512, 1 association, instances/s (node fsyncs) vs Orthanc 1.10",
            rates["node"],
            rates["Orthanc 1.10"],
        ),
        _row(
            f"ingest {PARALLEL}x{PARALLEL_SLICES}x512x512, {PARALLEL} associations at once, "
            "instances/s (node fsyncs) vs DCMTK storescp --fork",
            rates["node x4"],
            rates["DCMTK storescp --fork x4"],
        ),
        _row(
            f"ingest, 1 association, instances/s vs the disk: write + fdatasync of a "
            f"{kib:.0f} KiB file per instance, files/s",
            rates["node"],
            rates["disk"],
        ),
        _row(
            f"ingest, {PARALLEL} associations, instances/s vs the disk: {PARALLEL} writers, "
            f"write + fdatasync of a {kib:.0f} KiB file each, files/s",
            rates["node x4"],
            rates["disk x4"],
        ),
    ]
    return [r for r in rows if r["this_project"] is not None]


def main() -> None:
    for row in run():
        print(
            f"{row['figure']}: node {row['this_project']}, peer {row['peer']}, "
            f"ratio {row['ratio']}; runs {row['runs']}"
        )


if __name__ == "__main__":
    sys.exit(main())
