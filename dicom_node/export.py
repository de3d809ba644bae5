"""Send results to destinations with C-STORE, through the durable outbox.

A result file is written to disk and recorded in the outbox before anything is sent
(see :mod:`dicom_node.jobs`). This module takes due outbox items, sends each over one
association per destination, and records the outcome: acknowledged items are never sent
again; failures wait with exponential backoff and are retried until the destination's
attempt limit, after which they stay visible as failed for ``dicom-node retry``.

"Never again" holds whatever fails after the destination's answer. Each acknowledgement
is first appended to a small journal file that was allocated whole when the node started
(:class:`AckJournal`: writing into it needs no new disk block, so a full disk cannot stop
it), then committed to the database. An item whose commit failed ("database or disk is
full") stays acknowledged in memory and is never picked again; its commit is retried with
backoff. On start the journal is reconciled into the database before anything is sent.

A failure is recorded as the peer stated it: the association rejection with its source and
reason, a presentation context refused for the SOP class, or the DIMSE status and its
meaning (PS3.4 B.2.3).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from dicom_node.config import Destination, Settings, TLSSettings
from dicom_node.jobs import JobStore, OutboxItem
from dicom_node.spool import fsync_dir
from dicom_node.tls import client_ssl_context, client_tls_args

log = logging.getLogger("dicom_node.export")

#: Statuses a Storage SCP uses for success or success-with-warning (PS3.4 B.2.3).
_OK = {0x0000, 0xB000, 0xB006, 0xB007}


class ExportError(RuntimeError):
    """A destination could not be reached or refused; the message says which and how."""


def status_meaning(status: int) -> str:
    """A Storage SCP's DIMSE status in words (PS3.4 B.2.3, PS3.7 C)."""
    known = STORAGE_SERVICE_CLASS_STATUS.get(status)
    if known is not None:
        return known[1]
    for mask, prefix, meaning in (
        (0xFF00, 0xA700, "Refused: Out of Resources"),
        (0xFF00, 0xA900, "Error: Data Set Does Not Match SOP Class"),
        (0xF000, 0xC000, "Error: Cannot Understand"),
        (0xF000, 0xB000, "Warning"),
    ):
        if status & mask == prefix:
            return meaning
    return "Failure" if status & 0xF000 in (0xA000, 0xC000) else "unknown status"


def sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (exponential, capped)."""
    return min(cap, base * (2 ** max(0, attempt - 1)))


def send_files(
    destination: Destination,
    paths: list[Path],
    calling_ae: str,
    timeout: float = 30.0,
    tls: TLSSettings | None = None,
    on_ack: Callable[[Path, int], None] | None = None,
) -> dict[Path, int | str]:
    """C-STORE ``paths`` to ``destination`` in one association.

    Returns, per path, the DIMSE status (int) or an error sentence (str); ``on_ack`` is
    called with each path and status the moment a success (or warning) arrives, before the
    next is sent. Raises :class:`ExportError` saying what the peer said when no
    association could be established.
    """
    datasets = {p: pydicom.dcmread(p) for p in paths}
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    seen = set()
    for ds in datasets.values():
        key = (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        if key not in seen:
            seen.add(key)
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    answers: list[Any] = []
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=client_tls_args(tls or TLSSettings(), destination),
        evt_handlers=[(evt.EVT_ACSE_RECV, lambda event: answers.append(event.primitive))],
    )
    refused = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    if not assoc.is_established:
        if assoc.is_rejected:
            rj = next((a for a in answers if getattr(a, "result", None) in (1, 2)), None)
            why = f" ({rj.result_str}, {rj.source_str}: {rj.reason_str})" if rj is not None else ""
            raise ExportError(f"{destination.name} rejected the association{why}")
        if refused and not accepted:  # pynetdicom aborts when no context was accepted
            raise ExportError(
                f"{destination.name} refused the presentation context for "
                + ", ".join(sop_class_name(u) for u in sorted(refused))
                + " (the SOP class is not accepted there)"
            )
        if assoc.is_aborted and answers:
            raise ExportError(
                f"{destination.name} aborted the association while it was being negotiated"
            )
        raise ExportError(
            f"{destination.name} ({destination.host}:{destination.port}) cannot be reached"
        )
    results: dict[Path, int | str] = {}
    try:
        for path, ds in datasets.items():
            if str(ds.SOPClassUID) not in accepted:
                results[path] = (
                    f"{destination.name} refused the presentation context for "
                    f"{sop_class_name(str(ds.SOPClassUID))} (the SOP class is "
                    "not accepted there)"
                )
                continue
            try:
                status = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as exc:
                results[path] = f"not sent: {exc}"
                continue
            results[path] = (
                int(status.Status)
                if status and "Status" in status
                else ("no response (association lost)")
            )
            if on_ack is not None and results[path] in _OK:
                on_ack(path, results[path])  # type: ignore[arg-type]
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return results


class AckJournal:
    """Acknowledgements not yet known to be in the database, in a file allocated whole.

    ``slots`` fixed-size records (one JSON line each, zero-padded; a zero first byte is
    a free slot) in a file reserved with ``posix_fallocate`` when it is created: an append
    writes into blocks the file already owns, then ``fdatasync`` (no size change, so no
    metadata to journal). Cleared once every record is committed to the database.
    """

    SLOT = 256

    def __init__(self, path: Path, slots: int = 4096) -> None:
        self.path = Path(path)
        self.slots = slots
        self._lock = threading.Lock()
        size = slots * self.SLOT
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size < size:
            os.posix_fallocate(self._fd, 0, size)
            os.fsync(self._fd)
            fsync_dir(self.path.parent)
        self._next = 0
        while self._next < slots and os.pread(self._fd, 1, self._next * self.SLOT) not in (
            b"",
            b"\0",
        ):
            self._next += 1

    def records(self) -> list[dict[str, Any]]:
        out = []
        with self._lock:
            for k in range(self._next):
                raw = os.pread(self._fd, self.SLOT, k * self.SLOT).rstrip(b"\0")
                try:
                    out.append(json.loads(raw))
                except ValueError:  # a record torn by a crash mid-write: its ack was lost
                    continue
        return out

    @property
    def used(self) -> int:
        return self._next

    def append(self, record: dict[str, Any]) -> None:
        """Record durably; raises ``OSError`` when the journal is full or unwritable."""
        data = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        if len(data) > self.SLOT:
            raise OSError(f"acknowledgement record of {len(data)} bytes exceeds a slot")
        with self._lock:
            if self._next >= self.slots:
                raise OSError("the acknowledgement journal is full")
            os.pwrite(self._fd, data.ljust(self.SLOT, b"\0"), self._next * self.SLOT)
            os.fdatasync(self._fd)
            self._next += 1

    def clear(self) -> None:
        """Forget every record (the caller committed them all)."""
        with self._lock:
            if self._next:
                os.pwrite(self._fd, bytes(self._next * self.SLOT), 0)
                os.fdatasync(self._fd)
                self._next = 0

    def close(self) -> None:
        os.close(self._fd)


class Exporter:
    """Works through the outbox, grouping due items per destination."""

    #: Seconds between attempts to commit an acknowledgement the database refused.
    RECORD_BACKOFF = (0.5, 30.0)

    def __init__(
        self,
        settings: Settings,
        jobs: JobStore,
        on_attempt: Callable[[str, bool, int, float, bool], None] | None = None,
        journal: Path | None = None,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.destinations = {d.name: d for d in settings.destinations}
        if any(d.tls for d in settings.destinations):
            client_ssl_context(settings.tls)  # a bad certificate path fails at start, clearly
        #: Called per item sent or not: (destination, ok, attempt, seconds, gave_up).
        self.on_attempt = on_attempt
        #: Acknowledged items whose commit failed: id -> (sent at, next try, backoff).
        self._unrecorded: dict[int, tuple[float, float, float]] = {}
        #: Items whose failed attempt could not be recorded: id -> not before.
        self._not_before: dict[int, float] = {}
        self.journal = AckJournal(journal or Path(jobs.path).parent / "outbox-acks.journal")
        for record in self.journal.records():  # a crash or a refused commit last time
            self._unrecorded[int(record["id"])] = (float(record["at"]), 0.0, 0.0)
        if self._unrecorded:
            log.info("%d acknowledgement(s) from the journal to record", len(self._unrecorded))
        self._record_pending()

    def _record_pending(self) -> None:
        """Commit acknowledgements the database refused before, those due now."""
        now = time.time()
        for item_id, (sent_at, next_try, wait) in list(self._unrecorded.items()):
            if next_try > now:
                continue
            try:
                self.jobs.mark_sent(item_id, sent_at)
            except sqlite3.Error as exc:
                lo, hi = self.RECORD_BACKOFF
                wait = min(hi, max(lo, wait * 2))
                self._unrecorded[item_id] = (sent_at, now + wait, wait)
                log.error(
                    "outbox item %d was acknowledged but cannot be recorded yet (%s); "
                    "it is not sent again, next try in %.1f s",
                    item_id,
                    exc,
                    wait,
                )
                continue
            del self._unrecorded[item_id]
        if not self._unrecorded and self.journal.used:
            try:
                self.journal.clear()
            except OSError as exc:
                log.error("acknowledgement journal not cleared: %s", exc)

    def _acknowledged(self, item: OutboxItem, sent_at: float) -> None:
        """Record an acknowledgement: journal first, then the database; if both fail, in
        memory (the item is never picked again by this process)."""
        try:
            self.journal.append(
                {"id": item.id, "sop": item.sop_uid, "dest": item.destination, "at": sent_at}
            )
        except OSError as exc:
            log.error("acknowledgement of outbox item %d not journalled: %s", item.id, exc)
        self._unrecorded[item.id] = (sent_at, 0.0, 0.0)

    def run_once(self) -> int:
        """Send what is due now; return how many items were acknowledged."""
        self._record_pending()
        now = time.time()
        due = [
            i
            for i in self.jobs.due_results()
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
                    self.jobs.mark_attempt_failed(
                        item.id, f"destination {name!r} is no longer configured", 0, True
                    )
                continue
            sent += self._send(dest, items)
        return sent

    def _send(self, dest: Destination, items: list[OutboxItem]) -> int:
        paths = [Path(i.path) for i in items]
        by_path = {Path(i.path): i for i in items}
        t0 = time.perf_counter()
        try:
            results: dict[Path, int | str] = send_files(
                dest,
                paths,
                self.settings.node.ae_title,
                self.settings.limits.network_timeout,
                self.settings.tls,
                on_ack=lambda path, _status: self._acknowledged(by_path[path], time.time()),
            )
        except (ExportError, OSError) as exc:
            results = {p: str(exc) for p in paths}
        seconds = time.perf_counter() - t0
        self._record_pending()
        sent = 0
        for item in items:
            outcome = results.get(Path(item.path), "not attempted (association ended early)")
            if isinstance(outcome, int) and outcome in _OK:
                sent += 1
                if self.on_attempt is not None:
                    self.on_attempt(dest.name, True, item.attempts + 1, seconds, False)
                log.info("%s of series %s sent to %s", item.kind, item.series_uid, dest.name)
                continue
            error = (
                f"{dest.name} answered status 0x{outcome:04X} ({status_meaning(outcome)})"
                if isinstance(outcome, int)
                else outcome
            )
            attempt = item.attempts + 1
            give_up = attempt >= dest.attempts
            wait = backoff(attempt, dest.retry_backoff_seconds, dest.max_backoff_seconds)
            try:
                self.jobs.mark_attempt_failed(item.id, error, time.time() + wait, give_up)
                self._not_before.pop(item.id, None)
            except sqlite3.Error as exc:  # not sent: the backoff holds in memory
                self._not_before[item.id] = time.time() + wait
                log.error("failed attempt of outbox item %d not recorded: %s", item.id, exc)
            if self.on_attempt is not None:
                self.on_attempt(dest.name, False, attempt, seconds, give_up)
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
