"""Storage Commitment Push Model SCU (PS3.4 Annex J): has the PACS taken responsibility?

A C-STORE response says that a PACS received an object, not that it keeps it. With storage
commitment the node asks, after its results are acknowledged, that the PACS commit to them
(N-ACTION, Action Type 1, with a Transaction UID and the Referenced SOP Sequence), and the
PACS answers later with an N-EVENT-REPORT naming, for that transaction, the instances it
committed and those it did not, each with a Failure Reason. The report comes on the same
association when the PACS answers at once, otherwise on a new association the PACS opens
to the node (Orthanc always does the latter), where the node accepts the Storage
Commitment Push Model SOP Class in the SCU role (the PACS, requestor, is the SCP: SCP/SCU
Role Selection, PS3.4 J.3.3 and PS3.7 D.3.3.4).

This module holds the protocol and the rules, not the bookkeeping:

* :func:`request_commitment` sends the N-ACTION and waits a while for a report on the same
  association; :class:`CommitmentReport` is a report, typed, its failures in words;
* :func:`report_handler` is the ``EVT_N_EVENT_REPORT`` handler for reports on new
  associations, and :func:`add_report_context` the presentation context the node's AE
  must support to receive them;
* :func:`plan` and :func:`apply_report` are the state machine of one result at one
  destination (:class:`CommitState`), as pure functions over :class:`Tracked` items, so
  that what is asked again, re-sent or given up is decided the same way before and after
  a restart. The job database keeps the items and the transactions.

A result's commitment, per destination that asks for it::

    (C-STORE acknowledged) -> owed -> requested -> committed
                                          |  \\-> failed --(resend wait)--> re-sent: owed ...
                                          \\-(no report in time)-> requested again, then gave up

A transaction is recorded before its N-ACTION is sent, so a node stopped between the
N-ACTION and the report finds it at start and asks again (:func:`plan` with
``started_at``), rather than forgetting it or sending the object twice; a report that
arrives late for a transaction asked again is still read (a commitment is a fact about the
PACS), its failures only while it is the item's current transaction.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance
from pynetdicom.status import STORAGE_COMMITMENT_SERVICE_CLASS_STATUS

from dicom_node.config import Destination, TLSSettings
from dicom_node.tls import client_ssl_context

__all__ = [
    "ACTION_REQUEST_COMMITMENT",
    "EVENT_COMPLETE_FAILURES",
    "EVENT_SUCCESSFUL",
    "FAILURE_REASONS",
    "STORAGE_COMMITMENT",
    "STORAGE_COMMITMENT_INSTANCE",
    "CommitState",
    "CommitmentError",
    "CommitmentPolicy",
    "CommitmentRefused",
    "CommitmentReport",
    "CommitmentRequest",
    "CommitmentUnreachable",
    "Failure",
    "Plan",
    "Reference",
    "ReportError",
    "Tracked",
    "action_information",
    "add_report_context",
    "apply_report",
    "failure_reason",
    "plan",
    "read_report",
    "report_handler",
    "request_commitment",
]

log = logging.getLogger("dicom_node.commitment")

STORAGE_COMMITMENT = StorageCommitmentPushModel
#: The well-known SOP Instance of the Storage Commitment Push Model (PS3.4 J.3.5).
STORAGE_COMMITMENT_INSTANCE = StorageCommitmentPushModelInstance
#: Action Type ID of "Request Storage Commitment" (PS3.4 J.3.2.1.1).
ACTION_REQUEST_COMMITMENT = 1
#: Event Type IDs of the report (PS3.4 J.3.3.1.1).
EVENT_SUCCESSFUL = 1
EVENT_COMPLETE_FAILURES = 2
#: Transfer syntaxes the node accepts a report in (the two every DICOM peer speaks).
REPORT_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

#: Failure Reason (0008,1197) values of a report, in words (PS3.4 J.3.3.1.1 and C.14.1.1
#: of PS3.3), each with what it means for the node.
FAILURE_REASONS: dict[int, str] = {
    0x0110: "Processing failure (the PACS failed to process the request)",
    0x0112: "No such object instance (the PACS does not hold it)",
    0x0119: "Class / Instance conflict (the PACS holds the instance under another SOP class)",
    0x0122: "Referenced SOP Class not supported (the PACS does not commit to this SOP class)",
    0x0131: "Duplicate transaction UID (the Transaction UID is already in use)",
    0x0213: "Resource limitation (the PACS has not enough resources to store it now)",
}


def failure_reason(code: int) -> str:
    """A Failure Reason in words: ``0x0112 No such object instance (...)``."""
    return f"0x{code:04X} {FAILURE_REASONS.get(code, 'unknown failure reason')}"


# -- typed report --------------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """One SOP instance in a commitment request or report."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Failure:
    """An instance the PACS did not commit to, and why (its Failure Reason)."""

    reference: Reference
    reason: int

    @property
    def meaning(self) -> str:
        return failure_reason(self.reason)


@dataclass(frozen=True)
class CommitmentReport:
    """An N-EVENT-REPORT of the Storage Commitment Push Model, read.

    ``reporter`` is the AE title that sent it (the calling AE of a new association, or the
    PACS's own on the same one); ``same_association`` whether it came on the association
    that carried the N-ACTION.
    """

    transaction_uid: str
    committed: tuple[Reference, ...] = ()
    failed: tuple[Failure, ...] = ()
    retrieve_ae_title: str = ""
    reporter: str = ""
    same_association: bool = False
    received_at: float = field(default_factory=time.time)

    @property
    def all_committed(self) -> bool:
        return not self.failed

    def describe(self) -> str:
        """One sentence: how many committed, and each failure with its reason."""
        who = f" by {self.reporter}" if self.reporter else ""
        text = f"storage commitment {self.transaction_uid}{who}: {len(self.committed)} committed"
        if self.failed:
            text += f", {len(self.failed)} not: " + "; ".join(
                f"{f.reference.sop_instance_uid} {f.meaning}" for f in self.failed
            )
        return text


class ReportError(ValueError):
    """An N-EVENT-REPORT that is not a Storage Commitment report; ``status`` is the
    N-EVENT-REPORT failure status the node answers it with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


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


def _references(seq: Iterable[Dataset]) -> list[tuple[Reference, Dataset]]:
    out = []
    for item in seq:
        uid = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if uid:
            out.append((Reference(str(item.get("ReferencedSOPClassUID", "") or ""), uid), item))
    return out


def read_report(
    event_type: int, info: Dataset | None, reporter: str = "", same_association: bool = False
) -> CommitmentReport:
    """Read a Storage Commitment N-EVENT-REPORT's Event Type ID and Event Information.

    Raises :class:`ReportError` (with the status to answer) when it is not one: another
    event type, or no Transaction UID.
    """
    if event_type not in (EVENT_SUCCESSFUL, EVENT_COMPLETE_FAILURES):
        raise ReportError(f"event type {event_type} is not a storage commitment report", 0x0113)
    if info is None or not str(info.get("TransactionUID", "") or ""):
        raise ReportError("the storage commitment report has no Transaction UID", 0x0120)
    committed = tuple(ref for ref, _ in _references(info.get("ReferencedSOPSequence") or []))
    failed = tuple(
        Failure(ref, int(item.get("FailureReason", 0x0110) or 0x0110))
        for ref, item in _references(info.get("FailedSOPSequence") or [])
    )
    return CommitmentReport(
        transaction_uid=str(info.TransactionUID),
        committed=committed,
        failed=failed,
        retrieve_ae_title=str(info.get("RetrieveAETitle", "") or ""),
        reporter=reporter,
        same_association=same_association,
    )


# -- the N-EVENT-REPORT receiving side ------------------------------------------------------
def add_report_context(ae: AE) -> None:
    """Let ``ae`` (the node's SCP) accept reports on associations a PACS opens.

    The PACS proposes the Storage Commitment Push Model with itself, the requestor, in the
    SCP role (SCP/SCU Role Selection); the node accepts that role for it and refuses it
    the SCU role: on such an association the node is the Storage Commitment SCU, and only
    receives N-EVENT-REPORTs. A PACS proposing no role selection gets the default roles
    and is served the same way.
    """
    ae.add_supported_context(
        STORAGE_COMMITMENT, list(REPORT_TRANSFER_SYNTAXES), scu_role=False, scp_role=True
    )


def report_handler(
    on_report: Callable[[CommitmentReport], None],
) -> Callable[[evt.Event], tuple[int, Dataset | None]]:
    """An ``EVT_N_EVENT_REPORT`` handler that reads each report and hands it to
    ``on_report``, answering 0x0000 only once ``on_report`` returned.

    ``on_report`` records the report durably (the job database); if it raises, the
    answer is 0x0110 (Processing Failure), so the PACS knows the report was not taken and
    the node asks again later. A report that is not a Storage Commitment report is
    answered with the failure status PS3.7 gives for it.
    """

    def handle(event: evt.Event) -> tuple[int, Dataset | None]:
        request = event.request
        reporter = event.assoc.requestor.ae_title.strip()
        if event.assoc.is_requestor:  # the report came on the node's own association
            reporter = event.assoc.acceptor.ae_title.strip()
        if str(request.AffectedSOPClassUID) != STORAGE_COMMITMENT:
            log.warning(
                "N-EVENT-REPORT of %s from %s refused", request.AffectedSOPClassUID, reporter
            )
            return 0x0118, None  # No Such SOP Class
        try:
            report = read_report(
                int(event.event_type),
                event.event_information,
                reporter=reporter,
                same_association=event.assoc.is_requestor,
            )
        except ReportError as exc:
            log.warning("storage commitment report from %s refused: %s", reporter, exc)
            return exc.status, None
        except Exception as exc:  # noqa: BLE001 - a data set that does not decode
            log.warning("storage commitment report from %s does not decode: %s", reporter, exc)
            return 0x0110, None
        try:
            on_report(report)
        except Exception:
            log.exception("storage commitment report %s not recorded", report.transaction_uid)
            return 0x0110, None
        log.info("%s", report.describe())
        return 0x0000, None

    return handle


# -- the N-ACTION -------------------------------------------------------------------------
class CommitmentError(RuntimeError):
    """A storage commitment request could not be made; the message says why."""


class CommitmentUnreachable(CommitmentError):
    """No association: the PACS cannot be reached, rejected it, or refused the SOP class."""


class CommitmentRefused(CommitmentError):
    """The PACS answered the N-ACTION with a failure status (``status``)."""

    def __init__(self, message: str, status: int) -> None:
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
    destination: Destination,
    references: Sequence[Reference],
    *,
    calling_ae: str,
    transaction_uid: str = "",
    tls: TLSSettings | None = None,
    timeout: float = 30.0,
    wait_for_report: float = 0.0,
    on_report: Callable[[CommitmentReport], None] | None = None,
) -> CommitmentRequest:
    """Ask ``destination`` to commit to ``references`` (N-ACTION, Action Type 1).

    ``transaction_uid`` is the caller's when it recorded the transaction first (it
    should: see the module); a new one otherwise. After the PACS accepts, the association
    is held up to ``wait_for_report`` seconds for a report on it; one that comes is in the
    result (and passed to ``on_report`` as it arrives), otherwise the report will come on a
    new association, to :func:`report_handler`. ``calling_ae`` must be the AE title the
    PACS reports to (the node's own).

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

    def keep(report: CommitmentReport) -> None:
        if report.transaction_uid == transaction_uid:
            reports.append(report)
            arrived.set()
        if on_report is not None:
            on_report(report)

    rejections: list[A_ASSOCIATE_RJ] = []

    def keep_rejection(event: evt.Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            rejections.append(event.pdu)

    tls_args = (
        (client_ssl_context(tls or TLSSettings()), destination.host) if destination.tls else None
    )
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=tls_args,
        evt_handlers=[
            (evt.EVT_PDU_RECV, keep_rejection),
            (evt.EVT_N_EVENT_REPORT, report_handler(keep)),
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
            raise CommitmentUnreachable(
                f"{where} does not offer Storage Commitment Push Model: turn "
                "storage_commitment off for this destination, or enable it on the PACS"
            )
        raise CommitmentUnreachable(f"{where} cannot be reached for storage commitment")
    requested_at = time.time()
    try:
        if not assoc.accepted_contexts:
            raise CommitmentUnreachable(
                f"{where} does not offer Storage Commitment Push Model: turn "
                "storage_commitment off for this destination, or enable it on the PACS"
            )
        status, _reply = assoc.send_n_action(
            info, ACTION_REQUEST_COMMITMENT, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
        )
        if not status or "Status" not in status:
            raise CommitmentUnreachable(
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
        if wait_for_report > 0:
            arrived.wait(wait_for_report)
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


# -- the state machine ----------------------------------------------------------------------
class CommitState(str, enum.Enum):
    """Where one result stands with one destination's storage commitment."""

    #: Acknowledged by C-STORE; commitment not asked yet.
    OWED = "owed"
    #: An N-ACTION names it (recorded before it was sent); no report yet.
    REQUESTED = "requested"
    #: The PACS reported it committed: the node owes nothing more.
    COMMITTED = "committed"
    #: The PACS reported a failure for it: it is sent again after the resend wait.
    FAILED = "failed"
    #: Not committed within the policy's sends and requests: the reason says why.
    GAVE_UP = "gave_up"


@dataclass(frozen=True)
class CommitmentPolicy:
    """How long to wait and how often to try, for one destination."""

    #: Seconds after an N-ACTION with no report before asking again.
    report_timeout: float = 600.0
    #: N-ACTIONs after one send before giving up for want of a report.
    max_requests: int = 3
    #: Seconds after a failure report before the result is sent again.
    resend_wait: float = 300.0
    #: C-STOREs of one result in all (the destination's ``attempts``).
    max_sends: int = 20


@dataclass(frozen=True)
class Tracked:
    """One result at one destination, as storage commitment sees it (an outbox row)."""

    item_id: int
    destination: str
    reference: Reference
    state: CommitState
    #: When the state was entered (the acknowledgement, the N-ACTION, the report).
    since: float
    transaction_uid: str = ""
    #: N-ACTIONs since the last send.
    requests: int = 0
    #: C-STOREs acknowledged so far.
    sends: int = 1
    reason: str = ""


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
    policy: Callable[[str], CommitmentPolicy],
    now: float,
    started_at: float | None = None,
) -> Plan:
    """Decide what to do with each tracked result now (pure: the caller records it).

    * owed: ask (grouped by destination, one N-ACTION each);
    * requested, no report ``report_timeout`` after the N-ACTION, or the N-ACTION was made
      before the node (re)started at ``started_at`` (its association, and any report on
      it, are gone): ask again, new transaction, up to ``max_requests``; then give up,
      with the reason (re-sending cannot bring a report the PACS does not send);
    * failed, ``resend_wait`` after the report: send again while ``sends < max_sends``,
      else give up with the PACS's reason.

    Returned items carry the state the caller records: ``requested`` with a new
    Transaction UID and ``requests + 1`` (same UID for one destination's batch),
    ``gave_up`` with a reason; re-sends are returned as they are (the outbox queues them,
    and their acknowledgement makes them owed again).
    """
    request: dict[str, list[Tracked]] = {}
    resend: list[Tracked] = []
    give_up: list[Tracked] = []
    transaction: dict[str, str] = {}
    for item in items:
        p = policy(item.destination)
        if item.state == CommitState.OWED:
            ask = True
        elif item.state == CommitState.REQUESTED:
            lost = started_at is not None and item.since < started_at
            if not lost and now - item.since < p.report_timeout:
                continue
            if item.requests >= p.max_requests:
                give_up.append(
                    replace(
                        item,
                        state=CommitState.GAVE_UP,
                        since=now,
                        reason=f"no storage commitment report from {item.destination} after "
                        f"{item.requests} requests: the PACS must know this node's AE title, "
                        "host and port to report on a new association",
                    )
                )
                continue
            ask = True
        elif item.state == CommitState.FAILED:
            if now - item.since < p.resend_wait:
                continue
            if item.sends >= p.max_sends:
                give_up.append(
                    replace(
                        item,
                        state=CommitState.GAVE_UP,
                        since=now,
                        reason=f"not committed by {item.destination} after {item.sends} "
                        f"sends: {item.reason}",
                    )
                )
            else:
                resend.append(item)
            continue
        else:
            continue
        if ask:
            uid = transaction.setdefault(item.destination, generate_uid())
            request.setdefault(item.destination, []).append(
                replace(
                    item,
                    state=CommitState.REQUESTED,
                    since=now,
                    transaction_uid=uid,
                    requests=item.requests + 1,
                )
            )
    return Plan(request=request, resend=resend, give_up=give_up)


def apply_report(items: Iterable[Tracked], report: CommitmentReport) -> list[Tracked]:
    """The items a report changes, with their new state (pure: the caller records it).

    ``items`` are the results the report's transaction named (the job database finds them
    by Transaction UID, at this destination). An instance reported committed is committed,
    whatever its state (a late report of a transaction asked again still says the PACS
    holds it); one reported failed, or not named at all (PS3.4 J.3.3 names every
    instance in one of the two lists), fails only while the report's transaction is its
    current one and no report said so before. Applying a report twice changes nothing.
    """
    committed = {r.sop_instance_uid for r in report.committed}
    failed = {f.reference.sop_instance_uid: f.meaning for f in report.failed}
    out: list[Tracked] = []
    for item in items:
        uid = item.reference.sop_instance_uid
        if item.state == CommitState.COMMITTED:
            continue
        if uid in committed:
            out.append(
                replace(item, state=CommitState.COMMITTED, since=report.received_at, reason="")
            )
            continue
        current = (
            item.state == CommitState.REQUESTED and item.transaction_uid == report.transaction_uid
        )
        if not current:
            continue
        reason = failed.get(uid, "the PACS's report did not name it")
        out.append(replace(item, state=CommitState.FAILED, since=report.received_at, reason=reason))
    return out
