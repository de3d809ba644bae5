"""State: the job database, the one place the node's durable bookkeeping lives.

Series with their states (:mod:`.series`), instances with their recorded geometry
(:mod:`.instances`), the results each destination is owed (:mod:`.outbox`), their storage
commitment (:mod:`.commitments`) and the fetches asked of sources (:mod:`.fetches`), each a
repository over one SQLite database (:mod:`.database`), and the acknowledgement journal
(:mod:`.journal`). The states are enums (:mod:`.states`). The spool on disk stays the source
of truth for received instances; this database indexes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.state.commitments import CommitmentRepository
from dicom_node.state.database import Database, DatabaseError
from dicom_node.state.fetches import FetchedSeries, FetchRecord, FetchRepository
from dicom_node.state.instances import (
    InstanceConflict,
    InstanceRepository,
    NewInstance,
    StoredInstance,
)
from dicom_node.state.outbox import NewOutboxItem, OutboxItem, OutboxRepository
from dicom_node.state.results import ModelResults, ResultFile, SeriesResults
from dicom_node.state.series import SeriesRecord, SeriesRepository
from dicom_node.state.states import (
    CommitmentState,
    FetchState,
    FinishOutcome,
    OutboxState,
    SeriesState,
)

__all__ = [
    "CommitmentState",
    "DatabaseError",
    "FetchRecord",
    "FetchState",
    "FetchedSeries",
    "FinishOutcome",
    "InstanceConflict",
    "JobDatabase",
    "ModelResults",
    "NewInstance",
    "NewOutboxItem",
    "OutboxItem",
    "OutboxState",
    "ResultFile",
    "SeriesListing",
    "SeriesRecord",
    "SeriesResults",
    "SeriesState",
    "StoredInstance",
]


@dataclass(frozen=True)
class SeriesListing:
    """A series with what it owes each destination, as ``dicom-node jobs`` lists it."""

    record: SeriesRecord
    outbox: list[OutboxItem]

    def to_json(self) -> dict[str, Any]:
        out = self.record.to_json()
        out["outbox"] = [item.summary() for item in self.outbox]
        return out


class JobDatabase:
    """The job database under ``data_dir``, with one repository per table."""

    def __init__(self, path: Path) -> None:
        self._db = Database(path)
        self.series = SeriesRepository(self._db)
        self.instances = InstanceRepository(self._db)
        self.outbox = OutboxRepository(self._db)
        self.commitments = CommitmentRepository(self._db)
        self.fetches = FetchRepository(self._db)

    @property
    def path(self) -> Path:
        return self._db.path

    def listing(self) -> list[SeriesListing]:
        """Every series with its outbox items, oldest first."""
        return [SeriesListing(r, self.outbox.items(r.series_uid)) for r in self.series.records()]

    def close(self) -> None:
        """Commit the instance rows still written behind, then close."""
        try:
            self.instances.close()
        finally:
            self._db.close()
