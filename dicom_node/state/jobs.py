"""The job database: every series the node knows, its instances, and the results it owes.

SQLite in WAL mode, one file under ``data_dir``. The spool on disk is the source of truth
for received instances (each file is fsynced before the C-STORE is acknowledged); this
database indexes it, and :meth:`JobStore.reconcile` re-registers any spooled file a crash
left unrecorded. That split lets commits skip an fsync of their own without ever losing an
acknowledged instance.

Series states::

    receiving -> complete -> processing -> done
                                       \\-> failed (with a reason)
                                       \\-> no_model (stored, no routing rule matched)

Results owed to destinations live in ``outbox`` with their own states
(pending -> sent | failed | cancelled), so that a result acknowledged by a PACS is never
sent again.

Results are a unit: one run of one series at one instance count. A job's results enter the
outbox in the transaction that ends it "done" (:meth:`JobStore.finish_run`), and only while
the series still holds the instances the job processed; a run overtaken by new instances
queues nothing. Results of an earlier run that were not sent yet are cancelled then (and as
soon as a new instance reaches a done series); those already acknowledged are named by the
new run's SR as its predecessors.

Why one module of this size: it is the database's one schema and every transaction on
it. A job's state and its outbox items change together, in single transactions
(:meth:`JobStore.finish_run`), so the queries that keep them consistent stay side by side.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.state.results import SeriesResults

RECEIVING = "receiving"
COMPLETE = "complete"
PROCESSING = "processing"
DONE = "done"
FAILED = "failed"
NO_MODEL = "no_model"
SERIES_STATES = (RECEIVING, COMPLETE, PROCESSING, DONE, FAILED, NO_MODEL)

PENDING = "pending"
SENT = "sent"
#: An outbox item of an earlier run that was not sent before the series changed: never sent.
CANCELLED = "cancelled"

#: :meth:`JobStore.finish_run` outcomes besides ``DONE``.
OVERTAKEN = "overtaken"  # the series no longer holds the instances the run processed
STALE_PREDECESSORS = "stale predecessors"  # an earlier result was acknowledged meanwhile

#: Columns added after the first release, with their definitions: an older database gets
#: them on open (``ALTER TABLE ... ADD COLUMN``), its existing rows the default.
_ADDED_COLUMNS = (
    ("series", "completed_by", "TEXT NOT NULL DEFAULT ''"),
    ("instances", "geometry", "TEXT NOT NULL DEFAULT ''"),
    ("outbox", "model", "TEXT NOT NULL DEFAULT ''"),
    ("outbox", "form", "TEXT NOT NULL DEFAULT ''"),
    ("outbox", "alt_path", "TEXT NOT NULL DEFAULT ''"),
    ("outbox", "alt_sop_uid", "TEXT NOT NULL DEFAULT ''"),
    ("outbox", "sent_as", "TEXT NOT NULL DEFAULT ''"),
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid      TEXT PRIMARY KEY,
    study_uid       TEXT NOT NULL,
    modality        TEXT NOT NULL DEFAULT '',
    calling_ae      TEXT NOT NULL DEFAULT '',
    state           TEXT NOT NULL,
    reason          TEXT NOT NULL DEFAULT '',
    instance_count  INTEGER NOT NULL DEFAULT 0,
    first_received  REAL NOT NULL,
    last_received   REAL NOT NULL,
    updated         REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    model           TEXT NOT NULL DEFAULT '',
    timings         TEXT NOT NULL DEFAULT '{}',
    results         TEXT NOT NULL DEFAULT '{}',
    completed_by    TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid     TEXT PRIMARY KEY,
    series_uid  TEXT NOT NULL REFERENCES series(series_uid),
    sop_class   TEXT NOT NULL,
    path        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    digest      TEXT NOT NULL,
    received    REAL NOT NULL,
    geometry    TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS outbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid    TEXT NOT NULL,
    kind          TEXT NOT NULL,
    destination   TEXT NOT NULL,
    path          TEXT NOT NULL,
    sop_uid       TEXT NOT NULL,
    state         TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_attempt  REAL NOT NULL DEFAULT 0,
    last_error    TEXT NOT NULL DEFAULT '',
    sent_at       REAL,
    model         TEXT NOT NULL DEFAULT '',
    form          TEXT NOT NULL DEFAULT '',
    alt_path      TEXT NOT NULL DEFAULT '',
    alt_sop_uid   TEXT NOT NULL DEFAULT '',
    sent_as       TEXT NOT NULL DEFAULT '',
    UNIQUE (sop_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_by_series ON outbox(series_uid);
"""


@dataclass
class SeriesRecord:
    """One row of the series table, as ``dicom-node jobs`` shows it."""

    series_uid: str
    study_uid: str
    modality: str
    calling_ae: str
    state: str
    reason: str
    instance_count: int
    first_received: float
    last_received: float
    updated: float
    attempts: int
    model: str
    timings: dict[str, float] = field(default_factory=dict)
    results: SeriesResults = field(default_factory=SeriesResults)
    #: The rule that last marked the series complete ("association released" or "settle
    #: timer", :mod:`dicom_node.series.completion`); empty while it is receiving.
    completed_by: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["results"] = self.results.to_json()
        return d


@dataclass
class OutboxItem:
    """A result file owed to one destination.

    A SEG (and the SR that names it) may come in two forms: ``path`` is the one offered
    first (``form``: "labelmap" or "binary"; empty where there is no choice) and
    ``alt_path`` the binary form sent where the destination refuses a Label Map SEG. Once
    acknowledged, ``path`` and ``sop_uid`` are those of the object the destination took
    and ``sent_as`` says which form it was.
    """

    id: int
    series_uid: str
    kind: str
    destination: str
    path: str
    sop_uid: str
    state: str
    attempts: int
    next_attempt: float
    last_error: str
    sent_at: float | None
    model: str = ""
    form: str = ""
    alt_path: str = ""
    alt_sop_uid: str = ""
    sent_as: str = ""


class InstanceConflict(Exception):
    """The SOP Instance UID is already stored with different content."""


class JobStore:
    """Thread-safe access to the job database.

    pynetdicom serves each association on its own thread; SQLite connections are not
    shareable across threads by default, so one connection is guarded by a lock. Every
    statement here is short, so the lock is never held across I/O on DICOM data.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)
        for table, column, definition in _ADDED_COLUMNS:
            have = {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- instances ------------------------------------------------------------------
    def find_instance(self, sop_uid: str) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute(
                "SELECT * FROM instances WHERE sop_uid = ?", (sop_uid,)
            ).fetchone()

    def add_instance(
        self,
        *,
        sop_uid: str,
        sop_class: str,
        series_uid: str,
        study_uid: str,
        modality: str,
        calling_ae: str,
        path: Path,
        size: int,
        digest: str,
        received: float | None = None,
        geometry: str = "",
    ) -> tuple[bool, str | None]:
        """Record a stored instance; return (is_new, previous series state).

        A series that was finished (done, failed, no model) and receives a new instance goes
        back to ``receiving`` and will be processed again with all its instances.
        ``geometry`` is the instance's :class:`~dicom_node.series.completion.SliceGeometry` as
        JSON: kept here so that the completion check at a release reads no file.
        """
        now = received if received is not None else time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT digest FROM instances WHERE sop_uid = ?", (sop_uid,)
            ).fetchone()
            if row is not None:
                if row["digest"] != digest:
                    raise InstanceConflict(sop_uid)
                return False, None
            series = db.execute(
                "SELECT state FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
            if series is None:
                db.execute(
                    "INSERT INTO series (series_uid, study_uid, modality, calling_ae, state,"
                    " instance_count, first_received, last_received, updated)"
                    " VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)",
                    (series_uid, study_uid, modality, calling_ae, RECEIVING, now, now, now),
                )
                previous = None
            else:
                previous = series["state"]
            db.execute(
                "INSERT INTO instances (sop_uid, series_uid, sop_class, path, size, digest,"
                " received, geometry) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (sop_uid, series_uid, sop_class, str(path), size, digest, now, geometry),
            )
            if previous == DONE:
                # results of the instances it held until now are not results of the series
                # any more: what was not sent yet never will be (the next run supersedes)
                _cancel_unsent(db, series_uid, "cancelled: new instances arrived")
            new_state = (
                RECEIVING
                if previous in (None, RECEIVING, COMPLETE, DONE, FAILED, NO_MODEL)
                else previous
            )
            db.execute(
                "UPDATE series SET instance_count = instance_count + 1, last_received = ?,"
                " updated = ?, state = ?, reason = CASE WHEN ? = state THEN reason ELSE '' END,"
                " completed_by = CASE WHEN ? = ? THEN '' ELSE completed_by END"
                " WHERE series_uid = ?",
                (now, now, new_state, new_state, new_state, RECEIVING, series_uid),
            )
            return True, previous

    def instance_paths(self, series_uid: str) -> list[Path]:
        with self._lock:
            rows = self._db.execute(
                "SELECT path FROM instances WHERE series_uid = ? ORDER BY received, sop_uid",
                (series_uid,),
            ).fetchall()
        return [Path(r["path"]) for r in rows]

    def receiving_geometry(self, series_uid: str) -> tuple[int, list[str]] | None:
        """(instance count, each instance's geometry JSON) of a series that is receiving;
        ``None`` when it is in any other state (nothing to complete)."""
        with self._lock:
            row = self._db.execute(
                "SELECT instance_count FROM series WHERE series_uid = ? AND state = ?",
                (series_uid, RECEIVING),
            ).fetchone()
            if row is None:
                return None
            rows = self._db.execute(
                "SELECT geometry FROM instances WHERE series_uid = ?", (series_uid,)
            ).fetchall()
        return int(row["instance_count"]), [r["geometry"] for r in rows]

    def known_paths(self) -> set[str]:
        with self._lock:
            return {r["path"] for r in self._db.execute("SELECT path FROM instances")}

    # -- series ---------------------------------------------------------------------
    def get_series(self, series_uid: str) -> SeriesRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
        return _series(row) if row else None

    def list_series(self, state: str | None = None) -> list[SeriesRecord]:
        with self._lock:
            if state is None:
                rows = self._db.execute("SELECT * FROM series ORDER BY first_received").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM series WHERE state = ? ORDER BY first_received", (state,)
                ).fetchall()
        return [_series(r) for r in rows]

    def series_count(self, series_uid: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT instance_count FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
        return int(row["instance_count"]) if row else 0

    def settle(self, older_than: float, rule: str = "settle timer") -> list[str]:
        """Mark series whose last instance is older than ``older_than`` as complete,
        recording ``rule`` as what completed them."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT series_uid FROM series WHERE state = ? AND last_received <= ?",
                (RECEIVING, older_than),
            ).fetchall()
            uids = [r["series_uid"] for r in rows]
            now = time.time()
            for uid in uids:
                db.execute(
                    "UPDATE series SET state = ?, updated = ?, completed_by = ?"
                    " WHERE series_uid = ? AND state = ?",
                    (COMPLETE, now, rule, uid, RECEIVING),
                )
        return uids

    def complete(self, series_uid: str, rule: str, instance_count: int) -> bool:
        """Mark a receiving series complete by ``rule``, only if it still holds exactly
        ``instance_count`` instances (the ones the rule looked at). Returns success."""
        with self._tx() as db:
            return (
                db.execute(
                    "UPDATE series SET state = ?, updated = ?, completed_by = ?"
                    " WHERE series_uid = ? AND state = ? AND instance_count = ?",
                    (COMPLETE, time.time(), rule, series_uid, RECEIVING, instance_count),
                ).rowcount
                == 1
            )

    def claim(self, series_uid: str) -> tuple[bool, int]:
        """Move a complete series to processing; return (claimed, instance count)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE series SET state = ?, updated = ?, attempts = attempts + 1, reason = ''"
                " WHERE series_uid = ? AND state = ?",
                (PROCESSING, time.time(), series_uid, COMPLETE),
            )
            row = db.execute(
                "SELECT instance_count FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
        return cur.rowcount == 1, int(row["instance_count"]) if row else 0

    def set_state(
        self,
        series_uid: str,
        state: str,
        reason: str = "",
        *,
        expect: str | None = None,
        model: str | None = None,
        instance_count: int | None = None,
    ) -> bool:
        """Change a series' state; with ``expect``, only from that state, and with
        ``instance_count``, only while the series holds that many instances (a job ends
        "done" only for the instances it processed). Returns success."""
        if state not in SERIES_STATES:
            raise ValueError(f"unknown series state {state!r}")
        sql = "UPDATE series SET state = ?, reason = ?, updated = ?"
        args: list[Any] = [state, reason, time.time()]
        if model is not None:
            sql += ", model = ?"
            args.append(model)
        if state == RECEIVING:
            sql += ", completed_by = ''"
        sql += " WHERE series_uid = ?"
        args.append(series_uid)
        if expect is not None:
            sql += " AND state = ?"
            args.append(expect)
        if instance_count is not None:
            sql += " AND instance_count = ?"
            args.append(instance_count)
        with self._tx() as db:
            return db.execute(sql, args).rowcount == 1

    def record_timings(self, series_uid: str, timings: dict[str, float]) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE series SET timings = ? WHERE series_uid = ?",
                (json.dumps(timings), series_uid),
            )

    def resume(self) -> dict[str, int]:
        """After a restart: series interrupted while processing are processed again."""
        with self._tx() as db:
            n = db.execute(
                "UPDATE series SET state = ?, updated = ? WHERE state = ?",
                (COMPLETE, time.time(), PROCESSING),
            ).rowcount
        return {"reprocess": n}

    # -- outbox ---------------------------------------------------------------------
    def enqueue_result(
        self,
        *,
        series_uid: str,
        kind: str,
        destination: str,
        path: Path,
        sop_uid: str,
        model: str = "",
        form: str = "",
        alt_path: Path | str = "",
        alt_sop_uid: str = "",
    ) -> None:
        with self._tx() as db:
            _enqueue(
                db, series_uid, kind, destination, path, sop_uid, model, form, alt_path, alt_sop_uid
            )

    def sent_results(self, series_uid: str, model: str | None = None) -> list[OutboxItem]:
        """Results of the series acknowledged by some destination (one item per SOP
        Instance UID), optionally of one model: what a new run supersedes."""
        sql = "SELECT * FROM outbox WHERE series_uid = ? AND state = ?"
        args: list[Any] = [series_uid, SENT]
        if model is not None:
            sql += " AND model = ?"
            args.append(model)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        seen: dict[str, OutboxItem] = {}
        for r in rows:
            seen.setdefault(r["sop_uid"], OutboxItem(**dict(r)))
        return list(seen.values())

    def finish_run(
        self,
        series_uid: str,
        instance_count: int,
        results: SeriesResults,
        items: list[dict[str, Any]],
        predecessors: dict[str, set[str]],
    ) -> str:
        """End a run "done" and queue its results, in one transaction, or queue nothing.

        Only while the series is processing and still holds ``instance_count`` instances
        (instances are only ever added: the count names the set); otherwise returns
        :data:`OVERTAKEN`. ``predecessors`` maps each model to the SOP Instance UIDs of its
        earlier, acknowledged results that the new SR names; if others were acknowledged
        since, returns :data:`STALE_PREDECESSORS` (encode again). On success, earlier
        results not sent yet are cancelled, ``items`` (keyword arguments of
        :meth:`enqueue_result`) are queued, and :data:`DONE` is returned.
        """
        with self._tx() as db:
            row = db.execute(
                "SELECT state, instance_count FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
            if (
                row is None
                or row["state"] != PROCESSING
                or (int(row["instance_count"]) != instance_count)
            ):
                return OVERTAKEN
            for model, expected in predecessors.items():
                sent = {
                    r["sop_uid"]
                    for r in db.execute(
                        "SELECT sop_uid FROM outbox WHERE series_uid = ? AND state = ?"
                        " AND model = ?",
                        (series_uid, SENT, model),
                    )
                }
                if sent != set(expected):
                    return STALE_PREDECESSORS
            _cancel_unsent(db, series_uid, "cancelled: superseded by a later run")
            for item in items:
                _enqueue(db, **item)
            db.execute(
                "UPDATE series SET state = ?, reason = '', updated = ?, model = ?, results = ?"
                " WHERE series_uid = ?",
                (
                    DONE,
                    time.time(),
                    results.model_names,
                    json.dumps(results.to_json()),
                    series_uid,
                ),
            )
        return DONE

    def due_results(self, now: float | None = None) -> list[OutboxItem]:
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM outbox WHERE state = ? AND next_attempt <= ? ORDER BY id",
                (PENDING, now),
            ).fetchall()
        return [OutboxItem(**dict(r)) for r in rows]

    def outbox(self, series_uid: str | None = None) -> list[OutboxItem]:
        with self._lock:
            if series_uid is None:
                rows = self._db.execute("SELECT * FROM outbox ORDER BY id").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM outbox WHERE series_uid = ? ORDER BY id", (series_uid,)
                ).fetchall()
        return [OutboxItem(**dict(r)) for r in rows]

    def listing(self) -> list[dict[str, Any]]:
        """Every series with what it owes each destination, as ``dicom-node jobs --json``
        prints it."""
        rows = []
        for rec in self.list_series():
            row = rec.to_dict()
            row["outbox"] = [
                {
                    "kind": o.kind,
                    "destination": o.destination,
                    "state": o.state,
                    "attempts": o.attempts,
                    "last_error": o.last_error,
                    "sent_as": o.sent_as,
                }
                for o in self.outbox(rec.series_uid)
            ]
            rows.append(row)
        return rows

    def mark_sent(
        self, item_id: int, sent_at: float | None = None, alternative: bool = False
    ) -> None:
        """Record an acknowledgement (whatever the item's state: a cancelled item whose
        send was already under way was still received by the destination).

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
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET state = ?, sent_at = ?, attempts = attempts + 1,"
                f" last_error = ''{swap} WHERE id = ? AND state != ?",
                (SENT, sent_at or time.time(), item_id, SENT),
            )

    def sent_form(self, series_uid: str, model: str, destination: str, kind: str) -> str | None:
        """Which form (``sent_as``) a destination took of a result of this series and
        model, or ``None`` when it took none yet: an SR follows the form of its SEG."""
        with self._lock:
            row = self._db.execute(
                "SELECT sent_as FROM outbox WHERE series_uid = ? AND model = ? AND"
                " destination = ? AND kind = ? AND state = ? ORDER BY id DESC LIMIT 1",
                (series_uid, model, destination, kind, SENT),
            ).fetchone()
        return None if row is None else str(row["sent_as"])

    def mark_attempt_failed(
        self, item_id: int, error: str, next_attempt: float, give_up: bool
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt = ?,"
                " state = ? WHERE id = ?",
                (error, next_attempt, FAILED if give_up else PENDING, item_id),
            )

    def retry(self, series_uid: str) -> int:
        """Operator retry: failed results are re-queued; a failed series is processed again."""
        with self._tx() as db:
            n = db.execute(
                "UPDATE outbox SET state = ?, attempts = 0, next_attempt = 0"
                " WHERE series_uid = ? AND state = ?",
                (PENDING, series_uid, FAILED),
            ).rowcount
            n += db.execute(
                "UPDATE series SET state = ?, reason = '', updated = ? WHERE series_uid = ?"
                " AND state IN (?, ?)",
                (COMPLETE, time.time(), series_uid, FAILED, NO_MODEL),
            ).rowcount
        return n

    def retention_candidates(self) -> list[SeriesRecord]:
        """Finished series (done, failed, no model) with nothing owed to a destination,
        oldest first: the only series a retention policy may delete."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM series WHERE state IN (?, ?, ?) AND NOT EXISTS ("
                " SELECT 1 FROM outbox WHERE outbox.series_uid = series.series_uid"
                " AND outbox.state NOT IN (?, ?)) ORDER BY updated",
                (DONE, FAILED, NO_MODEL, SENT, CANCELLED),
            ).fetchall()
        return [_series(r) for r in rows]

    def purge(self, series_uid: str) -> list[Path]:
        """Forget a finished series; return its instance paths for the caller to delete.

        Refuses (returns nothing) if the series changed state meanwhile (a late instance).
        """
        with self._tx() as db:
            row = db.execute(
                "SELECT state FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
            if row is None or row["state"] not in (DONE, FAILED, NO_MODEL):
                return []
            paths = [
                Path(r["path"])
                for r in db.execute(
                    "SELECT path FROM instances WHERE series_uid = ?", (series_uid,)
                )
            ]
            db.execute("DELETE FROM instances WHERE series_uid = ?", (series_uid,))
            db.execute("DELETE FROM outbox WHERE series_uid = ?", (series_uid,))
            db.execute("DELETE FROM series WHERE series_uid = ?", (series_uid,))
        return paths

    def queue_depth(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT state, COUNT(*) AS n FROM series GROUP BY state"
            ).fetchall()
            pending = self._db.execute(
                "SELECT COUNT(*) AS n FROM outbox WHERE state = ?", (PENDING,)
            ).fetchone()
        counts = {s: 0 for s in SERIES_STATES}
        counts.update({r["state"]: r["n"] for r in rows})
        counts["outbox_pending"] = pending["n"]
        return counts


def _cancel_unsent(db: sqlite3.Connection, series_uid: str, why: str) -> None:
    db.execute(
        "UPDATE outbox SET state = ?, last_error = ? WHERE series_uid = ? AND state IN (?, ?)",
        (CANCELLED, why, series_uid, PENDING, FAILED),
    )


def _enqueue(
    db: sqlite3.Connection,
    series_uid: str,
    kind: str,
    destination: str,
    path: Path | str,
    sop_uid: str,
    model: str = "",
    form: str = "",
    alt_path: Path | str = "",
    alt_sop_uid: str = "",
) -> None:
    db.execute(
        "INSERT OR IGNORE INTO outbox (series_uid, kind, destination, path, sop_uid, state,"
        " model, form, alt_path, alt_sop_uid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            series_uid,
            kind,
            destination,
            str(path),
            sop_uid,
            PENDING,
            model,
            form,
            str(alt_path),
            alt_sop_uid,
        ),
    )


def _series(row: sqlite3.Row) -> SeriesRecord:
    d = dict(row)
    d["timings"] = json.loads(d["timings"] or "{}")
    d["results"] = SeriesResults.from_json(json.loads(d["results"] or "{}"))
    return SeriesRecord(**d)
