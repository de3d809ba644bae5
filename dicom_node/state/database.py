"""The job database: one SQLite file in WAL mode under ``data_dir``, and its schema.

The spool on disk is the source of truth for received instances (each file is fsynced
before the C-STORE is acknowledged); this database indexes it, and a crash between the two
leaves a spooled file that the node's start re-registers
(:func:`dicom_node.intake.recovery.reconcile`). That split lets commits skip an fsync of
their own (``synchronous=NORMAL``) without ever losing an acknowledged instance.

pynetdicom serves each association on its own thread and SQLite connections are not
shareable across threads by default, so one connection is guarded by a lock. Every
statement is short, so the lock is never held across I/O on DICOM data.

Rows written behind (:meth:`InstanceRepository.record
<dicom_node.state.instances.InstanceRepository.record>`: the rows of instances whose files
are already synced, committed several to a transaction) are committed before any other
read or transaction of this process, by the hooks given to :meth:`Database.catch_up_with`:
whoever reads the database here sees every instance acknowledged so far.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["Database", "DatabaseError", "damaged_message"]

SCHEMA = """
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
    completed_by    TEXT NOT NULL DEFAULT '',
    fetched_from    TEXT NOT NULL DEFAULT '',
    topped_up       TEXT NOT NULL DEFAULT ''
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
    commitment          TEXT NOT NULL DEFAULT '',
    commit_transaction  TEXT NOT NULL DEFAULT '',
    commit_since        REAL NOT NULL DEFAULT 0,
    commit_requests     INTEGER NOT NULL DEFAULT 0,
    commit_reason       TEXT NOT NULL DEFAULT '',
    UNIQUE (sop_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_by_series ON outbox(series_uid);
CREATE INDEX IF NOT EXISTS outbox_by_commitment ON outbox(commitment);
CREATE TABLE IF NOT EXISTS commitment_requests (
    transaction_uid  TEXT PRIMARY KEY,
    destination      TEXT NOT NULL,
    item_ids         TEXT NOT NULL,
    requested_at     REAL NOT NULL,
    reported_at      REAL,
    reporter         TEXT NOT NULL DEFAULT '',
    outcome          TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS fetches (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    source        TEXT NOT NULL,
    study_uid     TEXT NOT NULL,
    series_uid    TEXT NOT NULL DEFAULT '',
    requested_by  TEXT NOT NULL DEFAULT '',
    state         TEXT NOT NULL,
    reason        TEXT NOT NULL DEFAULT '',
    series        TEXT NOT NULL DEFAULT '[]',
    created       REAL NOT NULL,
    updated       REAL NOT NULL
);
"""


class DatabaseError(RuntimeError):
    """The job database cannot be opened or used; the message says why and what to do."""


#: SQLite's result codes for a file that is not (or no longer) a whole database.
_DAMAGED = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})


def damaged_message(path: Path, detail: str) -> str:
    """What to do with a damaged job database, in one sentence.

    The spool is the source of truth: moved aside, the database is made anew at the next
    start and every spooled instance registered again
    (:func:`dicom_node.intake.recovery.reconcile`), its series processed once more.
    """
    return (
        f"the job database {path} is damaged ({detail}); stop the node, move {path.name} and "
        f"its -wal and -shm files aside, and start again: the spool is kept and its "
        "instances are registered anew (their series are processed and sent once more)"
    )


class Database:
    """One connection to the job database, shared by the repositories."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise DatabaseError(f"the job database {self.path} cannot be opened: {exc}") from None
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._check_intact()
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if getattr(exc, "sqlite_errorname", "") in _DAMAGED:
                raise DatabaseError(damaged_message(self.path, str(exc))) from None
            raise DatabaseError(f"the job database {self.path} cannot be used: {exc}") from None
        self._catch_up: list[Callable[[], None]] = []
        self._catching_up = False  # only read and set under the lock

    def _check_intact(self) -> None:
        """``PRAGMA quick_check``: every page of a truncated or damaged file is found at
        start (half a second for a 150 MB database) rather than by a C-STORE later."""
        (first,) = self._db.execute("PRAGMA quick_check(1)").fetchone()
        if first != "ok":
            lines = [line for line in first.splitlines() if not line.startswith("***")]
            raise DatabaseError(damaged_message(self.path, " ".join(lines)[:200]))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the connection's lock across several transactions and reads."""
        with self._lock:
            yield

    def catch_up_with(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` (which commits rows written behind) before every other read and
        transaction; it is not run again from within itself."""
        self._catch_up.append(hook)

    def _caught_up(self) -> None:
        if self._catching_up or not self._catch_up:
            return
        self._catching_up = True
        try:
            for hook in self._catch_up:
                hook()
        finally:
            self._catching_up = False

    @contextmanager
    def tx(self, catch_up: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``): committed whole or rolled back.

        ``catch_up=False``: without committing the rows written behind first (the
        transaction that commits them).
        """
        with self._lock:
            if catch_up:
                self._caught_up()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def read(self, catch_up: bool = True) -> Iterator[sqlite3.Connection]:
        """The connection for reads (autocommit: each statement sees committed data).

        ``catch_up=False`` reads without committing the rows written behind first: for a
        caller that looks at those rows itself (the C-STORE's duplicate rule).
        """
        with self._lock:
            if catch_up:
                self._caught_up()
            yield self._db
