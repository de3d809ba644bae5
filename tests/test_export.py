"""The outbox against a real PACS: retries while Orthanc is down, then exactly once."""

from __future__ import annotations

import io
import time

import numpy as np
import pydicom

from dicom_node.config import Destination, NodeSettings, ResultSettings, Settings
from dicom_node.encode import AlgorithmInfo, build_rtstruct, build_seg, build_sr, segment_info_for
from dicom_node.export import Exporter, backoff
from dicom_node.jobs import JobStore
from dicom_node.spool import write_durably
from dicom_node.synthetic import write_ct_series
from dicom_node.volume import assemble_series
from tests.peers import Orthanc, free_port


def _results(tmp_path):
    hu = np.full((6, 48, 48), -50, np.int16)
    vol = assemble_series(write_ct_series(hu, tmp_path / "ct", spacing=(3.0, 1.0, 1.0)))
    labels = np.zeros(vol.array.shape, np.uint8)
    labels[1:5, 10:30, 12:28] = 1
    segs = [segment_info_for(1, "spleen")]
    alg = AlgorithmInfo(name="test", version="1")
    res = ResultSettings()
    seg = build_seg(vol, labels, segs, alg, res)
    files = {
        "SEG": seg,
        "RTSTRUCT": build_rtstruct(vol, labels, segs, alg, res),
        "SR": build_sr(seg, vol, labels, segs, alg, res),
    }
    out = {}
    for kind, ds in files.items():
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        path = tmp_path / f"{kind}.dcm"
        write_durably(path, buf.getvalue())
        out[kind] = (path, str(ds.SOPInstanceUID))
    return vol, out


def test_backoff_grows_and_is_capped():
    assert [backoff(n, 2, 30) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]


def test_outbox_retries_until_the_pacs_is_back_then_sends_once(tmp_path):
    vol, files = _results(tmp_path)
    pacs = Orthanc(tmp_path / "orthanc")
    dest = Destination(
        name="pacs",
        ae_title="ORTHANC",
        host="127.0.0.1",
        port=pacs.dicom_port,
        attempts=5,
        retry_backoff_seconds=0.2,
        max_backoff_seconds=0.5,
    )
    settings = Settings(node=NodeSettings(data_dir=tmp_path), destinations=[dest])
    jobs = JobStore(tmp_path / "jobs.sqlite")
    series_uid = "1.2.3"
    for kind, (path, uid) in files.items():
        jobs.enqueue_result(
            series_uid=series_uid, kind=kind, destination="pacs", path=path, sop_uid=uid
        )
    exporter = Exporter(settings, jobs)

    # the PACS is down: nothing is acknowledged, every item waits with its reason
    assert exporter.run_once() == 0
    items = jobs.outbox(series_uid)
    assert all(i.state == "pending" and i.attempts == 1 for i in items)
    assert all("cannot be reached" in i.last_error for i in items)
    assert all(i.next_attempt > time.time() for i in items)
    assert exporter.run_once() == 0  # not due yet: no attempt made
    assert all(i.attempts == 1 for i in jobs.outbox(series_uid))

    pacs.start()
    try:
        deadline = time.time() + 30
        sent = 0
        while sent < 3 and time.time() < deadline:
            sent += exporter.run_once()
            time.sleep(0.2)
        assert sent == 3
        assert all(i.state == "sent" for i in jobs.outbox(series_uid))
        # nothing is sent twice, however often the exporter runs
        for _ in range(3):
            assert exporter.run_once() == 0
        by_modality = pacs.instances_by_modality()
        assert {m: len(v) for m, v in by_modality.items()} == {"SEG": 1, "RTSTRUCT": 1, "SR": 1}
        for modality, iid in ((m, v[0]) for m, v in by_modality.items()):
            ds = pydicom.dcmread(io.BytesIO(pacs.file(iid)))
            assert ds.StudyInstanceUID == vol.first.StudyInstanceUID
            assert str(ds.SOPInstanceUID) == files[modality][1]
    finally:
        pacs.stop()


def test_gives_up_after_the_configured_attempts(tmp_path):
    _, files = _results(tmp_path)
    dest = Destination(
        name="gone",
        ae_title="NOBODY",
        host="127.0.0.1",
        port=free_port(),
        attempts=2,
        retry_backoff_seconds=0.0,
        max_backoff_seconds=0.0,
    )
    jobs = JobStore(tmp_path / "jobs.sqlite")
    path, uid = files["SEG"]
    jobs.enqueue_result(series_uid="1.2", kind="SEG", destination="gone", path=path, sop_uid=uid)
    exporter = Exporter(Settings(destinations=[dest]), jobs)
    exporter.run_once()
    exporter.run_once()
    (item,) = jobs.outbox("1.2")
    assert (item.state, item.attempts) == ("failed", 2)
    # an operator's retry queues it again
    assert jobs.retry("1.2") == 1
    assert jobs.outbox("1.2")[0].state == "pending"


def test_a_pacs_that_rejects_the_association_is_retried(tmp_path):
    """Orthanc checks the called AE title: a destination configured with the wrong one is
    rejected; the item waits with that reason and arrives once the destination is fixed."""
    _, files = _results(tmp_path)
    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        jobs = JobStore(tmp_path / "jobs.sqlite")
        path, uid = files["SEG"]
        jobs.enqueue_result(
            series_uid="1.3", kind="SEG", destination="pacs", path=path, sop_uid=uid
        )
        wrong = Destination(
            name="pacs",
            ae_title="NOT_ORTHANC",
            host="127.0.0.1",
            port=pacs.dicom_port,
            attempts=5,
            retry_backoff_seconds=0.0,
        )
        assert Exporter(Settings(destinations=[wrong]), jobs).run_once() == 0
        (item,) = jobs.outbox("1.3")
        assert (item.state, item.attempts) == ("pending", 1)
        assert "rejected the association" in item.last_error
        right = Destination(
            name="pacs",
            ae_title=pacs.aet,
            host="127.0.0.1",
            port=pacs.dicom_port,
            attempts=5,
            retry_backoff_seconds=0.0,
        )
        assert Exporter(Settings(destinations=[right]), jobs).run_once() == 1
        assert jobs.outbox("1.3")[0].state == "sent"
        assert {m: len(v) for m, v in pacs.instances_by_modality().items()} == {"SEG": 1}
    finally:
        pacs.stop()


def test_a_pacs_that_refuses_the_seg_class_is_recorded_as_such(tmp_path):
    """A Storage SCP that takes CT only: the SEG's presentation context is refused, and
    the outbox says so (not "cannot be reached")."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    _, files = _results(tmp_path)
    scp = AE(ae_title="CT_ONLY")
    scp.add_supported_context(CTImageStorage)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False)
    try:
        jobs = JobStore(tmp_path / "jobs.sqlite")
        path, uid = files["SEG"]
        jobs.enqueue_result(series_uid="1.4", kind="SEG", destination="ct", path=path, sop_uid=uid)
        dest = Destination(
            name="ct",
            ae_title="CT_ONLY",
            host="127.0.0.1",
            port=port,
            attempts=5,
            retry_backoff_seconds=0.0,
        )
        assert Exporter(Settings(destinations=[dest]), jobs).run_once() == 0
        (item,) = jobs.outbox("1.4")
        assert item.state == "pending"
        assert "refused the presentation context for Segmentation Storage" in item.last_error
        assert "cannot be reached" not in item.last_error
    finally:
        server.shutdown()


def test_a_failure_status_is_recorded_with_its_meaning(tmp_path):
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import SegmentationStorage

    _, files = _results(tmp_path)
    scp = AE(ae_title="FULL")
    scp.add_supported_context(SegmentationStorage)
    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xA700)]
    )
    try:
        jobs = JobStore(tmp_path / "jobs.sqlite")
        path, uid = files["SEG"]
        jobs.enqueue_result(
            series_uid="1.5", kind="SEG", destination="full", path=path, sop_uid=uid
        )
        dest = Destination(
            name="full",
            ae_title="FULL",
            host="127.0.0.1",
            port=port,
            attempts=5,
            retry_backoff_seconds=0.0,
        )
        assert Exporter(Settings(destinations=[dest]), jobs).run_once() == 0
        (item,) = jobs.outbox("1.5")
        assert "status 0xA700 (Refused: Out of Resources)" in item.last_error
    finally:
        server.shutdown()


def _tmpfs(path, size: str):
    import subprocess

    import pytest

    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(
            f"a small tmpfs cannot be mounted here ({r.stderr.strip()}): the "
            "full-disk test needs root or CAP_SYS_ADMIN"
        )
    return path


def _fill(folder) -> None:
    """Fill the file system of ``folder`` to the last byte."""
    import os

    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)


def test_acknowledged_once_even_when_the_database_cannot_record_it(tmp_path):
    """The PACS acknowledges, then the disk holding the database is full: the commit fails,
    the item is never sent again, and it is recorded once there is space, or at the next
    start from the journal."""
    import subprocess

    _, files = _results(tmp_path)
    data = _tmpfs(tmp_path / "data", "4m")
    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        jobs = JobStore(data / "jobs.sqlite")
        for kind, (path, uid) in files.items():
            jobs.enqueue_result(
                series_uid="1.6", kind=kind, destination="pacs", path=path, sop_uid=uid
            )
        dest = Destination(
            name="pacs",
            ae_title=pacs.aet,
            host="127.0.0.1",
            port=pacs.dicom_port,
            attempts=5,
            retry_backoff_seconds=0.0,
        )
        settings = Settings(destinations=[dest])
        exporter = Exporter(settings, jobs)  # the journal is allocated now
        _fill(data)
        assert exporter.run_once() == 3  # acknowledged...
        assert [i.state for i in jobs.outbox("1.6")] == ["pending"] * 3  # ...not committed
        for _ in range(5):  # the export loop goes on: nothing is sent again
            exporter.run_once()
        counts = {m: len(v) for m, v in pacs.instances_by_modality().items()}
        assert counts == {"SEG": 1, "RTSTRUCT": 1, "SR": 1}
        # a restart while the disk is still full: the journal holds the acknowledgements
        jobs.close()
        jobs = JobStore(data / "jobs.sqlite")
        restarted = Exporter(settings, jobs)
        assert restarted.run_once() == 0
        (data / "filler").unlink()  # space again: a pass after the backoff records them
        deadline = time.time() + 10
        while time.time() < deadline and restarted.journal.used:
            restarted.run_once()
            time.sleep(0.1)
        assert [i.state for i in jobs.outbox("1.6")] == ["sent"] * 3
        assert restarted.journal.used == 0
        counts = {m: len(v) for m, v in pacs.instances_by_modality().items()}
        assert counts == {"SEG": 1, "RTSTRUCT": 1, "SR": 1}
        jobs.close()
        restarted.journal.close()
        exporter.journal.close()
    finally:
        pacs.stop()
        subprocess.run(["umount", "-l", str(data)], check=False)
