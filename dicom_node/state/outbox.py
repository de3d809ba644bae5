"""The outbox: results owed to destinations, each until a destination acknowledges it.

A result of a run enters the outbox in the transaction that ends the run "done"
(:meth:`~dicom_node.state.series.SeriesRepository.finish_run`); the exporter
(:mod:`dicom_node.export.sender`) reads due items here and records each answer. An item a
destination acknowledged is ``sent`` and never picked again.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from dicom_node.state.database import Database
from dicom_node.state.states import CommitmentState, OutboxState

__all__ = ["NewOutboxItem", "OutboxItem", "OutboxRepository"]


@dataclass(frozen=True)
class NewOutboxItem:
    """A result file to queue for one destination (what a job plans).

    A SEG (and the SR that names it) may come in two forms: ``path`` is the one offered
    first (``form``: "labelmap" or "binary"; empty where there is no choice) and
    ``alt_path`` the binary form sent where the destination refuses a Label Map SEG.
    """

    series_uid: str
    kind: str
    destination: str
    path: str
    sop_uid: str
    model: str = ""
    form: str = ""
    alt_path: str = ""
    alt_sop_uid: str = ""


@dataclass
class OutboxItem:
    """A queued result as recorded. Once acknowledged, ``path`` and ``sop_uid`` are those of
    the object the destination took and ``sent_as`` says which form it was."""

    id: int
    series_uid: str
    kind: str
    destination: str
    path: str
    sop_uid: str
    state: OutboxState
    attempts: int
    next_attempt: float
    last_error: str
    sent_at: float | None
    model: str = ""
    form: str = ""
    alt_path: str = ""
    alt_sop_uid: str = ""
    sent_as: str = ""
    #: Storage commitment of the sent item, where its destination asks for it
    #: (:mod:`dicom_node.state.commitments`); ``None`` where it does not.
    commitment: CommitmentState | None = None
    commit_transaction: str = ""
    commit_since: float = 0.0
    commit_requests: int = 0
    #: Why the item is not committed: the PACS's Failure Reason, or why no request was
    #: made or answered, in one sentence.
    commit_reason: str = ""

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> OutboxItem:
        values = dict(row)
        values["state"] = OutboxState(values["state"])
        values["commitment"] = (
            CommitmentState(values["commitment"]) if values["commitment"] else None
        )
        return cls(**values)

    def summary(self) -> dict[str, Any]:
        """What the ``jobs`` listing shows of the item (JSON-ready)."""
        return {
            "kind": self.kind,
            "destination": self.destination,
            "state": str(self.state),
            "attempts": self.attempts,
            "last_error": self.last_error,
            "sent_as": self.sent_as,
            "commitment": str(self.commitment or ""),
            "commitment_reason": self.commit_reason,
        }


def insert(db: sqlite3.Connection, item: NewOutboxItem) -> None:
    """Queue ``item`` in the caller's transaction (an item already queued stays as it is)."""
    db.execute(
        "INSERT OR IGNORE INTO outbox (series_uid, kind, destination, path, sop_uid, state,"
        " model, form, alt_path, alt_sop_uid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            item.series_uid,
            item.kind,
            item.destination,
            item.path,
            item.sop_uid,
            OutboxState.PENDING,
            item.model,
            item.form,
            item.alt_path,
            item.alt_sop_uid,
        ),
    )


def cancel_unsent(db: sqlite3.Connection, series_uid: str, why: str) -> None:
    """In the caller's transaction: results of the series not sent yet never will be."""
    db.execute(
        "UPDATE outbox SET state = ?, last_error = ? WHERE series_uid = ? AND state IN (?, ?)",
        (OutboxState.CANCELLED, why, series_uid, OutboxState.PENDING, OutboxState.FAILED),
    )


class OutboxRepository:
    """Queries and updates of the outbox."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def enqueue(self, item: NewOutboxItem) -> None:
        with self._db.tx() as db:
            insert(db, item)

    def items(self, series_uid: str | None = None) -> list[OutboxItem]:
        with self._db.read() as db:
            if series_uid is None:
                rows = db.execute("SELECT * FROM outbox ORDER BY id").fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM outbox WHERE series_uid = ? ORDER BY id", (series_uid,)
                ).fetchall()
        return [OutboxItem.from_row(r) for r in rows]

    def due(self, now: float | None = None) -> list[OutboxItem]:
        now = time.time() if now is None else now
        with self._db.read() as db:
            rows = db.execute(
                "SELECT * FROM outbox WHERE state = ? AND next_attempt <= ? ORDER BY id",
                (OutboxState.PENDING, now),
            ).fetchall()
        return [OutboxItem.from_row(r) for r in rows]

    def sent(self, series_uid: str, model: str | None = None) -> list[OutboxItem]:
        """Results of the series acknowledged by some destination (one item per SOP
        Instance UID), optionally of one model: what a new run supersedes."""
        sql = "SELECT * FROM outbox WHERE series_uid = ? AND state = ?"
        args: list[object] = [series_uid, OutboxState.SENT]
        if model is not None:
            sql += " AND model = ?"
            args.append(model)
        with self._db.read() as db:
            rows = db.execute(sql + " ORDER BY id", args).fetchall()
        seen: dict[str, OutboxItem] = {}
        for r in rows:
            seen.setdefault(r["sop_uid"], OutboxItem.from_row(r))
        return list(seen.values())

    def mark_sent(
        self,
        item_id: int,
        sent_at: float | None = None,
        alternative: bool = False,
        commitment: bool = False,
    ) -> None:
        """Record an acknowledgement (whatever the item's state: a cancelled item whose
        send was already under way was still received by the destination).

        ``commitment``: the destination asks for storage commitment: the item's is owed
        from now on (:mod:`dicom_node.state.commitments`), in the same transaction.

        ``alternative``: the destination took the binary form (``alt_path``): it becomes
        the item's ``path`` and ``sop_uid`` (what a later run supersedes, what retention
        keeps), the form offered first becomes the alternative, and ``sent_as`` is
        "binary". SQLite evaluates every right-hand side on the old row, so the columns
        swap.
        """
        swap = (
            ", path = alt_path, sop_uid = alt_sop_uid, alt_path = path,"
            " alt_sop_uid = sop_uid, sent_as = 'binary'"
            if alternative
            else ", sent_as = form"
        )
        when = sent_at or time.time()
        owed = (
            ", commitment = 'owed', commit_since = ?, commit_transaction = '',"
            " commit_requests = 0, commit_reason = ''"
            if commitment
            else ""
        )
        with self._db.tx() as db:
            db.execute(
                "UPDATE outbox SET state = ?, sent_at = ?, attempts = attempts + 1,"
                f" last_error = ''{swap}{owed} WHERE id = ? AND state != ?",
                (
                    OutboxState.SENT,
                    when,
                    *([when] if commitment else []),
                    item_id,
                    OutboxState.SENT,
                ),
            )

    def sent_form(self, series_uid: str, model: str, destination: str, kind: str) -> str | None:
        """Which form (``sent_as``) a destination took of a result of this series and
        model, or ``None`` when it took none yet: an SR follows the form of its SEG."""
        with self._db.read() as db:
            row = db.execute(
                "SELECT sent_as FROM outbox WHERE series_uid = ? AND model = ? AND"
                " destination = ? AND kind = ? AND state = ? ORDER BY id DESC LIMIT 1",
                (series_uid, model, destination, kind, OutboxState.SENT),
            ).fetchone()
        return None if row is None else str(row["sent_as"])

    def mark_attempt_failed(
        self, item_id: int, error: str, next_attempt: float, give_up: bool
    ) -> None:
        state = OutboxState.FAILED if give_up else OutboxState.PENDING
        with self._db.tx() as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt = ?,"
                " state = ? WHERE id = ?",
                (error, next_attempt, state, item_id),
            )

    def pending_count(self) -> int:
        with self._db.read() as db:
            row = db.execute(
                "SELECT COUNT(*) AS n FROM outbox WHERE state = ?", (OutboxState.PENDING,)
            ).fetchone()
        return int(row["n"])
