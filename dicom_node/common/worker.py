"""The node's background loops: a thread that does what is due, then waits a while or until
it is woken.

The exporter, the storage commitment requests and the fetches each poll the job database for
work that another thread (or another process: ``dicom-node fetch``) queued. Each wakes at once
when its own process queues work, and polls otherwise, so that work queued elsewhere or due
later (a back-off ending) is never missed. An error in one round is logged and the loop goes
on: one bad item must not stop the stage.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Worker:
    """Runs ``step`` on a daemon thread named ``name``: again at once while it returns
    ``True`` (more is due), otherwise after ``interval`` seconds or a :meth:`wake`.

    ``what`` names the stage in the log line of a round that raised.
    """

    def __init__(self, name: str, step: Callable[[], bool], interval: float, what: str) -> None:
        self.name = name
        self.step = step
        self.interval = interval
        self.what = what
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Work was queued: take it now rather than at the next poll."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before the round: a wake during it brings the next at once
            try:
                while self.step() and not self._stop.is_set():
                    pass
            except Exception:  # noqa: BLE001 - logged; the next round tries again
                log.exception("%s error", self.what)
            self._wake.wait(self.interval)

    def stop(self, timeout: float = 60.0) -> None:
        """Ask the loop to end after its current round and wait up to ``timeout`` s."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
