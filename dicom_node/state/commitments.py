"""Storage commitment: what each destination that asks for it has committed to keeping.

A C-STORE response says that a PACS received an object, not that it keeps it. For a
destination with ``storage_commitment`` an acknowledged outbox item owes a commitment
(:meth:`~dicom_node.state.outbox.OutboxRepository.mark_sent` sets it ``owed``); the
exporter's commitment step (:mod:`dicom_node.export.commitment`) asks for it with an
N-ACTION, and the PACS's N-EVENT-REPORT (:mod:`dicom_node.intake.commitment_reports`) says,
per instance, committed or not, and why not. This module is the bookkeeping:

* each request is recorded (``commitment_requests``: its Transaction UID, destination and
  items) in the transaction that makes its items ``requested``, *before* the N-ACTION is
  sent, so a node stopped between the N-ACTION and the report finds it at start;
* a report is applied in one transaction (:meth:`CommitmentRepository.record_report`),
  before the PACS is answered, by the pure rule :func:`apply_report`;
* a failed item is sent again (:meth:`~CommitmentRepository.resend`) or, its sends spent,
  recorded as failed (:meth:`~CommitmentRepository.give_up`), as the commitment step
  decides.

The report's types (:class:`Reference`, :class:`Failure`, :class:`CommitmentReport`) are
defined here, where they are recorded, and read off the wire by intake.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from dicom_node.state.database import Database
from dicom_node.state.states import CommitmentState, OutboxState

__all__ = [
    "FAILURE_REASONS",
    "CommitmentReport",
    "CommitmentRepository",
    "CommitmentRequestRecord",
    "Failure",
    "Reference",
    "Tracked",
    "apply_report",
    "failure_reason",
]

#: Failure Reason (0008,1197) values of a report, in words (PS3.4 J.3.3.1.1, PS3.3
#: C.14.1.1), each with what it means for the node.
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

    ``reporter`` is the AE title that sent it (the calling AE title of a new association,
    or the PACS's own on the association that asked); ``same_association`` whether it came
    on the association that carried the N-ACTION.
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


@dataclass(frozen=True)
class Tracked:
    """One sent result at one destination, as storage commitment sees it (an outbox row)."""

    item_id: int
    destination: str
    sop_uid: str
    #: The file the destination took (its SOP Class UID goes in the request).
    path: str
    state: CommitmentState
    #: When the state was entered (the acknowledgement, the N-ACTION, the report).
    since: float
    transaction_uid: str = ""
    #: N-ACTIONs since the last send.
    requests: int = 0
    #: Attempts to send so far (the destination's ``attempts`` bounds them).
    sends: int = 1
    reason: str = ""


@dataclass(frozen=True)
class CommitmentRequestRecord:
    """One N-ACTION as recorded, with its report once one came."""

    transaction_uid: str
    destination: str
    item_ids: tuple[int, ...]
    requested_at: float
    reported_at: float | None
    reporter: str
    #: "" until reported (or not sent); then what became of it, in words.
    outcome: str


def apply_report(items: Iterable[Tracked], report: CommitmentReport) -> list[Tracked]:
    """The items a report changes, with their new state (pure: the caller records it).

    ``items`` are the results the report's transaction named. An instance reported
    committed is committed, whatever its state (a late report of a transaction asked again
    still says the PACS holds it); one reported failed, or not named at all (PS3.4 J.3.3
    names every instance in one of the two lists), fails only while the report's
    transaction is its current one. Applying a report twice changes nothing.
    """
    committed = {r.sop_instance_uid for r in report.committed}
    failed = {f.reference.sop_instance_uid: f.meaning for f in report.failed}
    out: list[Tracked] = []
    for item in items:
        if item.state == CommitmentState.COMMITTED:
            continue
        if item.sop_uid in committed:
            out.append(
                replace(item, state=CommitmentState.COMMITTED, since=report.received_at, reason="")
            )
            continue
        current = (
            item.state == CommitmentState.REQUESTED
            and item.transaction_uid == report.transaction_uid
        )
        if not current:
            continue
        reason = failed.get(item.sop_uid, "the PACS's report did not name it")
        out.append(
            replace(item, state=CommitmentState.FAILED, since=report.received_at, reason=reason)
        )
    return out


_TRACKED_COLUMNS = (
    "id, destination, sop_uid, path, commitment, commit_since, commit_transaction,"
    " commit_requests, attempts, commit_reason"
)


def _tracked(row: object) -> Tracked:
    r = dict(row)  # type: ignore[call-overload]
    return Tracked(
        item_id=int(r["id"]),
        destination=r["destination"],
        sop_uid=r["sop_uid"],
        path=r["path"],
        state=CommitmentState(r["commitment"]),
        since=float(r["commit_since"]),
        transaction_uid=r["commit_transaction"],
        requests=int(r["commit_requests"]),
        sends=int(r["attempts"]),
        reason=r["commit_reason"],
    )


class CommitmentRepository:
    """Queries and state changes of storage commitment."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def tracked(self) -> list[Tracked]:
        """Sent items whose commitment is owed, requested or failed: what the commitment
        step looks at."""
        with self._db.read() as db:
            rows = db.execute(
                f"SELECT {_TRACKED_COLUMNS} FROM outbox WHERE state = ? AND commitment IN"
                " (?, ?, ?) ORDER BY id",
                (
                    OutboxState.SENT,
                    CommitmentState.OWED,
                    CommitmentState.REQUESTED,
                    CommitmentState.FAILED,
                ),
            ).fetchall()
        return [_tracked(r) for r in rows]

    def record_request(self, destination: str, asked: Sequence[Tracked], now: float) -> None:
        """Record an N-ACTION about to be sent, in one transaction: the request (one
        Transaction UID for ``asked``, which :func:`~dicom_node.export.commitment.plan`
        made ``requested``) and each item's new state."""
        if not asked:
            return
        uid = asked[0].transaction_uid
        with self._db.tx() as db:
            db.execute(
                "INSERT INTO commitment_requests (transaction_uid, destination, item_ids,"
                " requested_at) VALUES (?, ?, ?, ?)",
                (uid, destination, json.dumps([i.item_id for i in asked]), now),
            )
            for item in asked:
                db.execute(
                    "UPDATE outbox SET commitment = ?, commit_transaction = ?, commit_since = ?,"
                    " commit_requests = ?, commit_reason = '' WHERE id = ? AND state = ?",
                    (
                        CommitmentState.REQUESTED,
                        uid,
                        now,
                        item.requests,
                        item.item_id,
                        OutboxState.SENT,
                    ),
                )

    def request_not_made(self, transaction_uid: str, reason: str, counts: bool) -> None:
        """The N-ACTION of ``transaction_uid`` failed (``reason``): its items owe their
        commitment again, the request is recorded as not made. ``counts``: the PACS
        answered (refused, or never reported), so the attempt counts against the
        destination's ``commitment_requests``; a PACS that could not be reached does not."""
        with self._db.tx() as db:
            db.execute(
                "UPDATE outbox SET commitment = ?, commit_reason = ?,"
                f" commit_requests = commit_requests - {0 if counts else 1}"
                " WHERE commit_transaction = ? AND commitment = ? AND state = ?",
                (
                    CommitmentState.OWED,
                    reason,
                    transaction_uid,
                    CommitmentState.REQUESTED,
                    OutboxState.SENT,
                ),
            )
            db.execute(
                "UPDATE commitment_requests SET outcome = ? WHERE transaction_uid = ?",
                (f"not made: {reason}", transaction_uid),
            )

    def record_report(self, report: CommitmentReport) -> list[Tracked] | None:
        """Apply a report in one transaction (before the PACS is answered); the items it
        changed, or ``None`` when no request of this node has its Transaction UID."""
        with self._db.tx() as db:
            row = db.execute(
                "SELECT item_ids FROM commitment_requests WHERE transaction_uid = ?",
                (report.transaction_uid,),
            ).fetchone()
            if row is None:
                return None
            ids = [int(i) for i in json.loads(row["item_ids"])]
            marks = ", ".join("?" * len(ids))
            items = [
                _tracked(r)
                for r in db.execute(
                    f"SELECT {_TRACKED_COLUMNS} FROM outbox WHERE id IN ({marks}) AND state = ?"
                    " AND commitment != ''",
                    (*ids, OutboxState.SENT),
                )
            ]
            changed = apply_report(items, report)
            for item in changed:
                db.execute(
                    "UPDATE outbox SET commitment = ?, commit_since = ?, commit_reason = ?"
                    " WHERE id = ?",
                    (item.state, item.since, item.reason, item.item_id),
                )
            outcome = f"{len(report.committed)} committed" + (
                f", {len(report.failed)} not" if report.failed else ""
            )
            db.execute(
                "UPDATE commitment_requests SET reported_at = ?, reporter = ?, outcome = ?"
                " WHERE transaction_uid = ?",
                (report.received_at, report.reporter, outcome, report.transaction_uid),
            )
        return changed

    def reported(self, transaction_uid: str) -> bool:
        """Whether a report of the request ``transaction_uid`` was recorded."""
        with self._db.read() as db:
            row = db.execute(
                "SELECT reported_at FROM commitment_requests WHERE transaction_uid = ?",
                (transaction_uid,),
            ).fetchone()
        return row is not None and row["reported_at"] is not None

    def resend(self, items: Iterable[Tracked]) -> int:
        """Queue failed items to be sent again (their acknowledgement makes the commitment
        owed again); how many were."""
        n = 0
        with self._db.tx() as db:
            for item in items:
                n += db.execute(
                    "UPDATE outbox SET state = ?, next_attempt = 0, last_error = ?,"
                    " commitment = '', commit_transaction = '', commit_requests = 0,"
                    " commit_since = 0 WHERE id = ? AND state = ? AND commitment = ?",
                    (
                        OutboxState.PENDING,
                        f"not committed, sent again: {item.reason}",
                        item.item_id,
                        OutboxState.SENT,
                        CommitmentState.FAILED,
                    ),
                ).rowcount
        return n

    def give_up(self, items: Iterable[Tracked]) -> None:
        """Record items as failed for good (``dicom-node retry`` sends them again), each
        with its reason."""
        with self._db.tx() as db:
            for item in items:
                db.execute(
                    "UPDATE outbox SET state = ?, last_error = ?, commitment = ?,"
                    " commit_reason = ?, commit_since = ? WHERE id = ? AND state = ?",
                    (
                        OutboxState.FAILED,
                        item.reason,
                        CommitmentState.FAILED,
                        item.reason,
                        item.since,
                        item.item_id,
                        OutboxState.SENT,
                    ),
                )

    def requests(self, item_id: int | None = None) -> list[CommitmentRequestRecord]:
        """Every request recorded (or those naming ``item_id``), oldest first."""
        with self._db.read() as db:
            rows = db.execute("SELECT * FROM commitment_requests ORDER BY requested_at").fetchall()
        out = []
        for r in rows:
            ids = tuple(int(i) for i in json.loads(r["item_ids"]))
            if item_id is not None and item_id not in ids:
                continue
            out.append(
                CommitmentRequestRecord(
                    transaction_uid=r["transaction_uid"],
                    destination=r["destination"],
                    item_ids=ids,
                    requested_at=float(r["requested_at"]),
                    reported_at=r["reported_at"],
                    reporter=r["reporter"],
                    outcome=r["outcome"],
                )
            )
        return out
