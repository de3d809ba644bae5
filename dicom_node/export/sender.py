"""Send results to destinations through the durable outbox: C-STORE here, STOW-RS in
:mod:`dicom_node.export.dicomweb`, under the same rules.

A result file is written to disk and recorded in the outbox before anything is sent
(see :mod:`dicom_node.state.jobs`). This module takes due outbox items, sends them per
destination (one association, or one HTTP session), and records the outcome:
acknowledged items are never sent again; failures wait with exponential backoff and are
retried until the destination's attempt limit, after which they stay visible as failed
for ``dicom-node retry``.

A SEG may have two forms (:mod:`dicom_node.export.delivery`): the Label Map SEG is offered
first and, where a destination refuses that SOP class, the binary SEG (and the SR that
names it) goes instead; the outbox records which form each destination took.

"Never again" holds whatever fails after the destination's answer. Each acknowledgement
is first appended to a small journal file that was allocated whole when the node started
(:class:`AckJournal`: writing into it needs no new disk block, so a full disk cannot stop
it), then committed to the database. An item whose commit failed ("database or disk is
full") stays acknowledged in memory and is never picked again; its commit is retried with
backoff. On start the journal is reconciled into the database before anything is sent.

A failure is recorded as the peer stated it: the association rejection with its source and
reason, a presentation context refused for the SOP class, or the DIMSE status and its
meaning (PS3.4 B.2.3); over DICOMweb, the HTTP status and the STOW-RS Failure Reason.

Why one module of this size: the sender, its C-STORE transport and the acknowledgement
journal are one protocol (journal first, then the database, never a second send), and
reviewing exactly-once means reading them together.
"""

from __future__ import annotations

import concurrent.futures
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
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ

from dicom_node.common.tls import client_ssl_context, client_tls_args
from dicom_node.config import Destination, Settings, TLSSettings
from dicom_node.export.delivery import (
    OK_STATUSES,
    Outcome,
    Outgoing,
    SegChoice,
    deliver,
    sop_class_name,
    status_meaning,
)
from dicom_node.export.dicomweb import check_destination, stow_batch
from dicom_node.intake.spool import fsync_dir
from dicom_node.state.jobs import JobStore, OutboxItem

log = logging.getLogger("dicom_node.export.sender")

__all__ = [
    "AckJournal",
    "ExportError",
    "Exporter",
    "backoff",
    "cstore_batch",
    "plan_outbox_items",
    "send_files",
    "status_meaning",
]

#: Kept for callers of the first release; :data:`dicom_node.export.delivery.OK_STATUSES`.
_OK = OK_STATUSES


class ExportError(RuntimeError):
    """A destination could not be reached or refused; the message says which and how."""


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (exponential, capped)."""
    return min(cap, base * (2 ** max(0, attempt - 1)))


def _header(path: Path) -> tuple[str, str]:
    """(SOP Class UID, Transfer Syntax UID) of a Part 10 file, read without its pixels."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    return str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)


def _keep_rejection(pdu: Any, answers: list[Any]) -> None:
    """Keep an A-ASSOCIATE-RJ PDU among ``answers`` (every other PDU goes by)."""
    if isinstance(pdu, A_ASSOCIATE_RJ):
        answers.append(pdu)


def cstore_batch(
    destination: Destination,
    items: list[Outgoing],
    calling_ae: str,
    timeout: float = 30.0,
    tls: TLSSettings | None = None,
    choice: SegChoice | None = None,
    on_ack: Callable[[Outgoing, Outcome], None] | None = None,
) -> dict[int, Outcome]:
    """C-STORE ``items`` to ``destination`` in one association; one :class:`Outcome` per
    item key.

    Both forms of a SEG (and of the SR naming it) are proposed: where the association
    refuses the Label Map Segmentation context, or a store of the label map fails with a
    status refusing its SOP class, the binary form goes instead, in the same association
    (``choice`` records it). ``on_ack`` is called the moment a success (or warning)
    arrives, before the next item is sent. Raises :class:`ExportError` saying what the
    peer said when no association could be established.
    """
    choice = choice or SegChoice()
    headers: dict[Path, tuple[str, str]] = {}
    for item in items:
        for path in (item.path, item.alt_path):
            if path is not None and path not in headers:
                headers[path] = _header(path)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class, syntax in dict.fromkeys(headers.values()):
        ae.add_requested_context(sop_class, syntax)
    answers: list[Any] = []
    # The rejection is taken from the PDU as it arrives: a peer that closes the connection
    # right after its A-ASSOCIATE-RJ can have pynetdicom abort the association before the
    # rejection reaches its ACSE (seen with Orthanc on a loaded host), which left only
    # "cannot be reached" to say.
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=client_tls_args(tls or TLSSettings(), destination),
        evt_handlers=[
            (evt.EVT_ACSE_RECV, lambda event: answers.append(event.primitive)),
            (evt.EVT_PDU_RECV, lambda event: _keep_rejection(event.pdu, answers)),
        ],
    )
    refused = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
    accepted = {
        (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
    }
    if not assoc.is_established:
        rj = next((a for a in answers if isinstance(a, A_ASSOCIATE_RJ)), None)
        if assoc.is_rejected or rj is not None:
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
    if any(
        item.alt_path is not None
        and item.choice == "auto"
        and headers[item.path] not in accepted
        and headers[item.alt_path] in accepted
        for item in items
    ):
        choice.refused(by_status=False)  # negotiation said so: learned again next time

    def store(path: Path) -> Outcome:
        sop_class = headers[path][0]
        if headers[path] not in accepted:
            return Outcome(
                False,
                error=f"{destination.name} refused the presentation context for "
                f"{sop_class_name(sop_class)} (the SOP class is not accepted there)",
            )
        try:
            # a path is sent as the bytes on disk: no decoding, no re-encoding
            answer = assoc.send_c_store(path)
        except (ValueError, RuntimeError, OSError) as exc:
            return Outcome(False, error=f"not sent: {exc}")
        if not answer or "Status" not in answer:
            return Outcome(False, error="no response (association lost)")
        status = int(answer.Status)
        if status in OK_STATUSES:
            return Outcome(True, status)
        return Outcome(
            False,
            status,
            f"{destination.name} answered status 0x{status:04X} ({status_meaning(status)})",
        )

    results: dict[int, Outcome] = {}
    try:
        for item in items:
            outcome = deliver(
                item,
                choice,
                store,
                lambda item=item: headers[item.path][0],
                destination.name,
                lambda: assoc.is_established,
            )
            results[item.key] = outcome
            if outcome.ok and on_ack is not None:
                on_ack(item, outcome)
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def send_files(
    destination: Destination,
    paths: list[Path],
    calling_ae: str,
    timeout: float = 30.0,
    tls: TLSSettings | None = None,
    on_ack: Callable[[Path, int], None] | None = None,
) -> dict[Path, int | str]:
    """C-STORE ``paths`` to ``destination`` in one association (no alternative forms).

    Returns, per path, the DIMSE status (int) or an error sentence (str); ``on_ack`` is
    called with each path and status the moment a success (or warning) arrives. Raises
    :class:`ExportError` when no association could be established.
    """
    items = [Outgoing(key=k, path=Path(p)) for k, p in enumerate(paths)]
    outcomes = cstore_batch(
        destination,
        items,
        calling_ae,
        timeout,
        tls,
        on_ack=None
        if on_ack is None
        else (lambda item, outcome: on_ack(item.path, outcome.status)),  # type: ignore[arg-type]
    )
    out: dict[Path, int | str] = {}
    for item in items:
        outcome = outcomes.get(item.key)
        if outcome is None:
            continue
        out[item.path] = outcome.status if outcome.status is not None else outcome.error
    return out


def plan_outbox_items(
    settings: Settings,
    series_uid: str,
    model: str,
    files: dict[str, dict[str, str]],
) -> list[dict[str, Any]]:
    """The outbox items of one model's written results, for every destination.

    ``files`` maps each kind (SEG, RTSTRUCT, SR; "SEG_BINARY" and "SR_BINARY" where
    :func:`binary_alternatives_wanted`) to its ``path`` and ``sop_uid``. A destination with
    ``seg_type = "binary"`` gets the binary SEG and its SR only; "labelmap" the label map
    only; "auto" the label map first, the binary form as its alternative.
    """
    out = []
    for dest in settings.destinations:
        for kind, f in files.items():
            if kind.endswith("_BINARY"):
                continue
            item: dict[str, Any] = {
                "series_uid": series_uid,
                "kind": kind,
                "destination": dest.name,
                "path": f["path"],
                "sop_uid": f["sop_uid"],
                "model": model,
            }
            binary = files.get(f"{kind}_BINARY")
            if binary is not None:
                if dest.seg_type == "binary":
                    item.update(path=binary["path"], sop_uid=binary["sop_uid"], form="binary")
                else:
                    item["form"] = "labelmap"
                    if dest.seg_type == "auto":
                        item.update(alt_path=binary["path"], alt_sop_uid=binary["sop_uid"])
            elif kind == "SEG":
                item["form"] = settings.results.seg_type
            out.append(item)
    return out


def binary_alternatives_wanted(settings: Settings) -> bool:
    """Whether results need a binary SEG (and its SR) beside the label map: some
    destination may take, or always takes, the binary form."""
    return settings.results.seg_type == "labelmap" and any(
        d.seg_type in ("auto", "binary") for d in settings.destinations
    )


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
        if any(d.tls for d in settings.destinations if d.type == "dicom"):
            client_ssl_context(settings.tls)  # a bad certificate path fails at start, clearly
        for dest in settings.destinations:
            if dest.type == "dicomweb":
                check_destination(dest)  # unreadable credentials or CA: refuse to start
        #: Destinations that refused the Label Map SEG with a store status (a refusal in
        #: negotiation costs nothing and is learned at each association).
        self._refuses_label_map: set[str] = set()
        #: Called per item sent or not: (destination, ok, attempt, seconds, gave_up).
        self.on_attempt = on_attempt
        #: Acknowledged items whose commit failed: id -> (sent at, next try, backoff,
        #: whether the binary alternative was the form sent).
        self._unrecorded: dict[int, tuple[float, float, float, bool]] = {}
        #: Items whose failed attempt could not be recorded: id -> not before.
        self._not_before: dict[int, float] = {}
        self.journal = AckJournal(journal or Path(jobs.path).parent / "outbox-acks.journal")
        for record in self.journal.records():  # a crash or a refused commit last time
            self._unrecorded[int(record["id"])] = (
                float(record["at"]),
                0.0,
                0.0,
                bool(record.get("alt", False)),
            )
        if self._unrecorded:
            log.info("%d acknowledgement(s) from the journal to record", len(self._unrecorded))
        self._record_pending()

    def _record_pending(self) -> None:
        """Commit acknowledgements the database refused before, those due now."""
        now = time.time()
        for item_id, (sent_at, next_try, wait, alt) in list(self._unrecorded.items()):
            if next_try > now:
                continue
            try:
                self.jobs.mark_sent(item_id, sent_at, alternative=alt)
            except sqlite3.Error as exc:
                lo, hi = self.RECORD_BACKOFF
                wait = min(hi, max(lo, wait * 2))
                self._unrecorded[item_id] = (sent_at, now + wait, wait, alt)
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
        self._unrecorded[item.id] = (sent_at, 0.0, 0.0, alternative)

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

    def _outgoing(self, dest: Destination, item: OutboxItem) -> Outgoing:
        """The item as a transport sends it: an SR follows the form its destination
        already took of the SEG it names, when it took one."""
        if not item.alt_path:
            return Outgoing(item.id, Path(item.path))
        choice = "auto" if item.kind == "SEG" else "follow"
        if choice == "follow":
            taken = self.jobs.sent_form(item.series_uid, item.model, dest.name, "SEG")
            if taken:
                choice = "alt" if taken == "binary" else "primary"
        return Outgoing(item.id, Path(item.path), Path(item.alt_path), choice)

    def _cstore(
        self,
        dest: Destination,
        outgoing: list[Outgoing],
        choice: SegChoice,
        on_ack: Callable[[Outgoing, Outcome], None],
    ) -> dict[int, Outcome]:
        """C-STORE ``outgoing`` to ``dest``: one item an association, up to its
        ``max_associations`` at once, when no item has an alternative form; otherwise over
        one association, in order, so that an SR follows the form its SEG took in it.

        A series' SEG, RTSTRUCT and SR are stored by the PACS one after another over one
        association; over three, its storage of each overlaps the others' (about half the
        time from the first C-STORE to the last acknowledgement, to Orthanc here).
        """

        def one_association(batch: list[Outgoing]) -> dict[int, Outcome]:
            try:
                return cstore_batch(
                    dest,
                    batch,
                    self.settings.node.ae_title,
                    self.settings.limits.network_timeout,
                    self.settings.tls,
                    choice,
                    on_ack,
                )
            except (ExportError, OSError) as exc:
                return {o.key: Outcome(False, error=str(exc)) for o in batch}

        if dest.max_associations == 1 or len(outgoing) == 1 or any(o.alt_path for o in outgoing):
            return one_association(outgoing)
        results: dict[int, Outcome] = {}
        workers = min(len(outgoing), dest.max_associations)
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="cstore") as pool:
            for part in pool.map(one_association, [[o] for o in outgoing]):
                results.update(part)
        return results

    def _send(self, dest: Destination, items: list[OutboxItem]) -> int:
        by_id = {i.id: i for i in items}
        outgoing = [self._outgoing(dest, i) for i in items]
        choice = SegChoice(refuses=dest.name in self._refuses_label_map)

        def on_ack(item: Outgoing, outcome: Outcome) -> None:
            self._acknowledged(by_id[item.key], time.time(), outcome.alternative)

        t0 = time.perf_counter()
        try:
            if dest.type == "dicomweb":
                results = stow_batch(
                    dest, outgoing, self.settings.limits.network_timeout, choice, on_ack
                )
            else:
                results = self._cstore(dest, outgoing, choice, on_ack)
        except (ExportError, OSError) as exc:
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
