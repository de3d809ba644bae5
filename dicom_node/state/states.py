"""The states a series and an outbox item go through, as enums.

Series::

    receiving -> complete -> processing -> done
                                       \\-> failed (with a reason)
                                       \\-> no_model (stored, no routing rule matched)

An instance reaching a finished series (done, failed, no model) makes it ``receiving``
again: it will be processed once more, whole.

Outbox items: ``pending -> sent | failed``; ``cancelled`` for a result of an earlier run that
was not sent before the series changed (it is never sent).

Storage commitment of a sent item, at a destination that asks for it::

    owed -> requested -> committed
              |   \\-> failed: re-sent (pending again) after the destination's wait,
              |                or the item fails once its sends are spent
              \\-> (no report in time, or the node restarted) requested again, then failed

Fetches: ``pending -> querying -> retrieving -> done | failed`` (with a reason).

The values are what the database, the ``jobs`` listing and the status pages show.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["CommitmentState", "FetchState", "FinishOutcome", "OutboxState", "SeriesState"]


class _Named(str, Enum):
    """A state whose value is its name in the database and on every page."""

    def __str__(self) -> str:
        return self.value


class SeriesState(_Named):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    NO_MODEL = "no_model"

    @property
    def finished(self) -> bool:
        """A job ended here: a new instance makes the series receive again."""
        return self in (SeriesState.DONE, SeriesState.FAILED, SeriesState.NO_MODEL)


class OutboxState(_Named):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    #: A result of an earlier run that was not sent before the series changed: never sent.
    CANCELLED = "cancelled"


class FinishOutcome(_Named):
    """How :meth:`~dicom_node.state.series.SeriesRepository.finish_run` ended."""

    #: The run's results are queued and the series is done.
    DONE = "done"
    #: The series no longer holds the instances the run processed: nothing was queued.
    OVERTAKEN = "overtaken"
    #: An earlier result was acknowledged while the run encoded: encode again.
    STALE_PREDECESSORS = "stale predecessors"


class CommitmentState(_Named):
    """Where a sent item stands with its destination's storage commitment (an item of a
    destination that does not ask for it has none: the empty string in the database)."""

    #: Acknowledged by the destination; commitment not asked yet.
    OWED = "owed"
    #: An N-ACTION names it (recorded before it was sent); no report yet.
    REQUESTED = "requested"
    #: The PACS reported it committed: nothing more is owed.
    COMMITTED = "committed"
    #: The PACS reported it not committed (the reason says why), or no report came.
    FAILED = "failed"


class FetchState(_Named):
    """A fetch of a study or series from a source (``dicom-node fetch``)."""

    PENDING = "pending"
    QUERYING = "querying"
    RETRIEVING = "retrieving"
    DONE = "done"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (FetchState.DONE, FetchState.FAILED)
