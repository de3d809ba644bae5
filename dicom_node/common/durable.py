"""Files that survive a crash the moment a function returns: the node's one way of writing
what it has promised to keep (spooled instances, results, the acknowledgement journal)."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["fsync_dir", "start_writeback", "write_durably"]

#: ``sync_file_range(2)``'s flag that starts writing the range out without waiting for it.
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux only; Python's ``os`` has none), or ``None``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    return call  # a CDLL call releases the interpreter while it runs


_writeback = _sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Have the disk start writing ``nbytes`` of ``fd`` from ``offset``, without waiting.

    For a file written as it arrives and synced once it is whole: the bytes already
    written are on their way to the disk while the rest arrives, and the final
    ``fdatasync`` waits for the last piece and the journal only (with the rename and the
    directory's sync, 0.21 to 0.26 ms for a 513 KiB CT slice here, against 0.58 to
    0.75 ms to write and sync the whole file). It promises no
    durability (metadata and the disk's cache are the ``fdatasync``'s); where the call
    does not exist it does nothing.
    """
    if _writeback is not None and nbytes > 0:
        _writeback(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


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
