"""Files that survive a crash the moment a function returns: the node's one way of writing
what it has promised to keep (spooled instances, results, the acknowledgement journal)."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

__all__ = ["fsync_dir", "write_durably"]


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (a new or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, tmp_dir: Path | None = None) -> tuple[int, str]:
    """Write ``data`` to ``path`` so that it survives a crash the moment this returns.

    The bytes go to a temporary file in ``tmp_dir`` (same file system), which is fsynced
    and renamed over ``path``; the directory is fsynced so the rename itself is durable.
    A reader never sees a half-written file. Returns (size, sha256 hex digest).
    """
    tmp_dir = tmp_dir or path.parent
    tmp = tmp_dir / f"{path.name}.{uuid.uuid4().hex}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return len(data), hashlib.sha256(data).hexdigest()
