"""Storage commitment (PS3.4 Annex J), a step of the export after acknowledgement.

A C-STORE response says that a PACS received an object, not that it keeps it. For a C-STORE
destination with ``storage_commitment = true`` the node asks, once results are acknowledged,
that the PACS commit to them: an N-ACTION (Action Type 1) with a Transaction UID and the
Referenced SOP Sequence (:func:`request_commitment`). The PACS answers later with an
N-EVENT-REPORT naming the instances it committed and those it did not, each with a Failure
Reason: on the same association when it answers at once (the association is held
:data:`SAME_ASSOCIATION_WAIT` seconds for it), otherwise on a new association it opens to the
node's SCP (:mod:`dicom_node.intake.commitment_reports`).

What is asked, sent again or given up is decided by :func:`plan`, a pure function of the
items' recorded states (:mod:`dicom_node.state.commitments`), so it is decided the same way
before and after a restart; :class:`CommitmentStep` runs it beside the exporter and records
each decision before acting on it::

    (C-STORE acknowledged) -> owed -> requested -> committed
                                        |  \\-> failed --(commitment_resend_seconds)--> sent
                                        |       again (owed once acknowledged), within the
                                        |       destination's attempts; then failed for good
                                        \\-(no report in commitment_report_timeout_seconds,
                                          or the node restarted since)-> requested again, up
                                          to commitment_requests times; then failed

A request is recorded (its Transaction UID and items) before its N-ACTION is sent: a node
stopped between the N-ACTION and the report finds it at start and asks again, once, rather
than forgetting it or sending the objects twice; a report that arrives late for a
transaction asked again is still read (a commitment is a fact about the PACS), its failures
only while it is the items' current transaction.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import N_EVENT_REPORT_RSP
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import StorageCommitmentPushModelInstance
from pynetdicom.status import STORAGE_COMMITMENT_SERVICE_CLASS_STATUS

from dicom_node.common.associations import TUNE_REQUESTED
from dicom_node.common.backoff import backoff
from dicom_node.common.tls import client_tls_args
from dicom_node.common.worker import Worker
from dicom_node.config import Settings, TLSSettings
from dicom_node.export.dimse import DicomDestination
from dicom_node.intake.commitment_reports import (
    REPORT_TRANSFER_SYNTAXES,
    STORAGE_COMMITMENT,
    report_handler,
)
from dicom_node.state import CommitmentState, JobDatabase
from dicom_node.state.commitments import CommitmentReport, Reference, Tracked

__all__ = [
    "ACTION_REQUEST_COMMITMENT",
    "SAME_ASSOCIATION_WAIT",
    "STORAGE_COMMITMENT_INSTANCE",
    "CommitmentError",
    "CommitmentPolicy",
    "CommitmentRefused",
    "CommitmentRequest",
    "CommitmentStep",
    "CommitmentUnreachable",
    "Plan",
    "action_information",
    "plan",
    "request_commitment",
]

log = logging.getLogger("dicom_node.export.commitment")

#: The well-known SOP Instance of the Storage Commitment Push Model (PS3.4 J.3.5).
STORAGE_COMMITMENT_INSTANCE = StorageCommitmentPushModelInstance
#: Action Type ID of "Request Storage Commitment" (PS3.4 J.3.2.1.1).
ACTION_REQUEST_COMMITMENT = 1
#: Seconds an association that carried an N-ACTION is held for a report on it.
SAME_ASSOCIATION_WAIT = 2.0


def action_information(transaction_uid: str, references: Sequence[Reference]) -> Dataset:
    """The N-ACTION's Action Information: Transaction UID and Referenced SOP Sequence."""
    if not references:
        raise ValueError("a storage commitment request names at least one instance")
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for ref in references:
        item = Dataset()
        item.ReferencedSOPClassUID = ref.sop_class_uid
        item.ReferencedSOPInstanceUID = ref.sop_instance_uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


# -- the N-ACTION -------------------------------------------------------------------------
class CommitmentError(RuntimeError):
    """A storage commitment request could not be made; the message says why."""


class CommitmentUnreachable(CommitmentError):
    """No association: the PACS cannot be reached or rejected it."""


class CommitmentRefused(CommitmentError):
    """The PACS refused the request: the SOP class in negotiation (``status`` None), or
    the N-ACTION with a failure status, or it did not answer it."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class CommitmentRequest:
    """An N-ACTION the PACS accepted, and its report when it came on the same association."""

    destination: str
    transaction_uid: str
    references: tuple[Reference, ...]
    requested_at: float
    report: CommitmentReport | None = None


def request_commitment(
    destination: DicomDestination,
    references: Sequence[Reference],
    *,
    calling_ae: str,
    transaction_uid: str = "",
    tls: TLSSettings | None = None,
    timeout: float = 30.0,
    wait_for_report: float = 0.0,
    on_report: Callable[[CommitmentReport], object] | None = None,
    reported: Callable[[], bool] = lambda: False,
) -> CommitmentRequest:
    """Ask ``destination`` to commit to ``references`` (N-ACTION, Action Type 1).

    ``transaction_uid`` is the caller's when it recorded the transaction first (it
    should: see the module); a new one otherwise. After the PACS accepts, the association
    is held up to ``wait_for_report`` seconds for a report on it; one that comes is in the
    result (and passed to ``on_report``, which records it, before it is answered);
    otherwise the report comes on a new association, and the wait ends as soon as
    ``reported()`` says it came. ``calling_ae`` must be the AE title the PACS reports to
    (the node's own).

    Raises :class:`CommitmentUnreachable` or :class:`CommitmentRefused`, each with one
    sentence.
    """
    transaction_uid = transaction_uid or generate_uid()
    refs = tuple(references)
    info = action_information(transaction_uid, refs)
    where = f"{destination.name} ({destination.ae_title} at {destination.host}:{destination.port})"
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(STORAGE_COMMITMENT, list(REPORT_TRANSFER_SYNTAXES))
    reports: list[CommitmentReport] = []
    arrived = threading.Event()
    answered = threading.Event()  # the node's answer to the report went out

    def sent(event: evt.Event) -> None:
        if isinstance(event.message, N_EVENT_REPORT_RSP):
            answered.set()

    def keep(report: CommitmentReport) -> object:
        recorded = on_report(report) if on_report is not None else True
        if report.transaction_uid == transaction_uid:
            reports.append(report)
            arrived.set()
        return recorded

    rejections: list[A_ASSOCIATE_RJ] = []

    def keep_rejection(event: evt.Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            rejections.append(event.pdu)

    not_offered = (
        f"{where} does not offer Storage Commitment Push Model: turn storage_commitment "
        "off for this destination, or enable it on the PACS"
    )
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=client_tls_args(tls or TLSSettings(), destination.host, destination.tls),
        evt_handlers=[
            (evt.EVT_PDU_RECV, keep_rejection),
            (evt.EVT_N_EVENT_REPORT, report_handler(keep)),
            (evt.EVT_DIMSE_SENT, sent),
            TUNE_REQUESTED,
        ],
    )
    if not assoc.is_established:
        if rejections:
            rj = rejections[0]
            raise CommitmentUnreachable(
                f"{where} rejected the storage commitment association ({rj.result_str}, "
                f"{rj.source_str}: {rj.reason_str})"
            )
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            raise CommitmentRefused(not_offered)
        raise CommitmentUnreachable(f"{where} cannot be reached for storage commitment")
    requested_at = time.time()
    try:
        if not assoc.accepted_contexts:
            raise CommitmentRefused(not_offered)
        status, _reply = assoc.send_n_action(
            info, ACTION_REQUEST_COMMITMENT, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
        )
        if not status or "Status" not in status:
            raise CommitmentRefused(
                f"{where} did not answer the storage commitment request within {timeout:g} s"
            )
        code = int(status.Status)
        if code != 0x0000:
            meaning = STORAGE_COMMITMENT_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))[1]
            comment = str(status.get("ErrorComment", "") or "")
            raise CommitmentRefused(
                f"{where} refused the storage commitment request with status 0x{code:04X} "
                f"({meaning}{': ' + comment if comment else ''})",
                code,
            )
        deadline = time.monotonic() + wait_for_report
        while time.monotonic() < deadline and not arrived.wait(0.05) and not reported():
            pass
        if arrived.is_set():  # released only once the PACS has the node's answer
            answered.wait(timeout)
    finally:
        if assoc.is_established:
            assoc.release()
    return CommitmentRequest(
        destination=destination.name,
        transaction_uid=transaction_uid,
        references=refs,
        requested_at=requested_at,
        report=reports[0] if reports else None,
    )


# -- what to do now ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CommitmentPolicy:
    """How long to wait and how often to try, for one destination."""

    #: Seconds after an N-ACTION with no report before asking again.
    report_timeout: float = 600.0
    #: N-ACTIONs after one send before giving up for want of a report.
    max_requests: int = 3
    #: Seconds after a failure report before the result is sent again.
    resend_wait: float = 300.0
    #: Sends of one result in all (the destination's ``attempts``).
    max_sends: int = 20

    @classmethod
    def of(cls, destination: DicomDestination) -> CommitmentPolicy:
        return cls(
            report_timeout=destination.commitment_report_timeout_seconds,
            max_requests=destination.commitment_requests,
            resend_wait=destination.commitment_resend_seconds,
            max_sends=destination.attempts,
        )


@dataclass(frozen=True)
class Plan:
    """What is due now: N-ACTIONs per destination, results to send again, give-ups."""

    request: dict[str, list[Tracked]] = field(default_factory=dict)
    resend: list[Tracked] = field(default_factory=list)
    give_up: list[Tracked] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.request or self.resend or self.give_up)


def plan(
    items: Iterable[Tracked],
    policy: Callable[[str], CommitmentPolicy | None],
    now: float,
    started_at: float | None = None,
) -> Plan:
    """Decide what to do with each tracked result now (pure: the caller records it).

    * owed: ask (grouped by destination, one N-ACTION each);
    * requested, no report ``report_timeout`` after the N-ACTION, or the N-ACTION was made
      before the node (re)started at ``started_at`` (its association, and any report on
      it, are gone): ask again, with a new Transaction UID, up to ``max_requests``; then
      give up with the reason (sending again cannot bring a report the PACS does not send);
    * failed, ``resend_wait`` after the report: send again while ``sends < max_sends``,
      else give up with the PACS's reason.

    ``policy`` gives a destination's policy, ``None`` for a destination that no longer asks
    for commitment (its items are left as they are). Returned items carry the state the
    caller records: ``requested`` with the batch's Transaction UID and ``requests + 1``,
    failed with a reason; re-sends are returned as they are.
    """
    request: dict[str, list[Tracked]] = {}
    resend: list[Tracked] = []
    give_up: list[Tracked] = []
    transaction: dict[str, str] = {}
    for item in items:
        p = policy(item.destination)
        if p is None:
            continue
        if item.state == CommitmentState.REQUESTED:
            lost = started_at is not None and item.since < started_at
            if not lost and now - item.since < p.report_timeout:
                continue
            if item.requests >= p.max_requests:
                give_up.append(
                    replace(
                        item,
                        state=CommitmentState.FAILED,
                        since=now,
                        reason=f"no storage commitment report from {item.destination} after "
                        f"{item.requests} request(s): the PACS must know this node's AE "
                        "title, host and port to report on a new association",
                    )
                )
                continue
        elif item.state == CommitmentState.FAILED:
            if now - item.since < p.resend_wait:
                continue
            if item.sends >= p.max_sends:
                give_up.append(
                    replace(
                        item,
                        since=now,
                        reason=f"not committed by {item.destination} after {item.sends} "
                        f"send(s): {item.reason}",
                    )
                )
            else:
                resend.append(item)
            continue
        elif item.state == CommitmentState.OWED:
            if item.requests >= p.max_requests:  # refused as often as the policy allows
                give_up.append(
                    replace(
                        item,
                        state=CommitmentState.FAILED,
                        since=now,
                        reason=f"storage commitment not requested after {item.requests} "
                        f"refusal(s): {item.reason}",
                    )
                )
                continue
        else:
            continue
        uid = transaction.setdefault(item.destination, generate_uid())
        request.setdefault(item.destination, []).append(
            replace(
                item,
                state=CommitmentState.REQUESTED,
                since=now,
                transaction_uid=uid,
                requests=item.requests + 1,
            )
        )
    return Plan(request=request, resend=resend, give_up=give_up)


# -- the step -------------------------------------------------------------------------------
class CommitmentStep:
    """Runs :func:`plan` about once a second beside the exporter, and acts on it.

    ``on_resend`` is called after results are queued to be sent again (the exporter's
    ``wake``). A request that fails is made again after the destination's back-off
    (``retry_backoff_seconds`` doubling up to ``max_backoff_seconds``); a refusal counts
    against its ``commitment_requests``, a PACS that cannot be reached does not.
    """

    def __init__(
        self,
        settings: Settings,
        jobs: JobDatabase,
        on_resend: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.on_resend = on_resend
        self.destinations = {
            d.name: d
            for d in settings.destinations
            if isinstance(d, DicomDestination) and d.storage_commitment
        }
        self.started_at = time.time()
        #: Destinations whose last requests failed: name -> (failures in a row, not before).
        self._failing: dict[str, tuple[int, float]] = {}
        self._worker = Worker("dicom-node-commitment", self._step, 1.0, "storage commitment")

    def policy(self, name: str) -> CommitmentPolicy | None:
        destination = self.destinations.get(name)
        return None if destination is None else CommitmentPolicy.of(destination)

    def run_once(self, now: float | None = None) -> Plan:
        """Do what is due now; the plan acted on."""
        now = time.time() if now is None else now
        due = plan(self.jobs.commitments.tracked(), self.policy, now, self.started_at)
        if due.give_up:
            self.jobs.commitments.give_up(due.give_up)
            for item in due.give_up:
                log.warning("outbox item %d not committed, failed: %s", item.item_id, item.reason)
        if due.resend and self.jobs.commitments.resend(due.resend):
            for item in due.resend:
                log.info(
                    "outbox item %d sent again to %s: %s",
                    item.item_id,
                    item.destination,
                    item.reason,
                )
            self.on_resend()
        for name, asked in due.request.items():
            if self._failing.get(name, (0, 0.0))[1] > now:
                continue
            self._request(self.destinations[name], asked)
        return due

    def _request(self, destination: DicomDestination, asked: list[Tracked]) -> None:
        readable: list[Tracked] = []
        references: list[Reference] = []
        for item in asked:  # the SOP class of what the destination took, from its file
            try:
                header = pydicom.dcmread(
                    item.path, stop_before_pixels=True, specific_tags=["SOPClassUID"]
                )
            except (OSError, ValueError) as exc:  # the file is gone: nothing to name
                log.error("outbox item %d cannot be read (%s): not asked", item.item_id, exc)
                continue
            readable.append(item)
            references.append(Reference(str(header.SOPClassUID), item.sop_uid))
        asked = readable
        if not asked:
            return
        uid = asked[0].transaction_uid
        self.jobs.commitments.record_request(destination.name, asked, time.time())
        log.info(
            "storage commitment of %d result(s) asked of %s (transaction %s)",
            len(references),
            destination.name,
            uid,
        )
        try:
            request_commitment(
                destination,
                references,
                calling_ae=self.settings.node.ae_title,
                transaction_uid=uid,
                tls=self.settings.tls,
                timeout=self.settings.limits.network_timeout,
                wait_for_report=SAME_ASSOCIATION_WAIT,
                on_report=self.jobs.commitments.record_report,
                reported=lambda: self.jobs.commitments.reported(uid),
            )
        except CommitmentError as exc:
            reachable = not isinstance(exc, CommitmentUnreachable)
            self.jobs.commitments.request_not_made(uid, str(exc), counts=reachable)
            failures = self._failing.get(destination.name, (0, 0.0))[0] + 1
            wait = backoff(
                failures, destination.retry_backoff_seconds, destination.max_backoff_seconds
            )
            self._failing[destination.name] = (failures, time.time() + wait)
            log.warning("%s; asked again in %.0f s", exc, wait)
            return
        self._failing.pop(destination.name, None)

    # -- running ----------------------------------------------------------------------
    def _step(self) -> bool:
        self.run_once()
        return False  # what is due next is due in a second at the earliest

    def start(self) -> None:
        self._worker.start()

    def wake(self) -> None:
        """Results were acknowledged: ask for their commitment now."""
        self._worker.wake()

    def stop(self) -> None:
        self._worker.stop()
