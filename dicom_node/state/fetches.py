"""Fetches: studies and series asked for from a source, and what became of each.

``dicom-node fetch`` (another process) and the status service's ``POST /fetch`` each add a
``pending`` fetch here; the node's fetch worker (:mod:`dicom_node.sources.fetch`) takes it,
queries the source, retrieves each series and records, per series, how many instances
the source holds and how many came. The table is the hand-over between the processes, and
what the command and ``GET /fetches/<id>`` read back.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from dicom_node.state.database import Database
from dicom_node.state.states import FetchState

__all__ = ["FetchRecord", "FetchRepository", "FetchedSeries"]


@dataclass(frozen=True)
class FetchedSeries:
    """One series of a fetch: how many instances the source holds, how many were new
    here, and the series' state after the retrieve."""

    series_uid: str
    modality: str = ""
    expected: int = 0
    new: int = 0
    state: str = ""


@dataclass(frozen=True)
class FetchRecord:
    """One fetch as recorded."""

    id: int
    source: str
    study_uid: str
    series_uid: str
    requested_by: str
    state: FetchState
    #: Why it failed, in one sentence.
    reason: str
    series: list[FetchedSeries] = field(default_factory=list)
    created: float = 0.0
    updated: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = str(self.state)
        return d


def _record(row: Any) -> FetchRecord:
    d = dict(row)
    d["state"] = FetchState(d["state"])
    d["series"] = [FetchedSeries(**s) for s in json.loads(d["series"] or "[]")]
    return FetchRecord(**d)


class FetchRepository:
    """Queries and state changes of fetches."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add(self, source: str, study_uid: str, series_uid: str = "", requested_by: str = "") -> int:
        """Ask for a fetch; its id."""
        now = time.time()
        with self._db.tx() as db:
            cur = db.execute(
                "INSERT INTO fetches (source, study_uid, series_uid, requested_by, state,"
                " created, updated) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (source, study_uid, series_uid, requested_by, FetchState.PENDING, now, now),
            )
            return int(cur.lastrowid or 0)

    def get(self, fetch_id: int) -> FetchRecord | None:
        with self._db.read() as db:
            row = db.execute("SELECT * FROM fetches WHERE id = ?", (fetch_id,)).fetchone()
        return None if row is None else _record(row)

    def records(self) -> list[FetchRecord]:
        with self._db.read() as db:
            rows = db.execute("SELECT * FROM fetches ORDER BY id").fetchall()
        return [_record(r) for r in rows]

    def claim(self) -> FetchRecord | None:
        """The oldest pending fetch, now ``querying``; ``None`` when there is none."""
        with self._db.tx() as db:
            row = db.execute(
                "SELECT id FROM fetches WHERE state = ? ORDER BY id LIMIT 1",
                (FetchState.PENDING,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE fetches SET state = ?, updated = ? WHERE id = ?",
                (FetchState.QUERYING, time.time(), row["id"]),
            )
            found = db.execute("SELECT * FROM fetches WHERE id = ?", (row["id"],)).fetchone()
        return _record(found)

    def update(
        self,
        fetch_id: int,
        state: FetchState,
        series: list[FetchedSeries] | None = None,
        reason: str = "",
    ) -> None:
        sql = "UPDATE fetches SET state = ?, reason = ?, updated = ?"
        args: list[object] = [state, reason, time.time()]
        if series is not None:
            sql += ", series = ?"
            args.append(json.dumps([asdict(s) for s in series]))
        with self._db.tx() as db:
            db.execute(sql + " WHERE id = ?", (*args, fetch_id))

    def withdraw(self, fetch_id: int, reason: str) -> bool:
        """Fail a fetch no node took up yet; ``False`` when one took it meanwhile."""
        with self._db.tx() as db:
            return (
                db.execute(
                    "UPDATE fetches SET state = ?, reason = ?, updated = ? WHERE id = ?"
                    " AND state = ?",
                    (FetchState.FAILED, reason, time.time(), fetch_id, FetchState.PENDING),
                ).rowcount
                == 1
            )

    def resume(self) -> int:
        """After a restart: fetches interrupted while querying or retrieving are pending
        again (retrieving twice stores nothing twice); how many."""
        with self._db.tx() as db:
            return db.execute(
                "UPDATE fetches SET state = ?, updated = ? WHERE state IN (?, ?)",
                (FetchState.PENDING, time.time(), FetchState.QUERYING, FetchState.RETRIEVING),
            ).rowcount
