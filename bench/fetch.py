"""Fetch-and-segment against push-and-segment: the same series, the same node, the same run.

This project: a CT series already in the PACS (Orthanc 1.10) is fetched by the node on
request, as ``dicom-node fetch`` asks for it (a fetch recorded in the job database; the node
runs C-FIND, counts the series' instances at IMAGE level, and retrieves it by C-MOVE to
itself), segmented, and its SEG, RTSTRUCT and SR sent back to the PACS; timed from the
request to the last result acknowledged. Peer: the same voxels under new UIDs pushed to the
same node with DCMTK ``storescu``, timed from the push's start to the last result
acknowledged. Also printed: the transfer alone (request or push start to the series' last
instance stored).

The node runs the demo spleen bundle in its own process (``[inference] backend = "local"``)
when the bundle is trained, the ``threshold`` backend otherwise (``BENCH_FETCH_BACKEND``
chooses). Runs alternate (``BENCH_FETCH_RUNS``, default 3) after one untimed run of each;
medians are printed. ``BENCH_FETCH_SLICES`` (default 100) and ``BENCH_FETCH_SIZE`` (rows and
columns, default 512) size the series.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from dicom_node.config import PROJECT_ROOT
from dicom_node.export.push import push_paths
from dicom_node.state import JobDatabase
from dicom_node_testing.phantom import make_phantom
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.peers import NodeProcess, Orthanc

RUNS = int(os.environ.get("BENCH_FETCH_RUNS", "3"))
SLICES = int(os.environ.get("BENCH_FETCH_SLICES", "100"))
SIZE = int(os.environ.get("BENCH_FETCH_SIZE", "512"))
BUNDLE = PROJECT_ROOT / "bundles" / "spleen_ct_demo"
BACKEND = os.environ.get(
    "BENCH_FETCH_BACKEND",
    "local" if (BUNDLE / "models" / "model.ts").is_file() else "threshold",
)


def _write(hu, spacing, root: Path, n: int) -> tuple[SeriesAttributes, Path]:
    """The phantom under new UIDs (a study of its own), in a folder."""
    attrs = SeriesAttributes(patient_id=f"BENCH-FETCH-{n}")
    folder = root / f"series-{n}"
    write_ct_series(hu, folder, spacing=spacing, attrs=attrs)
    return attrs, folder


def _sent(db: Path, series_uid: str, timeout: float = 900.0) -> tuple[float, float]:
    """Wait for every result of the series acknowledged; (last acknowledgement, last
    instance received), as the job database recorded them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = JobDatabase(db)
        try:
            record = jobs.series.get(series_uid)
            items = jobs.outbox.items(series_uid)
        finally:
            jobs.close()
        if record is not None and record.state.finished and str(record.state) != "done":
            raise RuntimeError(f"series {series_uid} {record.state}: {record.reason}")
        if items and all(str(i.state) == "sent" for i in items):
            assert record is not None
            return max(i.sent_at or 0.0 for i in items), record.last_received
        time.sleep(0.1)
    raise TimeoutError(f"results of {series_uid} not acknowledged in {timeout} s")


def _push(node: NodeProcess, folder: Path, attrs: SeriesAttributes) -> tuple[float, float]:
    t0 = time.time()
    done = subprocess.run(
        ["storescu", "-aec", "DICOM_NODE", "+sd", "+r", "127.0.0.1", str(node.port), str(folder)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed: {done.stderr.decode()[-300:]}")
    sent, received = _sent(node.data_dir / "jobs.sqlite", attrs.series_instance_uid)
    return sent - t0, received - t0


def _fetch(
    node: NodeProcess, pacs: Orthanc, folder: Path, attrs: SeriesAttributes
) -> tuple[float, float]:
    files = sorted(folder.iterdir())
    if push_paths(files, pacs.aet, "127.0.0.1", pacs.dicom_port, progress=False).sent != len(files):
        raise RuntimeError("the series did not reach the PACS")
    db = node.data_dir / "jobs.sqlite"
    jobs = JobDatabase(db)
    try:
        t0 = time.time()
        jobs.fetches.add("pacs", attrs.study_instance_uid, requested_by="bench")
    finally:
        jobs.close()
    sent, received = _sent(db, attrs.series_instance_uid)
    return sent - t0, received - t0


def run() -> list[dict]:
    phantom = make_phantom(
        shape=(SLICES, SIZE, SIZE), spacing=(400.0 / SLICES, 350.0 / SIZE, 350.0 / SIZE), seed=5
    )
    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp:
        root = Path(tmp)
        node = NodeProcess(
            root / "node",
            command="dicom_node" if BACKEND != "threshold" else "dicom_node_testing.cli",
        )
        pacs = Orthanc(
            root / "orthanc", modalities={"node": ["DICOM_NODE", "127.0.0.1", node.port]}
        ).start()
        try:
            pacs_entry = {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
            node.write_config(
                node={"settle_seconds": 10.0},
                inference={"backend": BACKEND},
                models=[{"name": "spleen", "bundle": str(BUNDLE)}],
                destinations=[{"name": "pacs", **pacs_entry}],
                sources=[{"name": "pacs", **pacs_entry}],
            )
            node.start(timeout=120)
            fetched: list[tuple[float, float]] = []
            pushed: list[tuple[float, float]] = []
            for n in range(RUNS + 1):
                attrs, folder = _write(phantom.hu, phantom.spacing, root, 2 * n)
                f = _fetch(node, pacs, folder, attrs)
                attrs, folder = _write(phantom.hu, phantom.spacing, root, 2 * n + 1)
                p = _push(node, folder, attrs)
                if n:  # the first of each is untimed
                    fetched.append(f)
                    pushed.append(p)
        finally:
            node.stop()
            pacs.stop()
    what = f"{SLICES} slices {SIZE}x{SIZE}, {BACKEND} backend"
    rows = []
    for index, label in ((0, "to results acknowledged"), (1, "transfer alone")):
        this = statistics.median(f[index] for f in fetched)
        peer = statistics.median(p[index] for p in pushed)
        rows.append(
            {
                "figure": f"fetch-and-segment vs push-and-segment, {label}, {what} (s)",
                "this_project": round(this, 3),
                "peer": round(peer, 3),
                "ratio": round(this / peer, 3) if peer else None,
            }
        )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
