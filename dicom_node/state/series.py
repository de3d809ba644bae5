"""Series: each series the node knows, its state, and the run that finished it.

Results are a unit: one run of one series at one instance count. A job's results enter the
outbox in the transaction that ends it "done" (:meth:`SeriesRepository.finish_run`), and only
while the series still holds the instances the job processed; a run overtaken by new
instances queues nothing. Results of an earlier run that were not sent yet are cancelled
then (and as soon as a new instance reaches a done series); those already acknowledged are
named by the new run's SR as its predecessors.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.state.database import Database
from dicom_node.state.outbox import NewOutboxItem, cancel_unsent, insert
from dicom_node.state.results import SeriesResults
from dicom_node.state.states import CommitmentState, FinishOutcome, OutboxState, SeriesState

__all__ = ["SeriesRecord", "SeriesRepository"]

_FINISHED = (SeriesState.DONE, SeriesState.FAILED, SeriesState.NO_MODEL)


@dataclass
class SeriesRecord:
    """One row of the series table, as ``dicom-node jobs`` shows it."""

    series_uid: str
    study_uid: str
    modality: str
    calling_ae: str
    state: SeriesState
    reason: str
    instance_count: int
    first_received: float
    last_received: float
    updated: float
    attempts: int
    model: str
    timings: dict[str, float] = field(default_factory=dict)
    results: SeriesResults = field(default_factory=SeriesResults)
    #: The rule that last marked the series complete (:mod:`dicom_node.series.completion`);
    #: empty while it is receiving.
    completed_by: str = ""
    #: The source a fetch retrieved the series from (:mod:`dicom_node.sources`).
    fetched_from: str = ""
    #: What a top-up from a source added before the series was processed, in words.
    topped_up: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = str(self.state)
        d["results"] = self.results.to_json()
        return d


def _record(row: Any) -> SeriesRecord:
    d = dict(row)
    d["state"] = SeriesState(d["state"])
    d["timings"] = json.loads(d["timings"] or "{}")
    d["results"] = SeriesResults.from_json(json.loads(d["results"] or "{}"))
    return SeriesRecord(**d)


class SeriesRepository:
    """Queries and state changes of series."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # -- reading ----------------------------------------------------------------------
    def get(self, series_uid: str) -> SeriesRecord | None:
        with self._db.read() as db:
            row = db.execute("SELECT * FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        return _record(row) if row else None

    def records(self, state: SeriesState | None = None) -> list[SeriesRecord]:
        """Every series (or those in ``state``), oldest first."""
        with self._db.read() as db:
            if state is None:
                rows = db.execute("SELECT * FROM series ORDER BY first_received").fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM series WHERE state = ? ORDER BY first_received", (state,)
                ).fetchall()
        return [_record(r) for r in rows]

    def count(self, series_uid: str) -> int:
        """How many instances the series holds (0 for an unknown series)."""
        with self._db.read() as db:
            row = db.execute(
                "SELECT instance_count FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
        return int(row["instance_count"]) if row else 0

    def receiving_geometry(self, series_uid: str) -> tuple[int, list[str]] | None:
        """(instance count, each instance's geometry JSON) of a series that is receiving;
        ``None`` when it is in any other state (nothing to complete)."""
        with self._db.read() as db:
            row = db.execute(
                "SELECT instance_count FROM series WHERE series_uid = ? AND state = ?",
                (series_uid, SeriesState.RECEIVING),
            ).fetchone()
            if row is None:
                return None
            rows = db.execute(
                "SELECT geometry FROM instances WHERE series_uid = ?", (series_uid,)
            ).fetchall()
        return int(row["instance_count"]), [r["geometry"] for r in rows]

    def counts_by_state(self) -> dict[SeriesState, int]:
        with self._db.read() as db:
            rows = db.execute("SELECT state, COUNT(*) AS n FROM series GROUP BY state").fetchall()
        counts = dict.fromkeys(SeriesState, 0)
        counts.update({SeriesState(r["state"]): int(r["n"]) for r in rows})
        return counts

    def retention_candidates(self) -> list[SeriesRecord]:
        """Finished series with nothing owed to a destination (a result, or its storage
        commitment), oldest first: the only series a retention policy may delete."""
        with self._db.read() as db:
            rows = db.execute(
                "SELECT * FROM series WHERE state IN (?, ?, ?) AND NOT EXISTS ("
                " SELECT 1 FROM outbox WHERE outbox.series_uid = series.series_uid"
                " AND (outbox.state NOT IN (?, ?) OR outbox.commitment IN (?, ?, ?)))"
                " ORDER BY updated",
                (
                    *_FINISHED,
                    OutboxState.SENT,
                    OutboxState.CANCELLED,
                    CommitmentState.OWED,
                    CommitmentState.REQUESTED,
                    CommitmentState.FAILED,
                ),
            ).fetchall()
        return [_record(r) for r in rows]

    # -- completion -------------------------------------------------------------------
    def settle(self, older_than: float, rule: str) -> list[str]:
        """Mark series whose last instance is older than ``older_than`` complete, recording
        ``rule`` as what completed them; their UIDs."""
        with self._db.tx() as db:
            rows = db.execute(
                "SELECT series_uid FROM series WHERE state = ? AND last_received <= ?",
                (SeriesState.RECEIVING, older_than),
            ).fetchall()
            uids = [r["series_uid"] for r in rows]
            now = time.time()
            for uid in uids:
                db.execute(
                    "UPDATE series SET state = ?, updated = ?, completed_by = ?"
                    " WHERE series_uid = ? AND state = ?",
                    (SeriesState.COMPLETE, now, rule, uid, SeriesState.RECEIVING),
                )
        return uids

    def complete(self, series_uid: str, rule: str, instance_count: int) -> bool:
        """Mark a receiving series complete by ``rule``, only if it still holds exactly
        ``instance_count`` instances (the ones the rule looked at). Returns success."""
        with self._db.tx() as db:
            cur = db.execute(
                "UPDATE series SET state = ?, updated = ?, completed_by = ?"
                " WHERE series_uid = ? AND state = ? AND instance_count = ?",
                (
                    SeriesState.COMPLETE,
                    time.time(),
                    rule,
                    series_uid,
                    SeriesState.RECEIVING,
                    instance_count,
                ),
            )
            return cur.rowcount == 1

    # -- jobs -------------------------------------------------------------------------
    def claim(self, series_uid: str) -> tuple[bool, int]:
        """Move a complete series to processing; return (claimed, instance count)."""
        with self._db.tx() as db:
            cur = db.execute(
                "UPDATE series SET state = ?, updated = ?, attempts = attempts + 1, reason = ''"
                " WHERE series_uid = ? AND state = ?",
                (SeriesState.PROCESSING, time.time(), series_uid, SeriesState.COMPLETE),
            )
            row = db.execute(
                "SELECT instance_count FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
        return cur.rowcount == 1, int(row["instance_count"]) if row else 0

    def set_state(
        self,
        series_uid: str,
        state: SeriesState,
        reason: str = "",
        *,
        expect: SeriesState | None = None,
        model: str | None = None,
        instance_count: int | None = None,
    ) -> bool:
        """Change a series' state; with ``expect``, only from that state, and with
        ``instance_count``, only while the series holds that many instances (a job ends
        only for the instances it processed). Returns success."""
        state = SeriesState(state)
        sql = "UPDATE series SET state = ?, reason = ?, updated = ?"
        args: list[object] = [state, reason, time.time()]
        if model is not None:
            sql += ", model = ?"
            args.append(model)
        if state == SeriesState.RECEIVING:
            sql += ", completed_by = ''"
        sql += " WHERE series_uid = ?"
        args.append(series_uid)
        if expect is not None:
            sql += " AND state = ?"
            args.append(expect)
        if instance_count is not None:
            sql += " AND instance_count = ?"
            args.append(instance_count)
        with self._db.tx() as db:
            return db.execute(sql, args).rowcount == 1

    def mark_fetched(self, series_uid: str, source: str) -> None:
        """Record that a fetch retrieved the series from ``source``."""
        with self._db.tx() as db:
            db.execute(
                "UPDATE series SET fetched_from = ? WHERE series_uid = ?", (source, series_uid)
            )

    def record_top_up(self, series_uid: str, what: str) -> None:
        """Record what a top-up added to the series before it was processed (in words)."""
        with self._db.tx() as db:
            db.execute("UPDATE series SET topped_up = ? WHERE series_uid = ?", (what, series_uid))

    def record_timings(self, series_uid: str, timings: dict[str, float]) -> None:
        with self._db.tx() as db:
            db.execute(
                "UPDATE series SET timings = ? WHERE series_uid = ?",
                (json.dumps(timings), series_uid),
            )

    def resume(self) -> int:
        """After a restart: series interrupted while processing are complete again (to be
        processed once more); returns how many."""
        with self._db.tx() as db:
            return db.execute(
                "UPDATE series SET state = ?, updated = ? WHERE state = ?",
                (SeriesState.COMPLETE, time.time(), SeriesState.PROCESSING),
            ).rowcount

    def finish_run(
        self,
        series_uid: str,
        instance_count: int,
        results: SeriesResults,
        items: list[NewOutboxItem],
        predecessors: dict[str, set[str]],
        reason: str = "",
    ) -> FinishOutcome:
        """End a run "done" and queue its results, in one transaction, or queue nothing.

        Only while the series is processing and still holds ``instance_count`` instances
        (instances are only ever added: the count names the set); otherwise the run was
        :attr:`~FinishOutcome.OVERTAKEN`. ``predecessors`` maps each model to the SOP
        Instance UIDs of its earlier, acknowledged results that the new SR names; if others
        were acknowledged since, the outcome is :attr:`~FinishOutcome.STALE_PREDECESSORS`
        (encode again). On success, earlier results not sent yet are cancelled and
        ``items`` are queued. ``reason`` is recorded with the state (a job that found
        nothing says so).
        """
        with self._db.tx() as db:
            row = db.execute(
                "SELECT state, instance_count FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
            if (
                row is None
                or row["state"] != SeriesState.PROCESSING
                or int(row["instance_count"]) != instance_count
            ):
                return FinishOutcome.OVERTAKEN
            for model, expected in predecessors.items():
                sent = {
                    r["sop_uid"]
                    for r in db.execute(
                        "SELECT sop_uid FROM outbox WHERE series_uid = ? AND state = ?"
                        " AND model = ?",
                        (series_uid, OutboxState.SENT, model),
                    )
                }
                if sent != set(expected):
                    return FinishOutcome.STALE_PREDECESSORS
            cancel_unsent(db, series_uid, "cancelled: superseded by a later run")
            for item in items:
                insert(db, item)
            db.execute(
                "UPDATE series SET state = ?, reason = ?, updated = ?, model = ?, results = ?"
                " WHERE series_uid = ?",
                (
                    SeriesState.DONE,
                    reason,
                    time.time(),
                    results.model_names,
                    json.dumps(results.to_json()),
                    series_uid,
                ),
            )
        return FinishOutcome.DONE

    # -- operators --------------------------------------------------------------------
    def retry(self, series_uid: str) -> int:
        """Operator retry: failed results are queued again (their storage commitment asked
        anew once sent); a failed (or unrouted) series is processed again. Returns how many items and series changed."""
        with self._db.tx() as db:
            n = db.execute(
                "UPDATE outbox SET state = ?, attempts = 0, next_attempt = 0, commitment = '',"
                " commit_transaction = '', commit_requests = 0"
                " WHERE series_uid = ? AND state = ?",
                (OutboxState.PENDING, series_uid, OutboxState.FAILED),
            ).rowcount
            n += db.execute(
                "UPDATE series SET state = ?, reason = '', updated = ? WHERE series_uid = ?"
                " AND state IN (?, ?)",
                (
                    SeriesState.COMPLETE,
                    time.time(),
                    series_uid,
                    SeriesState.FAILED,
                    SeriesState.NO_MODEL,
                ),
            ).rowcount
        return n

    def purge(self, series_uid: str) -> list[Path]:
        """Forget a finished series; return its instance paths for the caller to delete.

        Refuses (returns nothing) if the series changed state meanwhile (a late instance).
        """
        with self._db.tx() as db:
            row = db.execute(
                "SELECT state FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
            if row is None or SeriesState(row["state"]) not in _FINISHED:
                return []
            paths = [
                Path(r["path"])
                for r in db.execute(
                    "SELECT path FROM instances WHERE series_uid = ?", (series_uid,)
                )
            ]
            db.execute("DELETE FROM instances WHERE series_uid = ?", (series_uid,))
            db.execute(
                "DELETE FROM commitment_requests WHERE EXISTS (SELECT 1 FROM json_each(item_ids)"
                " WHERE value IN (SELECT id FROM outbox WHERE series_uid = ?))",
                (series_uid,),
            )
            db.execute("DELETE FROM outbox WHERE series_uid = ?", (series_uid,))
            db.execute("DELETE FROM series WHERE series_uid = ?", (series_uid,))
        return paths
