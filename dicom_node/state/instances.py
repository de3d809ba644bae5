"""Instances: every stored SOP instance, its spool file, digest and slice geometry.

Adding an instance also keeps its series' row: it creates the series on its first
instance, counts it, and makes a finished series receive again (its unsent results are
cancelled then: they are not results of the series any more).

The C-STORE path writes its rows behind (:meth:`InstanceRepository.record`): an instance's
file is synced before its C-STORE is answered, and the spool is the source of truth
(:mod:`dicom_node.intake.recovery` registers a synced file whose row a crash lost), so its
row need not be committed before the answer. A thread of this repository commits the rows
queued meanwhile in one transaction, and every other read or transaction of the process
commits them first (:meth:`Database.catch_up_with
<dicom_node.state.database.Database.catch_up_with>`): completion, jobs and pages never see
the database without an instance already acknowledged.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from dicom_node.state.database import Database
from dicom_node.state.outbox import cancel_unsent
from dicom_node.state.states import SeriesState

log = logging.getLogger("dicom_node.state")

#: After a failed commit of the rows written behind, wait this long before the next try.
_RETRY_SECONDS = 1.0
#: Once woken by a row, the writer gathers the rows queued this long before it commits them:
#: a transaction and a wake-up per few instances rather than per instance, each taking the
#: interpreter from the associations receiving (four at once gained 7 to 14%). A
#: read or a transaction of the database commits them at once (:meth:`flush`), and
#: :meth:`InstanceRepository.settle` has the writer commit without gathering.
GATHER_SECONDS = 0.02

__all__ = ["InstanceConflict", "InstanceRepository", "NewInstance", "StoredInstance"]


class InstanceConflict(Exception):
    """The SOP Instance UID is already stored with different content."""


@dataclass(frozen=True)
class NewInstance:
    """A stored instance to record. ``geometry`` is its
    :class:`~dicom_node.intake.geometry.SliceGeometry` as JSON: kept here so that the
    completion check at a release reads no file."""

    sop_uid: str
    sop_class: str
    series_uid: str
    study_uid: str
    modality: str
    calling_ae: str
    path: Path
    size: int
    digest: str
    received: float | None = None
    geometry: str = ""


@dataclass(frozen=True)
class StoredInstance:
    """A recorded instance: where its file is and the digest of its data set."""

    sop_uid: str
    series_uid: str
    path: str
    digest: str


#: Called with each row written behind once it is committed, and the state its series had
#: before it (``None``: the series is new).
Recorded = Callable[[NewInstance, "SeriesState | None"], None]


class InstanceRepository:
    """Queries and updates of the instances (and the series row each one counts in)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        #: Rows written behind and not committed yet, by SOP Instance UID.
        self._pending: dict[str, NewInstance] = {}
        self._pending_per_series: Counter[str] = Counter()
        self._pending_lock = threading.Lock()
        self._wake = threading.Event()
        #: Set to have the writer commit without gathering (:meth:`settle`).
        self._hurry = threading.Event()
        #: Notified whenever committed rows leave the queue.
        self._committed = threading.Condition(self._pending_lock)
        self._closing = False
        self._writer: threading.Thread | None = None
        #: Told of each row written behind once it is committed (the SCP's log lines).
        self.on_recorded: Recorded | None = None
        db.catch_up_with(self.flush)

    def find(self, sop_uid: str) -> StoredInstance | None:
        """The stored instance of ``sop_uid``, its row committed or still written behind."""
        pending = self._pending.get(sop_uid)
        if pending is not None:
            return StoredInstance(sop_uid, pending.series_uid, str(pending.path), pending.digest)
        with self._db.read(catch_up=False) as db:
            row = db.execute(
                "SELECT sop_uid, series_uid, path, digest FROM instances WHERE sop_uid = ?",
                (sop_uid,),
            ).fetchone()
        if row is None:  # committed meanwhile, between the two looks
            pending = self._pending.get(sop_uid)
            if pending is not None:
                return StoredInstance(
                    sop_uid, pending.series_uid, str(pending.path), pending.digest
                )
        return None if row is None else StoredInstance(**dict(row))

    def count(self, series_uid: str) -> int:
        """How many instances the series holds, rows written behind included (0 for an
        unknown series); commits nothing."""
        with self._db.read(catch_up=False) as db:  # the lock a flush holds throughout
            row = db.execute(
                "SELECT instance_count FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
            with self._pending_lock:
                queued = self._pending_per_series[series_uid]
        return (int(row["instance_count"]) if row else 0) + queued

    def set_digest(self, sop_uid: str, digest: str) -> None:
        """Keep the digest of a recorded instance stored without one (computed when a
        second C-STORE of it came). Only a saving for the next one: a row still written
        behind, or a database that refuses the update, keeps its empty digest."""
        if sop_uid in self._pending:
            return
        try:
            with self._db.tx(catch_up=False) as db:
                db.execute(
                    "UPDATE instances SET digest = ? WHERE sop_uid = ? AND digest = ''",
                    (digest, sop_uid),
                )
        except sqlite3.Error:
            pass

    # -- written behind ---------------------------------------------------------------
    def record(self, instance: NewInstance) -> None:
        """Queue the row of an instance whose file is already durable; it is committed by
        this repository's thread, with the others queued meanwhile, or before any other
        read or transaction of the database, whichever comes first.

        The caller keeps one SOP Instance UID from being recorded twice (:meth:`find`
        sees queued rows): :meth:`add` would refuse the second row as a conflict.
        """
        if instance.received is None:
            instance = replace(instance, received=time.time())
        with self._pending_lock:
            self._pending[instance.sop_uid] = instance
            self._pending_per_series[instance.series_uid] += 1
            if self._writer is None and not self._closing:
                self._writer = threading.Thread(
                    target=self._write_behind, name="dicom-node-instances", daemon=True
                )
                self._writer.start()
        self._wake.set()

    def flush(self) -> None:
        """Commit every row written behind so far, in one transaction.

        An ``sqlite3.Error`` propagates and the rows stay queued for the next try (their
        files are in the spool whatever happens: a restart registers them).
        """
        if not self._pending:
            return
        # Under the database's lock from the first insert until the rows leave the queue:
        # a reader never sees an instance twice (committed and queued) or not at all.
        with self._db.exclusive():
            with self._db.tx(catch_up=False) as db:
                with self._pending_lock:
                    batch = list(self._pending.values())
                recorded = []
                for i in batch:
                    try:
                        recorded.append((i, self._insert(db, i)))
                    except InstanceConflict:  # pragma: no cover - prevented by the caller
                        log.error("instance %s: other content is recorded already", i.sop_uid)
            with self._pending_lock:
                for i in batch:
                    if self._pending.get(i.sop_uid) is i:
                        del self._pending[i.sop_uid]
                        self._pending_per_series[i.series_uid] -= 1
                        if self._pending_per_series[i.series_uid] <= 0:
                            del self._pending_per_series[i.series_uid]
                self._committed.notify_all()
        if self.on_recorded is not None:
            for i, (new, previous) in recorded:
                if new:
                    self.on_recorded(i, previous)

    def close(self) -> None:
        """Commit what is written behind and stop the thread that commits it."""
        with self._pending_lock:
            self._closing = True
            writer = self._writer
        self._hurry.set()
        self._wake.set()
        if writer is not None:
            writer.join(timeout=30)
        try:
            self.flush()
        except sqlite3.Error as exc:
            log.error(
                "%d stored instance(s) not recorded in the job database (%s); the next start "
                "registers them from the spool",
                len(self._pending),
                exc,
            )

    def settle(self, timeout: float) -> bool:
        """Have the rows queued so far committed now, waiting up to ``timeout`` seconds for
        it; whether they were (not when the database stays locked meanwhile: they are then
        committed later, as any row written behind)."""
        with self._pending_lock:
            queued = set(self._pending)
            if not queued:
                return True
            self._hurry.set()
            self._wake.set()
            return self._committed.wait_for(
                lambda: queued.isdisjoint(self._pending), timeout=timeout
            )

    def _write_behind(self) -> None:
        while True:
            self._wake.wait()
            if not self._closing:
                self._hurry.wait(GATHER_SECONDS)
            self._hurry.clear()
            self._wake.clear()
            try:
                self.flush()
            except sqlite3.Error as exc:
                log.error(
                    "cannot record %d stored instance(s) in the job database yet (%s); "
                    "retrying (their files are in the spool)",
                    len(self._pending),
                    exc,
                )
                if self._closing:
                    return
                time.sleep(_RETRY_SECONDS)
                self._wake.set()
            if self._closing:
                return

    def add(self, instance: NewInstance) -> tuple[bool, SeriesState | None]:
        """Record a stored instance; return (is new, the series' state before it).

        A series that was finished (done, failed, no model) and receives a new instance goes
        back to ``receiving`` and will be processed again with all its instances.
        """
        with self._db.tx() as db:
            return self._insert(db, instance)

    def _insert(
        self, db: sqlite3.Connection, instance: NewInstance
    ) -> tuple[bool, SeriesState | None]:
        """:meth:`add`'s statements, in the caller's transaction."""
        i = instance
        now = i.received if i.received is not None else time.time()
        row = db.execute("SELECT digest FROM instances WHERE sop_uid = ?", (i.sop_uid,)).fetchone()
        if row is not None:
            # an empty digest is one not computed yet: no evidence of other content
            if row["digest"] != i.digest and row["digest"] and i.digest:
                raise InstanceConflict(i.sop_uid)
            return False, None
        series = db.execute(
            "SELECT state FROM series WHERE series_uid = ?", (i.series_uid,)
        ).fetchone()
        previous = None if series is None else SeriesState(series["state"])
        if previous is None:
            db.execute(
                "INSERT INTO series (series_uid, study_uid, modality, calling_ae, state,"
                " instance_count, first_received, last_received, updated)"
                " VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)",
                (
                    i.series_uid,
                    i.study_uid,
                    i.modality,
                    i.calling_ae,
                    SeriesState.RECEIVING,
                    now,
                    now,
                    now,
                ),
            )
        db.execute(
            "INSERT INTO instances (sop_uid, series_uid, sop_class, path, size, digest,"
            " received, geometry) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                i.sop_uid,
                i.series_uid,
                i.sop_class,
                str(i.path),
                i.size,
                i.digest,
                now,
                i.geometry,
            ),
        )
        if previous == SeriesState.DONE:
            # results of the instances it held until now are not results of the series
            # any more: what was not sent yet never will be (the next run supersedes)
            cancel_unsent(db, i.series_uid, "cancelled: new instances arrived")
        # a job under way keeps its state: it notices the new instance when it ends
        new_state = previous if previous == SeriesState.PROCESSING else SeriesState.RECEIVING
        db.execute(
            "UPDATE series SET instance_count = instance_count + 1, last_received = ?,"
            " updated = ?, state = ?, reason = CASE WHEN ? = state THEN reason ELSE '' END,"
            " completed_by = CASE WHEN ? = ? THEN '' ELSE completed_by END"
            " WHERE series_uid = ?",
            (now, now, new_state, new_state, new_state, SeriesState.RECEIVING, i.series_uid),
        )
        return True, previous

    def paths(self, series_uid: str) -> list[Path]:
        """The series' spool files, in the order they were received."""
        with self._db.read() as db:
            rows = db.execute(
                "SELECT path FROM instances WHERE series_uid = ? ORDER BY received, sop_uid",
                (series_uid,),
            ).fetchall()
        return [Path(r["path"]) for r in rows]

    def any_in_study(self, study_uid: str) -> Path | None:
        """The spool file of one instance of the study, or ``None`` (for the patient an
        audit message names)."""
        with self._db.read() as db:
            row = db.execute(
                "SELECT i.path FROM instances i JOIN series s ON s.series_uid = i.series_uid"
                " WHERE s.study_uid = ? LIMIT 1",
                (study_uid,),
            ).fetchone()
        return Path(row["path"]) if row is not None else None

    def sop_uids(self, series_uid: str) -> set[str]:
        """The SOP Instance UIDs the series holds (what a top-up need not retrieve)."""
        with self._db.read() as db:
            rows = db.execute(
                "SELECT sop_uid FROM instances WHERE series_uid = ?", (series_uid,)
            ).fetchall()
        return {r["sop_uid"] for r in rows}

    def known_paths(self) -> set[str]:
        with self._db.read() as db:
            return {r["path"] for r in db.execute("SELECT path FROM instances")}
