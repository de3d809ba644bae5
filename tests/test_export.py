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
    files = {"SEG": seg, "RTSTRUCT": build_rtstruct(vol, labels, segs, alg, res),
             "SR": build_sr(seg, vol, labels, segs, alg, res)}
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
    dest = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=pacs.dicom_port,
                       attempts=5, retry_backoff_seconds=0.2, max_backoff_seconds=0.5)
    settings = Settings(node=NodeSettings(data_dir=tmp_path), destinations=[dest])
    jobs = JobStore(tmp_path / "jobs.sqlite")
    series_uid = "1.2.3"
    for kind, (path, uid) in files.items():
        jobs.enqueue_result(series_uid=series_uid, kind=kind, destination="pacs", path=path,
                            sop_uid=uid)
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
    dest = Destination(name="gone", ae_title="NOBODY", host="127.0.0.1", port=free_port(),
                       attempts=2, retry_backoff_seconds=0.0, max_backoff_seconds=0.0)
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
        jobs.enqueue_result(series_uid="1.3", kind="SEG", destination="pacs", path=path,
                            sop_uid=uid)
        wrong = Destination(name="pacs", ae_title="NOT_ORTHANC", host="127.0.0.1",
                            port=pacs.dicom_port, attempts=5, retry_backoff_seconds=0.0)
        assert Exporter(Settings(destinations=[wrong]), jobs).run_once() == 0
        (item,) = jobs.outbox("1.3")
        assert (item.state, item.attempts) == ("pending", 1)
        assert "rejected the association" in item.last_error
        right = Destination(name="pacs", ae_title=pacs.aet, host="127.0.0.1",
                            port=pacs.dicom_port, attempts=5, retry_backoff_seconds=0.0)
        assert Exporter(Settings(destinations=[right]), jobs).run_once() == 1
        assert jobs.outbox("1.3")[0].state == "sent"
        assert {m: len(v) for m, v in pacs.instances_by_modality().items()} == {"SEG": 1}
    finally:
        pacs.stop()
