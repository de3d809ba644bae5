"""Processes by id: whether one runs, and the files of those that ended.

A node leaves files named by its process id in shared memory (Triton's volume regions, the
label maps its encoder processes read): one killed outright cannot remove them, and the
next start removes those of nodes no longer running, never another running node's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["pid_exists", "remove_left_by_ended", "runs"]


def pid_exists(pid: int) -> bool:
    """Whether a process with this id runs (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_left_by_ended(paths: Iterable[Path], pid_of: Callable[[Path], int | None]) -> int:
    """Remove the files among ``paths`` that a process no longer running left (the pid
    each names, by ``pid_of``; ``None``: not one of ours, kept); return how many. A node
    killed outright leaves its shared memory files behind: the next start removes them, and
    leaves those of nodes still running alone."""
    removed = 0
    for path in paths:
        pid = pid_of(path)
        if pid is None or pid == os.getpid() or pid_exists(pid):
            continue
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def runs(pid: int) -> bool:
    """Whether process ``pid`` runs: it exists and is not a zombie (ended, not yet reaped by
    its parent)."""
    if not pid_exists(pid):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc to ask: it exists
    return not stat.rpartition(")")[2].strip().startswith("Z")
