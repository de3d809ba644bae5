"""Integrity under pressure, with the real node and a real Orthanc.

* A run overtaken by new instances queues nothing: the PACS receives one SEG, RTSTRUCT and
  SR per series, made from every instance.
* Results already acknowledged are superseded explicitly: the new SR names them in its
  Predecessor Documents Sequence.
"""

from __future__ import annotations

import io
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from dicom_node.common.associations import TUNE_REQUESTED
from dicom_node_testing.phantom import make_phantom
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from dicom_node_testing.threshold import SEGMENT_SECONDS
from tests.peers import NodeProcess, Orthanc, small_tmpfs, storescu

pytestmark = [pytest.mark.slow, pytest.mark.cost(80)]

SLICES = 120


def _series(tmp_path: Path, name: str, seed: int) -> tuple[list[Path], SeriesAttributes]:
    phantom = make_phantom(shape=(SLICES, 64, 64), spacing=(2.5, 5.0, 5.0), seed=seed)
    attrs = SeriesAttributes(patient_id=f"INTEGRITY-{seed}")
    return write_ct_series(phantom.hu, tmp_path / name, spacing=phantom.spacing, attrs=attrs), attrs


def _node(tmp_path: Path, pacs: Orthanc) -> NodeProcess:
    dest = {
        "name": "pacs",
        "ae_title": pacs.aet,
        "host": "127.0.0.1",
        "port": pacs.dicom_port,
        "retry_backoff_seconds": 0.5,
        "max_backoff_seconds": 1.0,
    }
    # the threshold backend, each job "processing" for two seconds: what is sent is the
    # point here, not the model
    return NodeProcess(
        tmp_path / "node",
        command="dicom_node_testing.cli",
        env={SEGMENT_SECONDS: "2"},
        node={"settle_seconds": 3.0, "complete_on_release": True},
        inference={"backend": "threshold", "attempts": 1},
        destinations=[dest],
    )


def _db(node: NodeProcess, sql: str, *args) -> list[dict]:
    db = node.data_dir / "jobs.sqlite"
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql, args)]
    except sqlite3.OperationalError:  # the node is creating its tables
        return []
    finally:
        con.close()


def _poll(node: NodeProcess, condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if node.proc is not None and node.proc.poll() is not None:
            raise RuntimeError(f"node exited: {node.tail()}")
        time.sleep(0.02)
    raise TimeoutError(f"{what} not reached in {timeout} s\n{node.tail(60)}")


def _state(node: NodeProcess, uid: str) -> dict:
    rows = _db(node, "SELECT * FROM series WHERE series_uid = ?", uid)
    return rows[0] if rows else {}


def _settled(node: NodeProcess, uid: str, count: int) -> bool:
    """Done with ``count`` instances and nothing left pending in the outbox."""
    job = _state(node, uid)
    if job.get("state") == "failed":
        raise AssertionError(f"job failed: {job['reason']}")
    pending = _db(node, "SELECT id FROM outbox WHERE series_uid = ? AND state = 'pending'", uid)
    sent = _db(node, "SELECT id FROM outbox WHERE series_uid = ? AND state = 'sent'", uid)
    return (
        job.get("state") == "done"
        and job.get("instance_count") == count
        and not pending
        and len(sent) >= 3
    )


def _in_pacs(pacs: Orthanc, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    found = pacs.rest(
        "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}
    )
    out: dict[str, list[pydicom.Dataset]] = {}
    for iid in found:
        ds = pydicom.dcmread(io.BytesIO(pacs.file(iid)), stop_before_pixels=True)
        out.setdefault(str(ds.Modality), []).append(ds)
    return out


def _seg_references(seg: pydicom.Dataset) -> set[str]:
    return {
        str(i.ReferencedSOPInstanceUID)
        for s in seg.ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    }


def test_a_run_overtaken_by_new_instances_sends_nothing(tmp_path, orthanc, dcmtk_tools):
    paths, attrs = _series(tmp_path, "ct", seed=31)
    uid = attrs.series_instance_uid
    node = _node(tmp_path, orthanc).start()
    try:
        assert storescu(node.port, paths[: SLICES // 2]).returncode == 0
        # the first half stacks without a gap: complete at release, and processed
        _poll(
            node, lambda: _state(node, uid).get("state") == "processing", 30, "first run processing"
        )
        assert storescu(node.port, paths[SLICES // 2 :]).returncode == 0
        _poll(node, lambda: _settled(node, uid, SLICES), 180, "whole series done and sent")
        log = node.tail(400)
        assert "this run's results are discarded, none was queued" in log, log
        job = _state(node, uid)
        assert job["attempts"] == 2
        outbox = _db(node, "SELECT state FROM outbox WHERE series_uid = ?", uid)
        assert [o["state"] for o in outbox] == ["sent"] * 3  # the first run queued nothing
        in_pacs = _in_pacs(orthanc, attrs.study_instance_uid)
        assert {m: len(v) for m, v in in_pacs.items()} == {"SEG": 1, "RTSTRUCT": 1, "SR": 1}
        ct_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
        assert _seg_references(in_pacs["SEG"][0]) == ct_uids
        # nothing of the discarded run is left on disk either
        results = list((node.data_dir / "results" / uid).glob("*.dcm"))
        assert len(results) == 3
        print(
            f"integrity overtaken run: {SLICES // 2} + {SLICES // 2} instances, "
            "1 SEG + 1 RTSTRUCT + 1 SR in the PACS, SEG references all"
        )
    finally:
        node.stop()


def test_new_instances_after_results_were_sent_supersede_them(tmp_path, orthanc, dcmtk_tools):
    paths, attrs = _series(tmp_path, "ct", seed=32)
    uid = attrs.series_instance_uid
    node = _node(tmp_path, orthanc).start()
    try:
        assert storescu(node.port, paths[: SLICES // 2]).returncode == 0
        _poll(node, lambda: _settled(node, uid, SLICES // 2), 120, "first half sent")
        first = {
            r["sop_uid"] for r in _db(node, "SELECT sop_uid FROM outbox WHERE series_uid = ?", uid)
        }
        assert storescu(node.port, paths[SLICES // 2 :]).returncode == 0
        _poll(
            node,
            lambda: (
                _settled(node, uid, SLICES)
                and len(
                    _db(node, "SELECT id FROM outbox WHERE series_uid = ? AND state = 'sent'", uid)
                )
                == 6
            ),
            120,
            "second run sent",
        )
        in_pacs = _in_pacs(orthanc, attrs.study_instance_uid)
        assert {m: len(v) for m, v in in_pacs.items()} == {"SEG": 2, "RTSTRUCT": 2, "SR": 2}
        new_sr = next(sr for sr in in_pacs["SR"] if str(sr.SOPInstanceUID) not in first)
        named = {
            str(i.ReferencedSOPInstanceUID)
            for study in new_sr.PredecessorDocumentsSequence
            for series in study.ReferencedSeriesSequence
            for i in series.ReferencedSOPSequence
        }
        assert named == first
        new_seg = next(s for s in in_pacs["SEG"] if str(s.SOPInstanceUID) not in first)
        assert len(_seg_references(new_seg)) == SLICES
        print("integrity supersede: the second SR names the 3 acknowledged earlier results")
    finally:
        node.stop()


def test_below_the_watermark_intake_stops_and_nothing_is_sent_twice(tmp_path, orthanc, dcmtk_tools):
    """data_dir on a small tmpfs: a series is received, processed and sent once; the disk
    is then filled below the intake watermark: C-STORE is refused with 0xA700, and what was
    acknowledged before (instances and results) stays as it was."""
    import os
    import shutil

    with small_tmpfs(tmp_path / "data", 64) as data:
        node = None
        try:
            phantom = make_phantom(shape=(40, 64, 64), spacing=(5.0, 5.0, 5.0), seed=33)
            attrs = SeriesAttributes(patient_id="INTEGRITY-33")
            paths = write_ct_series(
                phantom.hu, tmp_path / "a", spacing=phantom.spacing, attrs=attrs
            )
            uid = attrs.series_instance_uid
            node = _node(tmp_path, orthanc)
            dest = {
                "name": "pacs",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "retry_backoff_seconds": 0.5,
            }
            node.write_config(
                node={"data_dir": str(data), "settle_seconds": 30.0, "min_free_disk_mb": 32},
                limits={"reserved_disk_mb": 4},
                inference={"backend": "threshold", "attempts": 1},
                destinations=[dest],
            )
            node.start()
            assert storescu(node.port, paths).returncode == 0
            _poll(node, lambda: _settled(node, uid, 40), 120, "series done and sent")

            # fill the disk to 20 MB free: below the 32 MB intake watermark, above the reserve
            free = shutil.disk_usage(data).free
            with open(data / "filler", "wb") as f:
                f.write(b"\0" * (free - 20 * 2**20))
                os.fsync(f.fileno())
            other = write_ct_series(
                phantom.hu[:5],
                tmp_path / "b",
                spacing=phantom.spacing,
                attrs=SeriesAttributes(patient_id="INTEGRITY-34"),
            )
            assert storescu(node.port, other).returncode != 0
            from pynetdicom import AE
            from pynetdicom.sop_class import CTImageStorage

            scu = AE(ae_title="STORESCU")
            scu.add_requested_context(CTImageStorage)
            assoc = scu.associate(
                "127.0.0.1", node.port, ae_title="DICOM_NODE", evt_handlers=[TUNE_REQUESTED]
            )
            assert assoc.is_established
            try:
                status = assoc.send_c_store(pydicom.dcmread(other[0]))
            finally:
                assoc.release()
            assert int(status.Status) == 0xA700, status
            assert "C-STORE refused (0xA700)" in node.tail(100)
            # what was acknowledged before is all there, and nothing was sent again
            assert len(list((data / "spool").glob("*/*/*.dcm"))) == 40
            outbox = _db(node, "SELECT state FROM outbox WHERE series_uid = ?", uid)
            assert [o["state"] for o in outbox] == ["sent"] * 3
            in_pacs = _in_pacs(orthanc, attrs.study_instance_uid)
            assert {m: len(v) for m, v in in_pacs.items()} == {"SEG": 1, "RTSTRUCT": 1, "SR": 1}
            print(
                "integrity watermark: intake refused with 0xA700 at 20 MB free, "
                "results sent once, instances lost = 0"
            )
        finally:
            if node is not None:
                node.stop()


def test_killed_mid_processing_and_restarted_sends_one_result_of_the_whole(
    tmp_path, orthanc, dcmtk_tools
):
    """60 of 120 slices, their job processing, the other 60, then SIGKILL and a restart:
    the PACS ends with exactly one SEG, RTSTRUCT and SR for the series, made from all 120
    instances, and no instance the node acknowledged is lost."""
    paths, attrs = _series(tmp_path, "ct", seed=35)
    uid = attrs.series_instance_uid
    node = _node(tmp_path, orthanc)
    node.write_config(
        node={"settle_seconds": 2.0, "complete_on_release": True},
        inference={"backend": "threshold", "attempts": 1},
        destinations=[
            {
                "name": "pacs",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "retry_backoff_seconds": 0.5,
                "max_backoff_seconds": 1.0,
            }
        ],
    )
    node.start()
    try:
        assert storescu(node.port, paths[: SLICES // 2]).returncode == 0
        _poll(
            node, lambda: _state(node, uid).get("state") == "processing", 30, "first run processing"
        )
        assert storescu(node.port, paths[SLICES // 2 :]).returncode == 0
        state_at_kill = _state(node, uid)
        node.kill()
        queued = _db(node, "SELECT state FROM outbox WHERE series_uid = ?", uid)
        in_pacs = _in_pacs(orthanc, attrs.study_instance_uid)
        assert "SEG" not in in_pacs, "a result of the partial series reached the PACS"
        node.start()
        _poll(node, lambda: _settled(node, uid, SLICES), 180, "whole series done and sent")
        # let any stray send land before counting: the outbox says nothing is pending
        in_pacs = _in_pacs(orthanc, attrs.study_instance_uid)
        assert {m: len(v) for m, v in in_pacs.items()} == {"SEG": 1, "RTSTRUCT": 1, "SR": 1}
        ct_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
        assert _seg_references(in_pacs["SEG"][0]) == ct_uids
        outbox = _db(node, "SELECT state FROM outbox WHERE series_uid = ?", uid)
        assert sorted(o["state"] for o in outbox if o["state"] == "sent") == ["sent"] * 3
        spooled = {p.stem for p in (node.data_dir / "spool").glob("*/*/*.dcm")}
        assert spooled == ct_uids
        assert _state(node, uid)["instance_count"] == SLICES
        print(
            f"integrity SIGKILL: killed with the job {state_at_kill.get('state')} "
            f"({len(queued)} result(s) queued), restarted: 1 SEG + 1 RTSTRUCT + 1 SR over "
            f"{SLICES} instances, instances lost = 0"
        )
    finally:
        node.stop()
