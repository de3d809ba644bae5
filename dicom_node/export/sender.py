"""Send results to destinations through the durable outbox, never twice once acknowledged.

A result file is written to disk and recorded in the outbox before anything is sent
(:mod:`dicom_node.state.outbox`). The :class:`Exporter` takes due outbox items, hands each
destination's to its transport (:mod:`.transport`: C-STORE, STOW-RS...), and records the
outcome: acknowledged items are never sent again; failures wait with exponential back-off
(:mod:`dicom_node.common.backoff`) and are retried until the destination's attempt limit,
after which they stay visible as failed for ``dicom-node retry``.

"Never again" holds whatever fails after the destination's answer. Each acknowledgement is
first appended to the acknowledgement journal (:class:`~dicom_node.state.journal.AckJournal`:
a file allocated whole when the node started, so a full disk cannot stop it), then
committed to the database. An item whose commit failed ("database or disk is full") stays
acknowledged in memory and is never picked again; its commit is retried with back-off. On
start the journal is reconciled into the database before anything is sent.

A SEG may have two forms (:func:`~.transport.deliver`): the Label Map SEG is offered first
and, where a destination refuses that SOP class, the binary SEG (and the SR that names it)
goes instead; the outbox records which form each destination took.

For a destination with ``storage_commitment``, an acknowledgement makes the item's
commitment owed in the same commit, and the commitment step (:mod:`.commitment`), which
the exporter runs beside itself, asks the PACS for it.

What happens is emitted on the node's events for the audit trail: :class:`ExportStarted`
before each batch goes to a destination, :class:`ResultSent` for each result it
acknowledged or that the outbox gave up on.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.common.backoff import backoff
from dicom_node.common.events import Events
from dicom_node.common.worker import Worker
from dicom_node.config import Destination, Settings
from dicom_node.export.commitment import CommitmentStep
from dicom_node.export.transport import Outcome, Outgoing, SegChoice, Transport, transport_for
from dicom_node.state import JobDatabase, OutboxItem
from dicom_node.state.journal import AckJournal

log = logging.getLogger("dicom_node.export")

__all__ = ["ExportStarted", "Exporter", "ResultSent"]


@dataclass(frozen=True)
class ExportStarted:
    """A batch of results is about to go to ``destination``."""

    destination: Destination
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class ResultSent:
    """``destination`` acknowledged the result at ``path`` (the form sent), or, with an
    ``error``, the outbox gave up on it after the destination's last attempt."""

    destination: Destination
    path: Path
    error: str = ""


class Exporter:
    """Works through the outbox, grouping due items per destination."""

    #: Seconds between attempts to commit an acknowledgement the database refused.
    RECORD_BACKOFF = (0.5, 30.0)

    def __init__(
        self,
        settings: Settings,
        jobs: JobDatabase,
        on_attempt: Callable[[str, bool, int, float, bool], None] | None = None,
        journal: Path | None = None,
        events: Events | None = None,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        #: Where :class:`ExportStarted` and :class:`ResultSent` are emitted.
        self.events = events or Events()
        self.destinations = {d.name: d for d in settings.destinations}
        #: Each destination's transport, built now: what cannot work fails at start, clearly.
        self.transports: dict[str, Transport] = {
            d.name: transport_for(settings, d) for d in settings.destinations
        }
        #: Destinations that refused the Label Map SEG with a store status (a refusal in
        #: negotiation costs nothing and is learned at each association).
        self._refuses_label_map: set[str] = set()
        #: Called per item sent or not: (destination, ok, attempt, seconds, gave_up).
        self.on_attempt = on_attempt
        #: Acknowledged items whose commit failed: id -> (sent at, next try, failed commits,
        #: whether the binary alternative was the form sent, whether its destination asks
        #: for storage commitment).
        self._unrecorded: dict[int, tuple[float, float, int, bool, bool]] = {}
        #: Items whose failed attempt could not be recorded: id -> not before.
        self._not_before: dict[int, float] = {}
        self.journal = AckJournal(journal or Path(jobs.path).parent / "outbox-acks.journal")
        #: Storage commitment of what destinations acknowledged, where they ask for it.
        self.commitments: CommitmentStep | None = None
        if any(d.asks_commitment() for d in settings.destinations):
            self.commitments = CommitmentStep(settings, jobs, on_resend=self.wake)
        for record in self.journal.records():  # a crash or a refused commit last time
            self._unrecorded[int(record["id"])] = (
                float(record["at"]),
                0.0,
                0,
                bool(record.get("alt", False)),
                self._commits(str(record.get("dest", ""))),
            )
        if self._unrecorded:
            log.info("%d acknowledgement(s) from the journal to record", len(self._unrecorded))
        self._record_pending()
        self._worker = Worker("dicom-node-export", self._step, 1.0, "exporter")

    def _record_pending(self) -> None:
        """Commit acknowledgements the database refused before, those due now."""
        now = time.time()
        for item_id, (sent_at, next_try, failures, alt, commit) in list(self._unrecorded.items()):
            if next_try > now:
                continue
            try:
                self.jobs.outbox.mark_sent(item_id, sent_at, alternative=alt, commitment=commit)
            except sqlite3.Error as exc:
                wait = backoff(failures + 1, *self.RECORD_BACKOFF)
                self._unrecorded[item_id] = (sent_at, now + wait, failures + 1, alt, commit)
                log.error(
                    "outbox item %d was acknowledged but cannot be recorded yet (%s); "
                    "it is not sent again, next try in %.1f s",
                    item_id,
                    exc,
                    wait,
                )
                continue
            del self._unrecorded[item_id]
            if commit and self.commitments is not None:
                self.commitments.wake()
        if not self._unrecorded and self.journal.used:
            try:
                self.journal.clear()
            except OSError as exc:
                log.error("acknowledgement journal not cleared: %s", exc)

    def _acknowledged(self, item: OutboxItem, sent_at: float, alternative: bool = False) -> None:
        """Record an acknowledgement: journal first, then the database; if both fail, in
        memory (the item is never picked again by this process)."""
        record: dict[str, Any] = {
            "id": item.id,
            "sop": item.alt_sop_uid if alternative else item.sop_uid,
            "dest": item.destination,
            "at": sent_at,
        }
        if alternative:
            record["alt"] = True
        try:
            self.journal.append(record)
        except OSError as exc:
            log.error("acknowledgement of outbox item %d not journalled: %s", item.id, exc)
        self._unrecorded[item.id] = (sent_at, 0.0, 0, alternative, self._commits(item.destination))

    def _commits(self, name: str) -> bool:
        """Whether destination ``name`` asks for storage commitment."""
        destination = self.destinations.get(name)
        return destination is not None and destination.asks_commitment()

    def run_once(self) -> int:
        """Send what is due now; return how many items were acknowledged."""
        self._record_pending()
        now = time.time()
        due = [
            i
            for i in self.jobs.outbox.due()
            if i.id not in self._unrecorded and self._not_before.get(i.id, 0.0) <= now
        ]
        by_dest: dict[str, list[OutboxItem]] = defaultdict(list)
        for item in due:
            by_dest[item.destination].append(item)
        sent = 0
        for name, items in by_dest.items():
            dest = self.destinations.get(name)
            if dest is None:
                for item in items:
                    self.jobs.outbox.mark_attempt_failed(
                        item.id, f"destination {name!r} is no longer configured", 0, True
                    )
                continue
            sent += self._send(dest, items)
        return sent

    def _outgoing(self, dest: Destination, item: OutboxItem) -> Outgoing:
        """The item as a transport sends it: an SR follows the form its destination
        already took of the SEG it names, when it took one."""
        if not item.alt_path:
            return Outgoing(item.id, Path(item.path))
        choice = "auto" if item.kind == "SEG" else "follow"
        if choice == "follow":
            taken = self.jobs.outbox.sent_form(item.series_uid, item.model, dest.name, "SEG")
            if taken:
                choice = "alt" if taken == "binary" else "primary"
        return Outgoing(item.id, Path(item.path), Path(item.alt_path), choice)

    def _send(self, dest: Destination, items: list[OutboxItem]) -> int:
        by_id = {i.id: i for i in items}
        outgoing = [self._outgoing(dest, i) for i in items]
        choice = SegChoice(refuses=dest.name in self._refuses_label_map)

        def on_ack(item: Outgoing, outcome: Outcome) -> None:
            self._acknowledged(by_id[item.key], time.time(), outcome.alternative)
            sent_path = item.alt_path if outcome.alternative and item.alt_path else item.path
            self.events.emit(ResultSent(dest, sent_path))

        self.events.emit(ExportStarted(dest, tuple(o.path for o in outgoing)))
        t0 = time.perf_counter()
        try:
            results = self.transports[dest.name].send(outgoing, choice, on_ack)
        except OSError as exc:
            results = {o.key: Outcome(False, error=str(exc)) for o in outgoing}
        if choice.by_status and dest.name not in self._refuses_label_map:
            self._refuses_label_map.add(dest.name)
            log.warning(
                "%s does not take the Label Map SEG: it gets the binary SEG from now on", dest.name
            )
        seconds = time.perf_counter() - t0
        self._record_pending()
        sent = 0
        for item in items:
            outcome = results.get(
                item.id, Outcome(False, error="not attempted (association ended early)")
            )
            if outcome.ok:
                sent += 1
                if self.on_attempt is not None:
                    self.on_attempt(dest.name, True, item.attempts + 1, seconds, False)
                log.info(
                    "%s of series %s sent to %s%s",
                    item.kind,
                    item.series_uid,
                    dest.name,
                    " (binary SEG form)" if outcome.alternative else "",
                )
                continue
            error = outcome.error
            attempt = item.attempts + 1
            give_up = attempt >= dest.attempts
            wait = backoff(attempt, dest.retry_backoff_seconds, dest.max_backoff_seconds)
            try:
                self.jobs.outbox.mark_attempt_failed(item.id, error, time.time() + wait, give_up)
                self._not_before.pop(item.id, None)
            except sqlite3.Error as exc:  # not sent: the backoff holds in memory
                self._not_before[item.id] = time.time() + wait
                log.error("failed attempt of outbox item %d not recorded: %s", item.id, exc)
            if self.on_attempt is not None:
                self.on_attempt(dest.name, False, attempt, seconds, give_up)
            if give_up:
                self.events.emit(ResultSent(dest, Path(item.path), error))
            log.warning(
                "%s of series %s to %s: %s (attempt %d/%d%s)",
                item.kind,
                item.series_uid,
                dest.name,
                error,
                attempt,
                dest.attempts,
                ", giving up" if give_up else f", next in {wait:.0f} s",
            )
        return sent

    # -- running ----------------------------------------------------------------------
    def _step(self) -> bool:
        self.run_once()
        return False  # items not sent wait for their back-off: look again in a second

    def start(self) -> None:
        """Send in a thread of its own: what is due, then again after a second or as soon
        as :meth:`wake` says new results are queued."""
        self._worker.start()
        if self.commitments is not None:
            self.commitments.start()

    def wake(self) -> None:
        self._worker.wake()

    def stop(self) -> None:
        if self.commitments is not None:
            self.commitments.stop()
        self._worker.stop(30.0)

    def close(self) -> None:
        self.stop()
        self.journal.close()
