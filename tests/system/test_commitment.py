"""Storage Commitment Push Model SCU (``dicom_node.commitment``) against real peers.

Orthanc 1.10 is the Storage Commitment SCP: it answers the N-ACTION at once and reports
later, always on a new association to the AE title that asked, which the test receives
as the node will: an AE supporting the context of :func:`add_report_context` with the
handler of :func:`report_handler`. A report on the same association comes from a
pynetdicom SCP written here (Orthanc never does that); DCMTK's ``storescp``, which has no
storage commitment, shows a PACS that does not offer it. The state machine
(:func:`plan`, :func:`apply_report`) is driven against Orthanc through a failure, a
re-send and a commitment, and through a node that was down when the report came.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from dicom_node.commitment import (
    EVENT_COMPLETE_FAILURES,
    EVENT_SUCCESSFUL,
    STORAGE_COMMITMENT_INSTANCE,
    CommitmentPolicy,
    CommitmentRefused,
    CommitmentReport,
    CommitmentUnreachable,
    CommitState,
    Failure,
    Reference,
    Tracked,
    action_information,
    add_report_context,
    apply_report,
    plan,
    report_handler,
    request_commitment,
)
from dicom_node.config import Destination
from dicom_node.push import push_paths
from dicom_node.synthetic import write_ct_series
from tests.conftest import require
from tests.peers import Orthanc, StoreSCP, free_port

#: The AE title that asks for commitment and receives the reports (the node's own).
NODE_AE = "NODE_SCU"
#: An AE title Orthanc reports to at a port where nothing listens until a test starts it.
RESTARTED_AE = "NODE_RESTARTED"


class Reports:
    """The node's side for reports on new associations: an AE listening with the
    context and handler of ``dicom_node.commitment``, each report put in a queue."""

    def __init__(self, ae_title: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.queue: queue.Queue[CommitmentReport] = queue.Queue()
        self.ae = AE(ae_title=ae_title)
        add_report_context(self.ae)
        self.fail_next = False
        self.server = None
        #: (acts as SCU, acts as SCP) on each accepted association, for the report context
        self.roles: list[tuple[bool, bool]] = []

    def record(self, report: CommitmentReport) -> None:
        if self.fail_next:  # the job database refused the write
            self.fail_next = False
            raise OSError("database is locked")
        self.queue.put(report)

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
def restarted_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, reports, restarted_port) -> Orthanc:
    require("Orthanc")
    orthanc = Orthanc(
        tmp_path_factory.mktemp("orthanc-commitment"),
        modalities={
            "node": [NODE_AE, "127.0.0.1", reports.port],
            "restarted": [RESTARTED_AE, "127.0.0.1", restarted_port],
        },
        count_deliveries=True,
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


def _destination(pacs: Orthanc) -> Destination:
    return Destination(name="pacs", ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port)


def _missing() -> Reference:
    return Reference(CTImageStorage, generate_uid())


POLICY = CommitmentPolicy(report_timeout=60, max_requests=2, resend_wait=30, max_sends=3)


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


def test_a_failure_is_sent_again_then_committed(pacs, reports, tmp_path):
    """The state machine against Orthanc: a result the PACS does not hold fails, is sent
    again after the resend wait, and is committed at the second request."""
    (path,) = write_ct_series(np.zeros((1, 16, 16), np.int16), tmp_path / "result")
    ref = _reference(path)
    dest = _destination(pacs)
    item = Tracked(1, "pacs", ref, CommitState.OWED, since=0.0)
    now = 1000.0

    def ask(item: Tracked) -> Tracked:
        nonlocal now
        due = plan([item], lambda _: POLICY, now)
        (asked,) = due.request["pacs"]
        request_commitment(
            dest, [asked.reference], calling_ae=NODE_AE, transaction_uid=asked.transaction_uid
        )
        report = reports.next()
        assert report.transaction_uid == asked.transaction_uid
        (changed,) = apply_report([asked], report)
        return changed

    failed = ask(item)  # never stored: the PACS does not hold it
    assert failed.state == CommitState.FAILED
    assert failed.reason == "0x0112 No such object instance (the PACS does not hold it)"
    now = failed.since + POLICY.resend_wait - 1  # the time the report came
    assert plan([failed], lambda _: POLICY, now).empty  # not yet
    now += 1
    (again,) = plan([failed], lambda _: POLICY, now).resend
    assert push_paths([path], pacs.aet, "127.0.0.1", pacs.dicom_port, progress=False).sent == 1
    resent = replace(again, state=CommitState.OWED, since=now, sends=2, requests=0)
    committed = ask(resent)
    assert committed.state == CommitState.COMMITTED
    assert pacs.deliveries()[ref.sop_instance_uid] == 1


def test_a_node_down_when_the_report_came_asks_again_once_and_sends_nothing(
    pacs, held, restarted_port
):
    """The node stops between N-ACTION and N-EVENT-REPORT: Orthanc's report finds
    nothing listening and is lost. At start the recorded transaction is asked again, once,
    and committed; no result is sent twice."""
    dest = _destination(pacs)
    before = dict(pacs.deliveries())
    items = [Tracked(i, "pacs", ref, CommitState.OWED, since=0.0) for i, ref in enumerate(held)]
    first = plan(items, lambda _: POLICY, now=100.0).request["pacs"]
    assert len({i.transaction_uid for i in first}) == 1  # one N-ACTION for the batch
    request_commitment(
        dest,
        [i.reference for i in first],
        calling_ae=RESTARTED_AE,
        transaction_uid=first[0].transaction_uid,
    )
    _wait_for_report_job(pacs, first[0].transaction_uid, "Failure")  # nothing listened

    started_at = 200.0  # the node starts again, well within the report timeout
    receiver = Reports(RESTARTED_AE, restarted_port).start()
    try:
        due = plan(first, lambda _: POLICY, now=201.0, started_at=started_at)
        assert not due.resend and not due.give_up
        second = due.request["pacs"]
        assert {i.requests for i in second} == {2}
        assert second[0].transaction_uid != first[0].transaction_uid
        request_commitment(
            dest,
            [i.reference for i in second],
            calling_ae=RESTARTED_AE,
            transaction_uid=second[0].transaction_uid,
        )
        report = receiver.next()
        assert report.transaction_uid == second[0].transaction_uid
        changed = apply_report(second, report)
        assert [i.state for i in changed] == [CommitState.COMMITTED] * 4
        assert apply_report(changed, report) == []  # a report applied twice changes nothing
        with pytest.raises(queue.Empty):  # the first transaction's report never comes
            receiver.next(timeout=1.0)
    finally:
        receiver.stop()
    assert pacs.deliveries() == before  # nothing was sent again


def _wait_for_report_job(pacs: Orthanc, transaction_uid: str, state: str) -> None:
    """Wait until Orthanc's job reporting ``transaction_uid`` is in ``state``."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for job in pacs.rest("/jobs?expand"):
            if job.get("Content", {}).get("TransactionUid") == transaction_uid:
                if job["State"] == state:
                    return
        time.sleep(0.1)
    raise TimeoutError(f"Orthanc's report of {transaction_uid} did not reach {state}")


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
        dest = Destination(name="peer", ae_title="SAME_ASSOC", host="127.0.0.1", port=scp.port)
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
        dest = Destination(name="peer", ae_title="SAME_ASSOC", host="127.0.0.1", port=scp.port)
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
        dest = Destination(name="archive", ae_title="STORE_ONLY", host="127.0.0.1", port=scp.port)
        with pytest.raises(CommitmentUnreachable, match="does not offer Storage Commitment Push"):
            request_commitment(dest, [_missing()], calling_ae=NODE_AE)
    finally:
        scp.stop()
    port = free_port()
    dest = Destination(name="gone", ae_title="X", host="127.0.0.1", port=port)
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


# -- the state machine alone --------------------------------------------------------------
def _item(state: CommitState, since: float = 0.0, **kw) -> Tracked:
    return Tracked(
        kw.pop("item_id", 1),
        kw.pop("destination", "pacs"),
        kw.pop("ref", _missing()),
        state,
        since,
        **kw,
    )


def test_plan_asks_each_destination_once_for_what_it_owes():
    items = [
        _item(CommitState.OWED, item_id=1),
        _item(CommitState.OWED, item_id=2),
        _item(CommitState.OWED, item_id=3, destination="other"),
        _item(CommitState.COMMITTED, item_id=4),
    ]
    due = plan(items, lambda _: POLICY, now=10.0)
    assert sorted(due.request) == ["other", "pacs"]
    assert [i.item_id for i in due.request["pacs"]] == [1, 2]
    assert len({i.transaction_uid for i in due.request["pacs"]}) == 1
    assert due.request["pacs"][0].transaction_uid != due.request["other"][0].transaction_uid
    assert all(i.state == CommitState.REQUESTED and i.since == 10.0 for i in due.request["pacs"])


def test_plan_waits_for_the_report_then_asks_again_then_gives_up():
    asked = _item(CommitState.REQUESTED, since=100.0, requests=1, transaction_uid="1.2.3")
    assert plan([asked], lambda _: POLICY, now=159.0).empty
    (again,) = plan([asked], lambda _: POLICY, now=160.0).request["pacs"]
    assert (again.requests, again.state) == (2, CommitState.REQUESTED)
    assert again.transaction_uid != "1.2.3"
    (gave_up,) = plan([replace(again, since=160.0)], lambda _: POLICY, now=220.0).give_up
    assert gave_up.state == CommitState.GAVE_UP
    assert gave_up.reason.startswith("no storage commitment report from pacs after 2 requests")


def test_plan_resends_failures_within_the_attempts():
    failed = _item(CommitState.FAILED, since=0.0, sends=2, reason="0x0213 Resource limitation")
    assert plan([failed], lambda _: POLICY, now=29.0).empty
    assert plan([failed], lambda _: POLICY, now=30.0).resend == [failed]
    (gave_up,) = plan([replace(failed, sends=3)], lambda _: POLICY, now=30.0).give_up
    assert gave_up.reason == "not committed by pacs after 3 sends: 0x0213 Resource limitation"


def test_apply_report_keeps_late_commitments_and_ignores_stale_failures():
    ref = _missing()
    current = _item(CommitState.REQUESTED, ref=ref, transaction_uid="2.2", requests=2)
    late_ok = CommitmentReport("1.1", committed=(ref,))
    late_failed = CommitmentReport("1.1", failed=(Failure(ref, 0x0110),))
    (committed,) = apply_report([current], late_ok)
    assert committed.state == CommitState.COMMITTED
    assert apply_report([current], late_failed) == []
    silent = CommitmentReport("2.2")
    (failed,) = apply_report([current], silent)
    assert (failed.state, failed.reason) == (
        CommitState.FAILED,
        "the PACS's report did not name it",
    )
    assert apply_report([committed], late_failed) == []
