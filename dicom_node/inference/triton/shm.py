"""Numpy arrays in POSIX shared memory, for a Triton server on this host to read and write.

A volume handed to a local server through system shared memory is otherwise held twice by
the node: once where it was assembled and once in the region the server reads. An array
made by :func:`shared_empty` is both: the volume is decoded straight into the region, and
the label maps the server writes into another region are read where they lie, unshared.

A region is a file under ``/dev/shm`` (what ``shm_open`` opens on Linux) mapped into this
process. Its space is reserved with ``posix_fallocate`` when it is made, so that a full
``/dev/shm`` (64 MB in a default Docker container) fails here with an error instead of
killing the process with SIGBUS on the first write past the limit. The name is removed
(:func:`unlink`) as soon as no server needs to open it any more; the memory itself lives
while some array still views it, and is freed with the last one. If the
process dies first, :func:`remove_stale` removes what it left at the next start.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicom_node.common.pids import remove_left_by_ended

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
#: Every region of the node is named ``<PREFIX>_<pid>_<random>``.
PREFIX = "dicom_node"


@dataclass(frozen=True)
class Region:
    """A shared-memory region holding one array: ``name`` is what a server registers it
    under, ``key`` what it opens, ``nbytes`` its size."""

    name: str
    key: str
    path: Path
    nbytes: int
    address: int  # where it is mapped in this process


# id() of each live region's mmap -> the region. The entry holds no reference to the mmap,
# so the mapping's life is that of the arrays viewing it; its finalizer removes the entry.
_regions: dict[int, Region] = {}


def shared_empty(shape: Sequence[int], dtype: np.dtype | type) -> np.ndarray:
    """A new uninitialised C-contiguous array whose memory is a shared-memory region.

    The region is removed from ``/dev/shm`` by :func:`unlink`, or when the last array
    viewing it is garbage-collected, whichever comes first. Raises ``OSError`` when it
    cannot be made (no ``/dev/shm``, not enough space there).
    """
    dtype = np.dtype(dtype)
    shape = tuple(int(n) for n in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    name = f"{PREFIX}_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    path = SHM_DIR / name
    size = max(nbytes, 1)  # mmap cannot map zero bytes
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        buffer = mmap.mmap(fd, size)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    array: np.ndarray = np.ndarray(shape, dtype, buffer=buffer)
    _regions[id(buffer)] = Region(name, f"/{name}", path, nbytes, array.ctypes.data)
    weakref.finalize(buffer, _forget, id(buffer), path)
    return array


def region_of(array: np.ndarray) -> Region | None:
    """The region ``array`` is the whole of, or ``None`` (part of one, or ordinary memory)."""
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    region = _regions.get(id(base)) if base is not None else None
    if region is None or not array.flags.c_contiguous or array.nbytes != region.nbytes:
        return None
    return region if array.ctypes.data == region.address else None


def unlink(region: Region) -> None:
    """Remove the region's name: no server can open it any more. The memory stays while
    some array views it."""
    region.path.unlink(missing_ok=True)


def _forget(buffer_id: int, path: Path) -> None:
    _regions.pop(buffer_id, None)
    path.unlink(missing_ok=True)


def allocate(shape: Sequence[int], dtype: np.dtype | type) -> np.ndarray:
    """An array in shared memory, or in ordinary memory when no region can be made.

    The fallback costs the node one copy of the volume when it is sent, not the job.
    """
    try:
        return shared_empty(shape, dtype)
    except OSError as exc:
        level = logging.WARNING if exc.errno == errno.ENOSPC else logging.INFO
        log.log(level, "volume kept in ordinary memory (no shared-memory region: %s)", exc)
        return np.empty(shape, dtype)


def named_regions(pid: int) -> list[str]:
    """Names of the regions of node process ``pid`` still in ``/dev/shm``.

    The Triton server's Python backend names its own regions with the same prefix and a
    port; a node's have 12 hex digits after the pid.
    """
    ours = re.compile(rf"{PREFIX}_{pid}_[0-9a-f]{{12}}")
    return sorted(p.name for p in SHM_DIR.glob(f"{PREFIX}_{pid}_*") if ours.fullmatch(p.name))


def remove_stale() -> int:
    """Remove the regions of node processes that are no longer running; return how many."""

    def pid_of(path: Path) -> int | None:
        try:
            return int(path.name.split("_")[2])
        except (IndexError, ValueError):
            return None

    return remove_left_by_ended(SHM_DIR.glob(f"{PREFIX}_*_*"), pid_of)
