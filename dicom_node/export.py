"""Send results to destinations with C-STORE, through the durable outbox.

A result file is written to disk and recorded in the outbox before anything is sent
(see :mod:`dicom_node.jobs`). This module takes due outbox items, sends each over one
association per destination, and records the outcome: acknowledged items are never sent
again; failures wait with exponential backoff and are retried until the destination's
attempt limit, after which they stay visible as failed for ``dicom-node retry``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pydicom
from pynetdicom import AE

from dicom_node.config import Destination, Settings, TLSSettings
from dicom_node.jobs import JobStore, OutboxItem
from dicom_node.tls import client_ssl_context, client_tls_args

log = logging.getLogger("dicom_node.export")

#: Statuses a Storage SCP uses for success or success-with-warning (PS3.4 B.2.3).
_OK = {0x0000, 0xB000, 0xB006, 0xB007}


class ExportError(RuntimeError):
    """A destination could not be reached or refused; the message says which and how."""


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (exponential, capped)."""
    return min(cap, base * (2 ** max(0, attempt - 1)))


def send_files(
    destination: Destination,
    paths: list[Path],
    calling_ae: str,
    timeout: float = 30.0,
    tls: TLSSettings | None = None,
) -> dict[Path, int | str]:
    """C-STORE ``paths`` to ``destination`` in one association.

    Returns, per path, the DIMSE status (int) or an error sentence (str). Raises
    :class:`ExportError` when no association could be established.
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
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=client_tls_args(tls or TLSSettings(), destination),
    )
    if not assoc.is_established:
        if assoc.is_rejected:
            raise ExportError(f"{destination.name} rejected the association")
        raise ExportError(
            f"{destination.name} ({destination.host}:{destination.port}) cannot be reached"
        )
    results: dict[Path, int | str] = {}
    try:
        for path, ds in datasets.items():
            try:
                status = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as exc:
                results[path] = f"not sent: {exc}"
                continue
            results[path] = int(status.Status) if status and "Status" in status else (
                "no response (association lost)"
            )
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return results


class Exporter:
    """Works through the outbox, grouping due items per destination."""

    def __init__(
        self,
        settings: Settings,
        jobs: JobStore,
        on_attempt: Callable[[str, bool, int, float, bool], None] | None = None,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.destinations = {d.name: d for d in settings.destinations}
        if any(d.tls for d in settings.destinations):
            client_ssl_context(settings.tls)  # a bad certificate path fails at start, clearly
        #: Called per item sent or not: (destination, ok, attempt, seconds, gave_up).
        self.on_attempt = on_attempt

    def run_once(self) -> int:
        """Send what is due now; return how many items were acknowledged."""
        due = self.jobs.due_results()
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
        t0 = time.perf_counter()
        try:
            results: dict[Path, int | str] = send_files(
                dest,
                paths,
                self.settings.node.ae_title,
                self.settings.limits.network_timeout,
                self.settings.tls,
            )
        except (ExportError, OSError) as exc:
            results = {p: str(exc) for p in paths}
        seconds = time.perf_counter() - t0
        sent = 0
        for item in items:
            outcome = results.get(Path(item.path), "not attempted (association ended early)")
            if isinstance(outcome, int) and outcome in _OK:
                self.jobs.mark_sent(item.id)
                sent += 1
                if self.on_attempt is not None:
                    self.on_attempt(dest.name, True, item.attempts + 1, seconds, False)
                log.info("%s of series %s sent to %s", item.kind, item.series_uid, dest.name)
                continue
            error = f"status 0x{outcome:04X}" if isinstance(outcome, int) else outcome
            attempt = item.attempts + 1
            give_up = attempt >= dest.attempts
            wait = backoff(attempt, dest.retry_backoff_seconds, dest.max_backoff_seconds)
            self.jobs.mark_attempt_failed(item.id, error, time.time() + wait, give_up)
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
