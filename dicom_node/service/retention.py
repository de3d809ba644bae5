"""The retention policy: delete old finished series, never anything still owed.

A series may go once it is finished (done, failed or no model) and every result is
acknowledged by its destination; a failed export keeps its series until an operator
retries or the destination is removed. Age (``days``) and size (``max_bytes``) limits are
applied oldest first.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from dicom_node.config import RetentionSettings
from dicom_node.state import JobDatabase, SeriesRecord

log = logging.getLogger("dicom_node.service.retention")


def _size(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        if p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        elif p.exists():
            total += p.stat().st_size
    return total


def apply_retention(
    policy: RetentionSettings,
    jobs: JobDatabase,
    spool_root: Path,
    results_root: Path,
    now: float | None = None,
) -> list[str]:
    """Delete what the policy allows; return the Series Instance UIDs deleted."""
    if policy.days <= 0 and policy.max_bytes <= 0:
        return []
    now = time.time() if now is None else now
    candidates: list[SeriesRecord] = jobs.series.retention_candidates()
    total = _size([spool_root, results_root]) if policy.max_bytes > 0 else 0
    deleted = []
    for record in candidates:
        too_old = policy.days > 0 and now - record.updated > policy.days * 86400
        too_big = policy.max_bytes > 0 and total > policy.max_bytes
        if not (too_old or too_big):
            continue
        paths = jobs.series.purge(record.series_uid)
        if not paths and record.instance_count:
            continue  # changed state meanwhile
        results = results_root / record.series_uid
        freed = _size([*paths, results])
        for p in paths:
            p.unlink(missing_ok=True)
        for directory in {p.parent for p in paths}:
            try:
                directory.rmdir()
            except OSError:
                pass
        shutil.rmtree(results, ignore_errors=True)
        total -= freed
        deleted.append(record.series_uid)
        log.info(
            "retention: series %s deleted (%s, %d bytes)",
            record.series_uid,
            "age" if too_old else "size",
            freed,
        )
    return deleted


class Retention:
    """Applies the policy every ``interval_seconds`` in a thread of its own."""

    def __init__(
        self, policy: RetentionSettings, jobs: JobDatabase, spool_root: Path, results_root: Path
    ) -> None:
        self.policy = policy
        self.jobs = jobs
        self.spool_root = spool_root
        self.results_root = results_root
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dicom-node-retention", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.policy.interval_seconds):
            try:
                apply_retention(self.policy, self.jobs, self.spool_root, self.results_root)
            except Exception:  # noqa: BLE001 - the policy must not stop the node
                log.exception("retention error")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
