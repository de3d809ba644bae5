"""The process's memory: what the garbage collector walks, what glibc keeps, where a
volume's pages live.

A node holds a whole CT volume (300 MiB at 512x512x600) beside torch, MONAI and the network,
and its peak is a few hundred megabytes of working memory on top (docs/performance.md,
"Peak memory"). These are the few places where the process, not the algorithm, decides how
much of that stays resident:

- :func:`freeze_heap`: the start-up objects (torch, MONAI, pydicom's and highdicom's
  dictionaries, hundreds of thousands of them) are exempt from the cyclic collector, which
  would otherwise walk them again at each full collection, tens of milliseconds in the
  middle of a series' preprocessing or encoding.
- :func:`release_free_memory`: glibc keeps what a thread freed in that thread's heap; the
  network's activations and the sliding window's patches are tens of megabytes each.
- :func:`empty_volume` and :func:`discard_leading`: a volume in pages of its own, which
  are given back, slab by slab, as soon as the preprocessing has read them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import mmap
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["discard_leading", "empty_volume", "freeze_heap", "release_free_memory"]


def freeze_heap() -> None:
    """Collect what start-up left over, then freeze everything still alive."""
    gc.collect()
    gc.freeze()


def release_free_memory() -> None:
    """Hand the memory the process freed back to the system (glibc's ``malloc_trim``).

    Blocks under glibc's mmap threshold (dynamic, up to 32 MiB) come from the allocating
    thread's heap, which keeps them resident after they are freed: after the network ran
    on a 512x512x600 series, some 150 to 250 MiB, which the label map at the source's
    size then came on top of. Elsewhere (no glibc) this does nothing.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once (``find_library`` runs ``ldconfig``: milliseconds,
    twice a segmentation)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def empty_volume(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """``numpy.empty`` for a volume, in an anonymous mapping of its own, in ordinary pages.

    numpy asks the kernel for 2 MiB huge pages for every array over 4 MiB. A volume is
    often filled out of order, as its slices arrived (:mod:`dicom_node.series.assembly`): with
    huge pages each 512 KiB slice copied makes 2 MiB resident, so the whole volume is
    resident when a fifth of its slices are in place, while the staging area still holds
    the other four fifths (some 200 MiB over one volume at 512x512x600). Here a volume
    becomes resident as it fills, its pages can be given back early
    (:func:`discard_leading`), and the mapping goes when the last view of it does.
    """
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    pages = mmap.mmap(
        -1, max(count * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    )
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
        pages.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(pages, dtype, count).reshape(tuple(shape))


def discard_leading(array: np.ndarray, count: int) -> int:
    """Give back the pages of ``array[:count]``, which nothing will read again.

    For a volume the caller owns and consumes front to back: from here on those items
    read as zeros. Only an array of :func:`empty_volume` (C-contiguous, in its own
    mapping) is touched; any other is left as it is. Returns the bytes given back.
    """
    pages: Any = array
    while pages is not None and not isinstance(pages, mmap.mmap):
        pages = pages.obj if isinstance(pages, memoryview) else getattr(pages, "base", None)
    if pages is None or not array.flags.c_contiguous or count <= 0:
        return 0
    origin = np.frombuffer(pages, np.uint8, 1).ctypes.data
    start = array.ctypes.data - origin
    end = start + min(count, len(array)) * array.strides[0]
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last <= first:
        return 0
    pages.madvise(mmap.MADV_DONTNEED, first, last - first)
    return last - first
