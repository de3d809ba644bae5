"""The states a series and an outbox item go through, as enums.

Series::

    receiving -> complete -> processing -> done
                                       \\-> failed (with a reason)
                                       \\-> no_model (stored, no routing rule matched)

An instance reaching a finished series (done, failed, no model) makes it ``receiving``
again: it will be processed once more, whole.

Outbox items: ``pending -> sent | failed``; ``cancelled`` for a result of an earlier run that
was not sent before the series changed (it is never sent).

The values are what the database, the ``jobs`` listing and the status pages show.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["FinishOutcome", "OutboxState", "SeriesState"]


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
