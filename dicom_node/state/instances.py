"""Instances: every stored SOP instance, its spool file, digest and slice geometry.

Adding an instance also keeps its series' row: it creates the series on its first
instance, counts it, and makes a finished series receive again (its unsent results are
cancelled then: they are not results of the series any more).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from dicom_node.state.database import Database
from dicom_node.state.outbox import cancel_unsent
from dicom_node.state.states import SeriesState

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


class InstanceRepository:
    """Queries and updates of the instances (and the series row each one counts in)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def find(self, sop_uid: str) -> StoredInstance | None:
        with self._db.read() as db:
            row = db.execute(
                "SELECT sop_uid, series_uid, path, digest FROM instances WHERE sop_uid = ?",
                (sop_uid,),
            ).fetchone()
        return None if row is None else StoredInstance(**dict(row))

    def add(self, instance: NewInstance) -> tuple[bool, SeriesState | None]:
        """Record a stored instance; return (is new, the series' state before it).

        A series that was finished (done, failed, no model) and receives a new instance goes
        back to ``receiving`` and will be processed again with all its instances.
        """
        i = instance
        now = i.received if i.received is not None else time.time()
        with self._db.tx() as db:
            row = db.execute(
                "SELECT digest FROM instances WHERE sop_uid = ?", (i.sop_uid,)
            ).fetchone()
            if row is not None:
                if row["digest"] != i.digest:
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
