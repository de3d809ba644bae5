"""The outbox against a real PACS: retries while Orthanc is down, then exactly once."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.common.durable import write_durably
from dicom_node.config import NodeSettings, ResultSettings, Settings
from dicom_node.encode import AlgorithmInfo, build_rtstruct, build_seg, build_sr, segment_info_for
from dicom_node.export.dimse import DicomDestination
from dicom_node.export.sender import Exporter
from dicom_node.export.transport import LABEL_MAP_SEG
from dicom_node.jobs.outputs import WrittenResult, plan_outbox_items
from dicom_node.series.volume import assemble_series
from dicom_node.state import JobDatabase, NewOutboxItem
from dicom_node_testing.synthetic import write_ct_series
from tests.peers import Orthanc, free_port, small_tmpfs, wait_port

pytestmark = pytest.mark.cost(20)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


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


def labelmap_results(tmp_path: Path) -> tuple[object, dict[str, dict[str, str]]]:
    """What the node writes with [results] seg_type = "labelmap" and a destination that may
    refuse it: the Label Map SEG and its SR, the binary SEG and its SR, the RTSTRUCT."""
    hu = np.full((6, 48, 48), -50, np.int16)
    vol = assemble_series(write_ct_series(hu, tmp_path / "ct", spacing=(3.0, 1.0, 1.0)))
    labels = np.zeros(vol.array.shape, np.uint8)
    labels[1:5, 10:30, 12:28] = 1
    segs = [segment_info_for(1, "spleen")]
    alg = AlgorithmInfo(name="test", version="1")
    res = ResultSettings(seg_type="labelmap")
    seg = build_seg(vol, labels, segs, alg, res)
    binary = build_seg(vol, labels, segs, alg, dataclasses.replace(res, seg_type="binary"))
    built = {
        "SEG": seg,
        "RTSTRUCT": build_rtstruct(vol, labels, segs, alg, res),
        "SR": build_sr(seg, vol, labels, segs, alg, res),
        "SEG_BINARY": binary,
        "SR_BINARY": build_sr(binary, vol, labels, segs, alg, res),
    }
    out = {}
    for kind, ds in built.items():
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        path = tmp_path / f"{kind}.dcm"
        write_durably(path, buf.getvalue())
        out[kind] = {"path": str(path), "sop_uid": str(ds.SOPInstanceUID)}
    return vol, out


def written(files: dict[str, dict[str, str]]) -> list[WrittenResult]:
    """The written results of :func:`labelmap_results`, as the job runner lists them."""
    out = []
    for kind in ("SEG", "RTSTRUCT", "SR"):
        binary = files.get(f"{kind}_BINARY")
        out.append(
            WrittenResult(
                kind,
                Path(files[kind]["path"]),
                files[kind]["sop_uid"],
                Path(binary["path"]) if binary else None,
                binary["sop_uid"] if binary else "",
            )
        )
    return out


def queue_labelmap_results(
    jobs: JobDatabase, settings: Settings, files: dict[str, dict[str, str]], series_uid: str
) -> None:
    for item in plan_outbox_items(settings, series_uid, "spleen", written(files)):
        jobs.outbox.enqueue(item)


def _referenced_seg(sr: pydicom.Dataset) -> str:
    """The SOP Instance UID of the SEG an SR's volume measurements name."""
    found = []

    def walk(items):
        for item in items:
            for ref in item.get("ReferencedSOPSequence", []):
                if "ReferencedSegmentNumber" in ref or ref.get("ReferencedSOPClassUID") in (
                    SEGMENTATION_STORAGE,
                    LABEL_MAP_SEG,
                ):
                    found.append(str(ref.ReferencedSOPInstanceUID))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    assert found, "the SR names no SEG"
    assert len(set(found)) == 1
    return found[0]


def test_outbox_retries_until_the_pacs_is_back_then_sends_once(tmp_path):
    vol, files = _results(tmp_path)
    pacs = Orthanc(tmp_path / "orthanc")
    dest = DicomDestination(
        name="pacs",
        ae_title="ORTHANC",
        host="127.0.0.1",
        port=pacs.dicom_port,
        attempts=5,
        retry_backoff_seconds=0.2,
        max_backoff_seconds=0.5,
    )
    settings = Settings(node=NodeSettings(data_dir=tmp_path), destinations=[dest])
    jobs = JobDatabase(tmp_path / "jobs.sqlite")
    series_uid = "1.2.3"
    for kind, (path, uid) in files.items():
        jobs.outbox.enqueue(
            NewOutboxItem(
                series_uid=series_uid, kind=kind, destination="pacs", path=str(path), sop_uid=uid
            )
        )
    exporter = Exporter(settings, jobs)

    # the PACS is down: nothing is acknowledged, every item waits with its reason
    assert exporter.run_once() == 0
    items = jobs.outbox.items(series_uid)
    assert all(i.state == "pending" and i.attempts == 1 for i in items)
    assert all("cannot be reached" in i.last_error for i in items)
    assert all(i.next_attempt > time.time() for i in items)
    assert exporter.run_once() == 0  # not due yet: no attempt made
    assert all(i.attempts == 1 for i in jobs.outbox.items(series_uid))

    pacs.start()
    try:
        deadline = time.time() + 30
        sent = 0
        while sent < 3 and time.time() < deadline:
            sent += exporter.run_once()
            time.sleep(0.2)
        assert sent == 3
        assert all(i.state == "sent" for i in jobs.outbox.items(series_uid))
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
    dest = DicomDestination(
        name="gone",
        ae_title="NOBODY",
        host="127.0.0.1",
        port=free_port(),
        attempts=2,
        retry_backoff_seconds=0.0,
        max_backoff_seconds=0.0,
    )
    jobs = JobDatabase(tmp_path / "jobs.sqlite")
    path, uid = files["SEG"]
    jobs.outbox.enqueue(
        NewOutboxItem(series_uid="1.2", kind="SEG", destination="gone", path=str(path), sop_uid=uid)
    )
    exporter = Exporter(Settings(destinations=[dest]), jobs)
    exporter.run_once()
    exporter.run_once()
    (item,) = jobs.outbox.items("1.2")
    assert (item.state, item.attempts) == ("failed", 2)
    # an operator's retry queues it again
    assert jobs.series.retry("1.2") == 1
    assert jobs.outbox.items("1.2")[0].state == "pending"


def test_a_pacs_that_rejects_the_association_is_retried(tmp_path):
    """Orthanc checks the called AE title: a destination configured with the wrong one is
    rejected; the item waits with that reason and arrives once the destination is fixed."""
    _, files = _results(tmp_path)
    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        jobs = JobDatabase(tmp_path / "jobs.sqlite")
        path, uid = files["SEG"]
        jobs.outbox.enqueue(
            NewOutboxItem(
                series_uid="1.3", kind="SEG", destination="pacs", path=str(path), sop_uid=uid
            )
        )
        wrong = _loopback("pacs", "NOT_ORTHANC", pacs.dicom_port)
        assert Exporter(Settings(destinations=[wrong]), jobs).run_once() == 0
        (item,) = jobs.outbox.items("1.3")
        assert (item.state, item.attempts) == ("pending", 1)
        assert "rejected the association" in item.last_error
        right = _loopback("pacs", pacs.aet, pacs.dicom_port)
        assert Exporter(Settings(destinations=[right]), jobs).run_once() == 1
        assert jobs.outbox.items("1.3")[0].state == "sent"
        assert {m: len(v) for m, v in pacs.instances_by_modality().items()} == {"SEG": 1}
    finally:
        pacs.stop()


def test_a_rejection_followed_at_once_by_a_close_is_recorded_as_the_rejection(tmp_path):
    """A peer that sends its A-ASSOCIATE-RJ and closes the connection straight away: the
    rejection is what the outbox records, whichever pynetdicom sees first."""
    import socket
    import threading

    _, files = _results(tmp_path)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    # rejected-permanent, service-user, called AE title not recognised (PS3.8 9.3.4)
    reject = bytes([0x03, 0, 0, 0, 0, 4, 0, 0x01, 0x01, 0x07])

    def serve() -> None:
        for _ in range(3):
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(65536)  # the A-ASSOCIATE-RQ
            conn.sendall(reject)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        jobs = JobDatabase(tmp_path / "jobs.sqlite")
        path, uid = files["SEG"]
        jobs.outbox.enqueue(
            NewOutboxItem(
                series_uid="1.9", kind="SEG", destination="rj", path=str(path), sop_uid=uid
            )
        )
        exporter = Exporter(Settings(destinations=[_loopback("rj", "ANY", port)]), jobs)
        for _ in range(3):
            assert exporter.run_once() == 0
            (item,) = jobs.outbox.items("1.9")
            assert "rj rejected the association" in item.last_error, item.last_error
            assert "Called AE title not recognised" in item.last_error
    finally:
        server.close()


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
        jobs = JobDatabase(tmp_path / "jobs.sqlite")
        path, uid = files["SEG"]
        jobs.outbox.enqueue(
            NewOutboxItem(
                series_uid="1.4", kind="SEG", destination="ct", path=str(path), sop_uid=uid
            )
        )
        dest = _loopback("ct", "CT_ONLY", port)
        assert Exporter(Settings(destinations=[dest]), jobs).run_once() == 0
        (item,) = jobs.outbox.items("1.4")
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
        jobs = JobDatabase(tmp_path / "jobs.sqlite")
        path, uid = files["SEG"]
        jobs.outbox.enqueue(
            NewOutboxItem(
                series_uid="1.5", kind="SEG", destination="full", path=str(path), sop_uid=uid
            )
        )
        dest = _loopback("full", "FULL", port)
        assert Exporter(Settings(destinations=[dest]), jobs).run_once() == 0
        (item,) = jobs.outbox.items("1.5")
        assert "status 0xA700 (Refused: Out of Resources)" in item.last_error
    finally:
        server.shutdown()


def _loopback(name: str, ae_title: str, port: int) -> DicomDestination:
    """A destination on this host, tried five times without waiting between."""
    return DicomDestination(
        name=name,
        ae_title=ae_title,
        host="127.0.0.1",
        port=port,
        attempts=5,
        retry_backoff_seconds=0.0,
    )


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
    _, files = _results(tmp_path)
    with small_tmpfs(tmp_path / "data", 4) as data:
        pacs = Orthanc(tmp_path / "orthanc").start()
        try:
            jobs = JobDatabase(data / "jobs.sqlite")
            for kind, (path, uid) in files.items():
                jobs.outbox.enqueue(
                    NewOutboxItem(
                        series_uid="1.6", kind=kind, destination="pacs", path=str(path), sop_uid=uid
                    )
                )
            dest = _loopback("pacs", pacs.aet, pacs.dicom_port)
            settings = Settings(destinations=[dest])
            exporter = Exporter(settings, jobs)  # the journal is allocated now
            _fill(data)
            assert exporter.run_once() == 3  # acknowledged...
            assert [i.state for i in jobs.outbox.items("1.6")] == [
                "pending"
            ] * 3  # ...not committed
            for _ in range(5):  # the export loop goes on: nothing is sent again
                exporter.run_once()
            counts = {m: len(v) for m, v in pacs.instances_by_modality().items()}
            assert counts == {"SEG": 1, "RTSTRUCT": 1, "SR": 1}
            # a restart while the disk is still full: the journal holds the acknowledgements
            jobs.close()
            jobs = JobDatabase(data / "jobs.sqlite")
            restarted = Exporter(settings, jobs)
            assert restarted.run_once() == 0
            (data / "filler").unlink()  # space again: a pass after the backoff records them
            deadline = time.time() + 10
            while time.time() < deadline and restarted.journal.used:
                restarted.run_once()
                time.sleep(0.1)
            assert [i.state for i in jobs.outbox.items("1.6")] == ["sent"] * 3
            assert restarted.journal.used == 0
            counts = {m: len(v) for m, v in pacs.instances_by_modality().items()}
            assert counts == {"SEG": 1, "RTSTRUCT": 1, "SR": 1}
            jobs.close()
            restarted.journal.close()
            exporter.journal.close()
        finally:
            pacs.stop()


# -- Label Map SEG where the destination takes it, binary SEG where it does not ----------


def test_each_destination_gets_the_seg_form_it_is_set_for(tmp_path):
    _, files = labelmap_results(tmp_path)
    settings = Settings(
        results=ResultSettings(seg_type="labelmap"),
        destinations=[
            DicomDestination(name="auto", ae_title="A", host="h", port=1),
            DicomDestination(name="lm", ae_title="B", host="h", port=1, seg_type="labelmap"),
            DicomDestination(name="bin", ae_title="C", host="h", port=1, seg_type="binary"),
        ],
    )
    items = {
        (i.destination, i.kind): i for i in plan_outbox_items(settings, "1.9", "m", written(files))
    }
    assert len(items) == 9  # SEG, RTSTRUCT, SR for each; the binary forms are no items
    assert items["auto", "SEG"].path == files["SEG"]["path"]
    assert items["auto", "SEG"].alt_path == files["SEG_BINARY"]["path"]
    assert items["auto", "SR"].alt_sop_uid == files["SR_BINARY"]["sop_uid"]
    assert items["lm", "SEG"].alt_path == "" and items["lm", "SR"].alt_path == ""
    assert items["bin", "SEG"].sop_uid == files["SEG_BINARY"]["sop_uid"]
    assert items["bin", "SR"].sop_uid == files["SR_BINARY"]["sop_uid"]
    assert items["auto", "RTSTRUCT"].alt_path == ""


def _storescp_accepting_label_map(tmp_path: Path) -> tuple[subprocess.Popen, int, Path]:
    """DCMTK 3.6.7's storescp does not know the Label Map class: a -xf profile names it,
    with the RLE Lossless syntax the node writes it in, beside the usual storage classes."""
    cfg = tmp_path / "storescp.cfg"
    cfg.write_text(
        """[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = OppositeEndianExplicit
TransferSyntax3 = LittleEndianImplicit
[RLE]
TransferSyntax1 = RLELossless
[[PresentationContexts]]
[Results]
PresentationContext1 = 1.2.840.10008.5.1.4.1.1.66.7\\RLE
PresentationContext2 = 1.2.840.10008.5.1.4.1.1.66.4\\Uncompressed
PresentationContext3 = RTStructureSetStorage\\Uncompressed
PresentationContext4 = Comprehensive3DSRStorage\\Uncompressed
[[Profiles]]
[Results]
PresentationContexts = Results
"""
    )
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "-aet", "LM_SCP", "-xf", str(cfg), "Results", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    wait_port(port, 30, proc)
    return proc, port, out


def test_orthanc_gets_the_binary_seg_a_label_map_peer_the_label_map(tmp_path, dcmtk_tools):
    """One run, two real peers: Orthanc 1.10 refuses the Label Map class in negotiation and
    receives the binary SEG, with the SR that names it; storescp, set to accept it,
    receives the label map. The outbox records which form each took."""
    _, files = labelmap_results(tmp_path)
    pacs = Orthanc(tmp_path / "orthanc").start()
    scp, scp_port, received = _storescp_accepting_label_map(tmp_path)
    try:
        settings = Settings(
            node=NodeSettings(data_dir=tmp_path),
            results=ResultSettings(seg_type="labelmap"),
            destinations=[
                DicomDestination(name="orthanc", ae_title=pacs.aet, host="127.0.0.1",
                            port=pacs.dicom_port, retry_backoff_seconds=0.0),
                DicomDestination(name="lm", ae_title="LM_SCP", host="127.0.0.1", port=scp_port,
                            retry_backoff_seconds=0.0),
            ],
        )  # fmt: skip
        jobs = JobDatabase(tmp_path / "jobs.sqlite")
        queue_labelmap_results(jobs, settings, files, "1.10")
        exporter = Exporter(settings, jobs)
        assert exporter.run_once() == 6
        assert exporter.run_once() == 0
        outbox = {(i.destination, i.kind): i for i in jobs.outbox.items("1.10")}
        assert {k: (i.state, i.sent_as) for k, i in outbox.items()} == {
            ("orthanc", "SEG"): ("sent", "binary"),
            ("orthanc", "RTSTRUCT"): ("sent", ""),
            ("orthanc", "SR"): ("sent", "binary"),
            ("lm", "SEG"): ("sent", "labelmap"),
            ("lm", "RTSTRUCT"): ("sent", ""),
            ("lm", "SR"): ("sent", "labelmap"),
        }
        # the row names what the destination has: a later run supersedes that object
        assert outbox["orthanc", "SEG"].sop_uid == files["SEG_BINARY"]["sop_uid"]
        assert outbox["orthanc", "SEG"].alt_sop_uid == files["SEG"]["sop_uid"]
        assert outbox["lm", "SEG"].sop_uid == files["SEG"]["sop_uid"]

        stored = {}
        for iid in pacs.rest("/instances"):
            ds = pydicom.dcmread(io.BytesIO(pacs.file(iid)))
            stored[str(ds.Modality)] = ds
        assert sorted(stored) == ["RTSTRUCT", "SEG", "SR"]
        assert stored["SEG"].SOPClassUID == SEGMENTATION_STORAGE
        assert stored["SEG"].SegmentationType == "BINARY"
        assert str(stored["SEG"].SOPInstanceUID) == files["SEG_BINARY"]["sop_uid"]
        assert _referenced_seg(stored["SR"]) == files["SEG_BINARY"]["sop_uid"]

        got = {}
        for f in received.iterdir():
            ds = pydicom.dcmread(f)
            got[str(ds.Modality)] = ds
        assert sorted(got) == ["RTSTRUCT", "SEG", "SR"]
        assert got["SEG"].SOPClassUID == LABEL_MAP_SEG
        assert str(got["SEG"].SOPInstanceUID) == files["SEG"]["sop_uid"]
        assert _referenced_seg(got["SR"]) == files["SEG"]["sop_uid"]
    finally:
        pacs.stop()
        scp.terminate()
        scp.wait(10)


def test_a_store_status_refusing_the_label_map_class_falls_back_and_is_remembered(tmp_path):
    """A peer that negotiates the Label Map class but answers 0x0122 (SOP Class Not
    Supported) when it arrives: the binary SEG goes in the same association, and later
    series go binary at once."""
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (
        Comprehensive3DSRStorage,
        RTStructureSetStorage,
        SegmentationStorage,
    )

    _, files = labelmap_results(tmp_path)
    offered: list[str] = []

    def on_store(event):
        offered.append(str(event.request.AffectedSOPClassUID))
        return 0x0122 if event.request.AffectedSOPClassUID == LABEL_MAP_SEG else 0x0000

    scp = AE(ae_title="PICKY")
    scp.add_supported_context(LABEL_MAP_SEG, [RLELossless, ExplicitVRLittleEndian])
    for cls in (SegmentationStorage, RTStructureSetStorage, Comprehensive3DSRStorage):
        scp.add_supported_context(cls, ExplicitVRLittleEndian)
    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        settings = Settings(
            results=ResultSettings(seg_type="labelmap"),
            destinations=[DicomDestination(name="picky", ae_title="PICKY", host="127.0.0.1",
                                      port=port, retry_backoff_seconds=0.0)],
        )  # fmt: skip
        jobs = JobDatabase(tmp_path / "jobs.sqlite")
        queue_labelmap_results(jobs, settings, files, "1.11")
        exporter = Exporter(settings, jobs)
        assert exporter.run_once() == 3
        assert offered.count(LABEL_MAP_SEG) == 1
        assert offered.count(SEGMENTATION_STORAGE) == 1
        sent = {i.kind: i.sent_as for i in jobs.outbox.items("1.11")}
        assert sent == {"SEG": "binary", "RTSTRUCT": "", "SR": "binary"}
        # the next series: no label map offered again to this destination
        _, more = labelmap_results(tmp_path / "second")
        queue_labelmap_results(jobs, settings, more, "1.12")
        assert exporter.run_once() == 3
        assert offered.count(LABEL_MAP_SEG) == 1
        assert {i.kind: i.sent_as for i in jobs.outbox.items("1.12")}["SEG"] == "binary"
    finally:
        server.shutdown()


def test_an_sr_follows_the_form_its_seg_already_took(tmp_path):
    """The SEG went as binary in an earlier attempt, the SR failed then: when the SR is
    retried it is the SR naming the binary SEG, whatever the peer now negotiates."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Comprehensive3DSRStorage

    _, files = labelmap_results(tmp_path)
    scp = AE(ae_title="SR_ONLY")
    scp.add_supported_context(Comprehensive3DSRStorage, ExplicitVRLittleEndian)
    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0)]
    )
    try:
        settings = Settings(
            results=ResultSettings(seg_type="labelmap"),
            destinations=[DicomDestination(name="p", ae_title="SR_ONLY", host="127.0.0.1",
                                      port=port, retry_backoff_seconds=0.0)],
        )  # fmt: skip
        jobs = JobDatabase(tmp_path / "jobs.sqlite")
        for item in plan_outbox_items(settings, "1.13", "spleen", written(files)):
            if item.kind == "SR":
                jobs.outbox.enqueue(item)
            elif item.kind == "SEG":  # sent as binary before
                jobs.outbox.enqueue(item)
                (seg,) = jobs.outbox.items("1.13")
                jobs.outbox.mark_sent(seg.id, alternative=True)
        assert Exporter(settings, jobs).run_once() == 1
        sr = next(i for i in jobs.outbox.items("1.13") if i.kind == "SR")
        assert (sr.state, sr.sent_as, sr.sop_uid) == (
            "sent",
            "binary",
            files["SR_BINARY"]["sop_uid"],
        )
    finally:
        server.shutdown()
