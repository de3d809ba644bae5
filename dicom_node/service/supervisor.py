"""Child processes the node runs (its Triton server, the embedded Orthanc): one way to start,
watch, restart and stop them.

Each child runs in a process group of its own, so that stopping it stops what it started
too (Triton's backend stubs), even when the child itself died first; its output goes to a
log file whose last lines explain a failure. A :class:`Supervisor` keeps a child running
from a thread of its own, restarting it with back-off (:mod:`dicom_node.common.backoff`)
when it exits; a child may instead be restarted on demand (:meth:`ChildProcess.start` again),
as the Triton backend does before a request.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from dicom_node.common.backoff import backoff
from dicom_node.common.pids import pid_exists

__all__ = ["ChildProcess", "Supervisor", "SupervisorError", "pid_exists"]

log = logging.getLogger("dicom_node.service.supervisor")

#: prctl option: the signal the kernel sends the child when the thread that forked it dies.
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: a child only calls into it


class SupervisorError(RuntimeError):
    """A child did not start or keep running; the message says why, in one sentence."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Have the kernel SIGTERM this child when the thread that started it ends, so that a
    node killed outright leaves no child holding its ports."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class ChildProcess:
    """One program run as a child in its own process group, its output in ``log_path``.

    ``die_with_parent``: the kernel ends the child when the thread that started it ends
    (start it from a thread that lives as long as the child should). ``keep_previous_log``:
    the log of the run before is kept beside the new one (``.log.1``), as it says why that
    run died.
    """

    def __init__(
        self,
        command: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        die_with_parent: bool = False,
        keep_previous_log: bool = False,
    ) -> None:
        self.command = list(command)
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.die_with_parent = die_with_parent
        self.keep_previous_log = keep_previous_log
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    @property
    def started(self) -> bool:
        """Whether it was started (and not stopped since), running or not."""
        return self._process is not None

    def start(self) -> None:
        """Start the program (what is left of an earlier run is killed first)."""
        if self._process is not None:
            self.kill()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.keep_previous_log and self.log_path.exists():
            self.log_path.replace(self.log_path.with_suffix(".log.1"))
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open while it runs
        self._process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent if self.die_with_parent else None,
        )

    def is_alive(self) -> bool:
        """True while the program runs."""
        return self._process is not None and self._process.poll() is None

    def poll(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    def signal_group(self, sig: signal.Signals) -> None:
        """Signal the child's process group: the child and what it started."""
        if self._process is None:
            return
        pgid = self._process.pid
        if self._process.returncode is not None and pid_exists(pgid):
            # The child was reaped and its number now names another process, so a group
            # with that id is not ours any more (while ours exists, the id is not reused).
            return
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the group is already gone

    def stop(self, graceful: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Ask the child to end (``graceful``), then kill whatever is left of its group."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(graceful)
            try:
                self._process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", self.command[0], timeout)
        self.kill(timeout)

    def kill(self, timeout: float = 30.0) -> None:
        """SIGKILL the child's group and reap the child."""
        if self._process is None:
            return
        self.signal_group(signal.SIGKILL)
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.error("%s (pid %s) did not exit after SIGKILL", self.command[0], self.pid)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._process = None

    def log_tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of the child's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


class Supervisor:
    """Keeps a :class:`ChildProcess` running from a thread of its own.

    :meth:`start` returns once ``ready()`` is true, or raises :class:`SupervisorError` (the
    child exited at start, or was not ready within ``startup_timeout``). Afterwards a child
    that exits is restarted after ``backoff(failures, 1 s, 60 s)``; a run of over a minute
    resets the count. The child is started from the supervising thread, which lives as long
    as it should, for ``die_with_parent``.
    """

    #: A run this long counts as healthy: the next failure waits the shortest back-off.
    HEALTHY_RUN_SECONDS = 60.0

    def __init__(
        self,
        name: str,
        child: ChildProcess,
        ready: Callable[[], bool],
        startup_timeout: float,
    ) -> None:
        self.name = name
        self.child = child
        self.ready = ready
        self.startup_timeout = startup_timeout
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._error = ""
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._supervise, name=f"dicom-node-{self.name}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline and not self._error:
            if self._started.wait(0.1):
                return
        self.stop()
        raise SupervisorError(
            self._error
            or f"{self.name} was not ready within {self.startup_timeout:.0f} s "
            f"(see {self.child.log_path})"
        )

    def _supervise(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            self.child.start()
            began = time.monotonic()
            while self.child.is_alive() and not self._stopping.is_set():
                if not self._started.is_set() and self.ready():
                    self._started.set()
                self._stopping.wait(0.1)
            if self._stopping.is_set():
                break
            code, last = self.child.returncode, _last_line(self.child.log_tail(1))
            if not self._started.is_set():
                self._error = f"{self.name} exited with status {code} at start: {last}"
                return
            failures = 1 if time.monotonic() - began > self.HEALTHY_RUN_SECONDS else failures + 1
            wait = backoff(failures, 1.0, 60.0)
            log.error(
                "%s exited with status %s; restarting in %.0f s (%s)", self.name, code, wait, last
            )
            if self._stopping.wait(wait):
                break
        self.child.stop()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(60)
            self._thread = None
        self.child.stop()


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""
