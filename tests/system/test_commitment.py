"""Storage Commitment Push Model SCU (:mod:`dicom_node.export.commitment`) and the report
handler (:mod:`dicom_node.intake.commitment_reports`) against real peers.

Orthanc 1.10 is the Storage Commitment SCP: it answers the N-ACTION at once and reports
later, always on a new association to the AE title that asked, which the test receives
as the node does: an AE supporting the context of :func:`add_report_context` with the
handler of :func:`report_handler`. A report on the same association comes from a
pynetdicom SCP written here (Orthanc never does that); DCMTK's ``storescp``, which has no
storage commitment, shows a PACS that does not offer it. The node's whole round (a failure
sent again, a restart between request and report) is in ``test_commitment_node.py``.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from dicom_node.export.commitment import (
    STORAGE_COMMITMENT_INSTANCE,
    CommitmentRefused,
    CommitmentUnreachable,
    action_information,
    request_commitment,
)
from dicom_node.export.dimse import DicomDestination
from dicom_node.export.push import push_paths
from dicom_node.intake.commitment_reports import (
    EVENT_COMPLETE_FAILURES,
    EVENT_SUCCESSFUL,
    add_report_context,
    report_handler,
)
from dicom_node.state.commitments import CommitmentReport, Failure, Reference
from dicom_node_testing.synthetic import write_ct_series
from tests.conftest import require
from tests.peers import Orthanc, StoreSCP, free_port

pytestmark = pytest.mark.cost(6)

#: The AE title that asks for commitment and receives the reports (the node's own).
NODE_AE = "NODE_SCU"


class Reports:
    """The node's side for reports on new associations: an AE listening with the
    context and handler of ``dicom_node.intake.commitment_reports``, each report put in a
    queue."""

    def __init__(self, ae_title: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.queue: queue.Queue[CommitmentReport] = queue.Queue()
        self.ae = AE(ae_title=ae_title)
        add_report_context(self.ae)
        self.fail_next = False
        self.server = None
        #: (acts as SCU, acts as SCP) on each accepted association, for the report context
        self.roles: list[tuple[bool, bool]] = []

    def record(self, report: CommitmentReport) -> bool:
        if self.fail_next:  # the job database refused the write
            self.fail_next = False
            raise OSError("database is locked")
        self.queue.put(report)
        return True

    def start(self) -> Reports:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_N_EVENT_REPORT, report_handler(self.record)),
                (evt.EVT_ACCEPTED, self.accepted),
            ],
        )
        return self

    def accepted(self, event) -> None:
        for cx in event.assoc.accepted_contexts:
            self.roles.append((cx.as_scu, cx.as_scp))

    def next(self, timeout: float = 20.0) -> CommitmentReport:
        return self.queue.get(timeout=timeout)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture(scope="module")
def reports() -> Reports:
    receiver = Reports(NODE_AE).start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, reports) -> Orthanc:
    require("Orthanc")
    orthanc = Orthanc(
        tmp_path_factory.mktemp("orthanc-commitment"),
        modalities={
            "node": [NODE_AE, "127.0.0.1", reports.port],
        },
    ).start()
    yield orthanc
    orthanc.stop()


@pytest.fixture
def held(pacs, tmp_path) -> list[Reference]:
    """A fresh 4-slice series stored in the PACS: the results it holds."""
    files = write_ct_series(np.zeros((4, 16, 16), np.int16), tmp_path / "held")
    report = push_paths(files, pacs.aet, "127.0.0.1", pacs.dicom_port, progress=False)
    assert report.sent == 4
    return [_reference(f) for f in files]


def _reference(path: Path) -> Reference:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return Reference(str(ds.SOPClassUID), str(ds.SOPInstanceUID))


def _destination(pacs: Orthanc) -> DicomDestination:
    return DicomDestination(name="pacs", ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port)


def _missing() -> Reference:
    return Reference(CTImageStorage, generate_uid())


def test_orthanc_commits_what_it_holds_and_names_what_it_does_not(pacs, reports, held):
    missing = _missing()
    request = request_commitment(
        _destination(pacs), [*held, missing], calling_ae=NODE_AE, wait_for_report=0.2
    )
    assert request.report is None  # Orthanc reports on a new association
    report = reports.next()
    assert report.transaction_uid == request.transaction_uid
    assert (report.reporter, report.same_association) == ("ORTHANC", False)
    assert reports.roles[-1] == (True, False)  # the node is the SCU: Orthanc proposed SCP
    assert sorted(report.committed, key=str) == sorted(held, key=str)
    assert report.failed == (Failure(missing, 0x0112),)
    assert report.describe() == (
        f"storage commitment {request.transaction_uid} by ORTHANC: 4 committed, 1 not: "
        f"{missing.sop_instance_uid} 0x0112 No such object instance (the PACS does not hold it)"
    )


def test_orthanc_reports_every_instance_committed(pacs, reports, held):
    request = request_commitment(_destination(pacs), held, calling_ae=NODE_AE)
    report = reports.next()
    assert report.transaction_uid == request.transaction_uid
    assert report.all_committed and len(report.committed) == 4


class SameAssociationSCP:
    """A Storage Commitment SCP (pynetdicom) that reports on the association that asked,
    right after answering its N-ACTION with ``status``; it holds the instances in
    ``holds``."""

    def __init__(self, holds: set[str], status: int = 0x0000) -> None:
        self.holds, self.status = holds, status
        self.port = free_port()
        self.ae = AE(ae_title="SAME_ASSOC")
        self.ae.add_supported_context(StorageCommitmentPushModel)
        self.answers: list[int] = []
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_N_ACTION, self.action)]
        )

    def action(self, event) -> tuple[int, None]:
        info = event.action_information
        if self.status == 0x0000:
            threading.Thread(target=self.report, args=(event.assoc, info), daemon=True).start()
        return self.status, None

    def report(self, assoc, info: Dataset) -> None:
        time.sleep(0.1)  # after the N-ACTION response
        out = Dataset()
        out.TransactionUID = info.TransactionUID
        out.ReferencedSOPSequence = [
            i for i in info.ReferencedSOPSequence if i.ReferencedSOPInstanceUID in self.holds
        ]
        failed = [
            i for i in info.ReferencedSOPSequence if i.ReferencedSOPInstanceUID not in self.holds
        ]
        for item in failed:
            item.FailureReason = 0x0112
        if failed:
            out.FailedSOPSequence = failed
        kind = EVENT_COMPLETE_FAILURES if failed else EVENT_SUCCESSFUL
        status, _ = assoc.send_n_event_report(
            out, kind, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
        )
        self.answers.append(int(status.Status) if status else -1)

    def stop(self) -> None:
        self.server.shutdown()


def test_a_report_on_the_same_association_is_returned_and_answered():
    refs = [Reference(CTImageStorage, generate_uid()) for _ in range(3)]
    scp = SameAssociationSCP({refs[0].sop_instance_uid, refs[1].sop_instance_uid})
    try:
        dest = DicomDestination(name="peer", ae_title="SAME_ASSOC", host="127.0.0.1", port=scp.port)
        request = request_commitment(dest, refs, calling_ae=NODE_AE, wait_for_report=10)
        report = request.report
        assert report is not None and report.same_association
        assert report.transaction_uid == request.transaction_uid
        assert report.reporter == "SAME_ASSOC"
        assert report.committed == tuple(refs[:2])
        assert report.failed == (Failure(refs[2], 0x0112),)
        assert scp.answers == [0x0000]
    finally:
        scp.stop()


def test_a_refused_request_says_the_status():
    scp = SameAssociationSCP(set(), status=0x0213)
    try:
        dest = DicomDestination(name="peer", ae_title="SAME_ASSOC", host="127.0.0.1", port=scp.port)
        with pytest.raises(CommitmentRefused) as caught:
            request_commitment(dest, [_missing()], calling_ae=NODE_AE)
        assert caught.value.status == 0x0213
        assert str(caught.value) == (
            f"peer (SAME_ASSOC at 127.0.0.1:{scp.port}) refused the storage commitment "
            "request with status 0x0213 (Resource Limitation)"
        )
    finally:
        scp.stop()


def test_a_pacs_without_storage_commitment_says_so(tmp_path):
    require("storescp")
    scp = StoreSCP(tmp_path, aet="STORE_ONLY").start()
    try:
        dest = DicomDestination(
            name="archive", ae_title="STORE_ONLY", host="127.0.0.1", port=scp.port
        )
        with pytest.raises(CommitmentRefused, match="does not offer Storage Commitment Push"):
            request_commitment(dest, [_missing()], calling_ae=NODE_AE)
    finally:
        scp.stop()
    port = free_port()
    dest = DicomDestination(name="gone", ae_title="X", host="127.0.0.1", port=port)
    with pytest.raises(CommitmentUnreachable, match="cannot be reached for storage commitment"):
        request_commitment(dest, [_missing()], calling_ae=NODE_AE, timeout=5)


def _send_report(port: int, event_type: int, info: Dataset) -> int:
    """Send one N-EVENT-REPORT as a PACS does (a new association, the SCP role)."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(StorageCommitmentPushModel)
    from pynetdicom import build_role

    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title=NODE_AE,
        ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
    )
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_event_report(
            info, event_type, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
        )
        return int(status.Status)
    finally:
        assoc.release()


def test_the_report_handler_answers_what_it_could_not_take(reports):
    """Success only once recorded; a failure status a PACS can act on otherwise."""
    good = action_information(generate_uid(), [_missing()])
    assert _send_report(reports.port, EVENT_SUCCESSFUL, good) == 0x0000
    assert reports.next().transaction_uid == good.TransactionUID
    assert _send_report(reports.port, 3, good) == 0x0113  # No Such Event Type
    no_uid = Dataset()
    no_uid.ReferencedSOPSequence = good.ReferencedSOPSequence
    assert _send_report(reports.port, EVENT_SUCCESSFUL, no_uid) == 0x0120  # Missing Attribute
    reports.fail_next = True
    assert _send_report(reports.port, EVENT_SUCCESSFUL, good) == 0x0110  # not recorded
    assert reports.queue.empty()
