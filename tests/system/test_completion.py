"""When a series is complete, against real peers: DCMTK storescu sends, the node decides.

A series is complete at the normal release of the association that carried it when its
slices stack without a gap, and by the settle timer otherwise. These tests read the job
database directly (read-only) to poll with a deadline: positive conditions only.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicom_node.common.associations import TUNE_REQUESTED
from dicom_node.series.completion import RELEASED, SETTLE_TIMER
from dicom_node_testing.phantom import make_phantom
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from dicom_node_testing.threshold import SEGMENT_SECONDS
from tests.peers import NodeProcess, storescu

pytestmark = pytest.mark.cost(50)

SLICES = 40


@pytest.fixture(scope="module")
def phantom_hu() -> tuple[np.ndarray, tuple[float, float, float]]:
    ph = make_phantom(shape=(SLICES, 96, 96), spacing=(5.0, 3.5, 3.5), seed=515)
    return ph.hu, ph.spacing


def _write(folder: Path, phantom_hu, patient: str) -> tuple[list[Path], SeriesAttributes]:
    hu, spacing = phantom_hu
    attrs = SeriesAttributes(patient_id=patient)
    return write_ct_series(hu, folder, spacing=spacing, attrs=attrs), attrs


def _node(tmp_path: Path, settle: float, **node) -> NodeProcess:
    # the threshold backend, each job "processing" for two seconds: completion is the point
    # here, not the model
    return NodeProcess(
        tmp_path / "node",
        command="dicom_node_testing.cli",
        env={SEGMENT_SECONDS: "2"},
        node={"settle_seconds": settle, **node},
        inference={"backend": "threshold", "attempts": 1},
    ).start()


def _series(node: NodeProcess, series_uid: str) -> dict | None:
    db = node.data_dir / "jobs.sqlite"
    if not db.exists():
        return None
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    con.row_factory = sqlite3.Row
    try:
        row = con.execute("SELECT * FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
    except sqlite3.OperationalError:  # the node is creating its tables
        return None
    finally:
        con.close()
    return dict(row) if row else None


def _poll(
    node: NodeProcess, series_uid: str, condition: Callable[[dict], bool], timeout: float, what: str
) -> dict:
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        job = _series(node, series_uid)
        if job is not None and condition(job):
            return job
        if node.proc is not None and node.proc.poll() is not None:
            raise RuntimeError(f"node exited: {node.tail()}")
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached in {timeout} s: {job}\n{node.tail()}")


def _finished(job: dict) -> bool:
    return job["state"] in ("done", "failed", "no_model")


def _send(node: NodeProcess, paths: list[Path], *extra: str) -> subprocess.CompletedProcess:
    return storescu(node.port, paths, "DICOM_NODE", "STORESCU", *extra)


# -- with real peers ----------------------------------------------------------------------
def test_one_association_completes_at_release(tmp_path, phantom_hu, dcmtk_tools):
    paths, attrs = _write(tmp_path / "ct", phantom_hu, "COMPLETE-1")
    node = _node(tmp_path, settle=3600)
    try:
        assert _send(node, paths).returncode == 0
        released = time.monotonic()
        job = _poll(
            node, attrs.series_instance_uid, lambda j: j["completed_by"] != "", 10, "completion"
        )
        assert job["completed_by"] == RELEASED
        assert time.monotonic() - released < 10  # not 3600 s
        job = _poll(node, attrs.series_instance_uid, _finished, 90, "job end")
        assert job["state"] == "done", job["reason"]
        assert job["instance_count"] == SLICES and job["attempts"] == 1
        # the rule shows in `dicom-node jobs`, as JSON and as text
        [listed] = node.jobs_from_cli()
        assert listed["completed_by"] == RELEASED
        assert node.jobs() == [listed]
        text = subprocess.run(
            [*_cli(node), "jobs", "--config", str(node.config)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert RELEASED in text
        # the slices were decoded while they arrived: nothing read from the spool at the end
        assert "assembled from slices staged as they arrived" in node.tail(200)
    finally:
        node.stop()


def _cli(node: NodeProcess) -> list[str]:
    return [sys.executable, "-m", node.command]


def test_gap_at_first_release_and_an_abort_complete_by_the_timer(tmp_path, phantom_hu, dcmtk_tools):
    paths, attrs = _write(tmp_path / "ct", phantom_hu, "COMPLETE-2")
    node = _node(tmp_path, settle=4)
    try:
        first = paths[:10] + paths[20:]  # slices 11-20 missing: a gap at this release
        assert _send(node, first).returncode == 0
        # the rest comes over an association the sender aborts: no evidence of the end
        r = _send(node, paths[10:20], "--abort")
        assert r.returncode == 0, r.stderr
        job = _poll(
            node, attrs.series_instance_uid, lambda j: j["completed_by"] != "", 30, "completion"
        )
        assert job["completed_by"] == SETTLE_TIMER
        assert job["instance_count"] == SLICES
        job = _poll(node, attrs.series_instance_uid, _finished, 90, "job end")
        assert job["state"] == "done", job["reason"]
        assert job["attempts"] == 1
    finally:
        node.stop()


def test_a_series_split_across_two_associations_completes_by_the_timer(
    tmp_path, phantom_hu, dcmtk_tools
):
    # Both releases are normal and the second leaves no gap, but neither association
    # carried the whole series: one release is no evidence that the other sender is done.
    paths, attrs = _write(tmp_path / "ct", phantom_hu, "COMPLETE-3")
    node = _node(tmp_path, settle=4)
    try:
        assert _send(node, paths[:10] + paths[20:]).returncode == 0
        assert _send(node, paths[10:20]).returncode == 0
        assert _series(node, attrs.series_instance_uid)["state"] == "receiving"
        job = _poll(
            node, attrs.series_instance_uid, lambda j: j["completed_by"] != "", 30, "completion"
        )
        assert job["completed_by"] == SETTLE_TIMER
        job = _poll(node, attrs.series_instance_uid, _finished, 90, "job end")
        assert job["state"] == "done", job["reason"]
        assert job["instance_count"] == SLICES and job["attempts"] == 1
        assert "association released with 10 of its 40 instance(s)" in node.tail(200)
    finally:
        node.stop()


def test_a_whole_series_sent_again_completes_at_its_release(tmp_path, phantom_hu, dcmtk_tools):
    # A sender that lost track re-sends the whole series over one association: the
    # instances are known already, yet that association carried all of them.
    paths, attrs = _write(tmp_path / "ct", phantom_hu, "COMPLETE-7")
    node = _node(tmp_path, settle=3600)
    try:
        assert _send(node, paths[:10] + paths[20:30]).returncode == 0  # a gap: receiving
        assert _series(node, attrs.series_instance_uid)["state"] == "receiving"
        assert _send(node, paths).returncode == 0
        job = _poll(
            node, attrs.series_instance_uid, lambda j: j["completed_by"] != "", 10, "completion"
        )
        assert job["completed_by"] == RELEASED and job["instance_count"] == SLICES
    finally:
        node.stop()


def test_a_series_with_a_gap_completes_by_the_timer_and_fails(tmp_path, phantom_hu, dcmtk_tools):
    paths, attrs = _write(tmp_path / "ct", phantom_hu, "COMPLETE-4")
    node = _node(tmp_path, settle=1)
    try:
        assert _send(node, paths[:15] + paths[16:]).returncode == 0
        job = _poll(node, attrs.series_instance_uid, _finished, 60, "job end")
        assert job["completed_by"] == SETTLE_TIMER
        assert job["state"] == "failed"
        assert job["reason"].startswith("not a volume: 1 slice(s) missing"), job["reason"]
    finally:
        node.stop()


def test_an_instance_arriving_during_the_job_reprocesses_once(tmp_path, phantom_hu, dcmtk_tools):
    paths, attrs = _write(tmp_path / "ct", phantom_hu, "COMPLETE-5")
    node = _node(tmp_path, settle=3)
    try:
        assert _send(node, paths[:-1]).returncode == 0
        # each job takes two seconds in "processing"
        _poll(
            node, attrs.series_instance_uid, lambda j: j["state"] == "processing", 20, "processing"
        )
        assert _send(node, paths[-1:]).returncode == 0
        job = _poll(
            node,
            attrs.series_instance_uid,
            lambda j: _finished(j) and j["instance_count"] == SLICES,
            120,
            "job end",
        )
        assert job["state"] == "done", job["reason"]
        assert job["attempts"] == 2  # one more run, for all 40 slices
        # the first run completed at the release; the series then spanned two associations
        assert job["completed_by"] == SETTLE_TIMER
        assert "1 new instance(s) arrived while processing" in node.tail(200)
    finally:
        node.stop()


def test_node_killed_mid_stream_completes_the_series_after_restart(
    tmp_path, phantom_hu, dcmtk_tools
):
    paths, attrs = _write(tmp_path / "ct", phantom_hu, "COMPLETE-6")
    node = _node(tmp_path, settle=3600)
    try:
        opened, killed = threading.Event(), threading.Event()

        def send_part() -> None:  # 15 slices, then the association stays open
            ae = AE(ae_title="STORESCU")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate(
                "127.0.0.1", node.port, ae_title="DICOM_NODE", evt_handlers=[TUNE_REQUESTED]
            )
            try:
                for p in paths[:15]:
                    assert assoc.send_c_store(pydicom.dcmread(p)).Status == 0
                opened.set()
                killed.wait(30)
            finally:
                assoc.abort()

        sender = threading.Thread(target=send_part)
        sender.start()
        assert opened.wait(30)
        node.kill()
        killed.set()
        sender.join(30)
        # every acknowledged instance is in the spool (its row may have been written behind
        # still: the restart registers it from there)
        spooled = list((node.data_dir / "spool").glob(f"*/{attrs.series_instance_uid}/*.dcm"))
        assert len(spooled) == 15
        node.start()
        assert _series(node, attrs.series_instance_uid)["instance_count"] == 15
        # the sender sends the whole series again; its release completes it
        assert _send(node, paths).returncode == 0
        job = _poll(node, attrs.series_instance_uid, _finished, 120, "job end")
        assert job["completed_by"] == RELEASED
        assert job["state"] == "done", job["reason"]
        assert job["instance_count"] == SLICES
    finally:
        node.stop()
