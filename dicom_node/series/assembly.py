"""Streaming assembly: decode each slice while the rest of its series is still arriving.

Reading and decoding a series' slices after it is complete would be most of the
"assemble" stage. Here the C-STORE handler hands each new instance's parsed data set to
:meth:`StreamingAssembler.feed` (a queue put: the acknowledgement never waits), and one
background thread decodes its pixels into a staging area for the series, in arrival order,
keeping the header (without Pixel Data) beside it. When the series is complete,
:meth:`StagedSeries.assemble` plans the volume from those headers with the very checks and
highdicom geometry of :func:`dicom_node.series.volume.plan_single_frame`, allocates the volume with
the node's allocator (shared memory for a local Triton server) and fills it by copying
slices only; nothing is read from the spool and nothing is decoded.

Slice positions order a volume, and they are known only once every slice is in, so a slice
cannot go to its final place as it arrives. The staging area is a list of anonymous memory
maps of up to :data:`CHUNK_SLICES` slices: after one chunk's slices are copied into the
volume, the chunk is unmapped, so while the volume is filled the two together hold little
more than one volume (the node's memory bound, README "Memory").

Whenever the staged slices cannot be trusted to be the series the job database lists (the
node restarted mid-series, a slice could not be decoded, the staging budget ran out, an
Enhanced CT, slices of different sizes), :meth:`StagedSeries.assemble` returns ``None`` and
the caller assembles from the spool with :func:`dicom_node.series.volume.assemble_series`, which
also gives every failure its usual reason.
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info

from dicom_node.intake.checks import MULTIFRAME_CT_SOP_CLASSES
from dicom_node.intake.received import file_meta_of
from dicom_node.intake.storage import StoreOutcome
from dicom_node.series.volume import (
    Allocator,
    SeriesVolume,
    decode_slice,
    pixel_dtype,
    plan_single_frame,
    volume_from_plan,
)

log = logging.getLogger("dicom_node.series.assembly")

#: Slices per staging chunk, and at most this many bytes per chunk: 64 slices of a 512x512
#: CT are 32 MiB, the memory the volume and the staging area share beyond one volume.
CHUNK_SLICES = 64
CHUNK_BYTES = 32 * 2**20
#: Staged bytes across all series at most; series beyond it are read from the spool.
MAX_STAGED_BYTES = 2**30
#: First tag not kept in a header: (7FE0,0008) Float Pixel Data and what follows, as
#: ``pydicom.dcmread(..., stop_before_pixels=True)`` stops there.
_PIXEL_TAGS_START = 0x7FE00008
#: A staging chunk's mapping: private, anonymous, its pages populated at once.
_CHUNK_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
#: How long a job waits for the decoder to catch up with its series before it gives up
#: on the staged slices (the decoder is a single thread, normally milliseconds behind).
_DRAIN_TIMEOUT = 300.0


class _Budget:
    """Bytes held by staging chunks, across series."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        with self._lock:
            if self.used + nbytes > self.limit:
                return False
            self.used += nbytes
            return True

    def give(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


#: Transfer syntaxes whose Pixel Data is the plain little-endian sample array.
_NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


def decode_into(ds: Dataset, out: np.ndarray) -> None:
    """Write the slice's Hounsfield units into ``out``: ``out[...] = decode_slice(ds)``.

    Hand-written for the common CT slice (native little-endian 16-bit samples, rescale slope
    1, an integer intercept, an int16 volume), because this runs while the series is still
    arriving: pydicom's ``pixel_array`` and its float64 modality LUT hold the interpreter
    for ~0.6 ms a slice and slowed ingest by a quarter. Here the samples are masked
    (unsigned) or sign-extended (signed) to Bits Stored in place in ``out``, their range
    checked, and the intercept added in 16 bits: whole-array numpy operations that release
    the interpreter and make no temporary copy of the slice. The same bits as pydicom's;
    anything else, or a result beyond int16, goes through
    :func:`~dicom_node.series.volume.decode_slice`.
    """
    meta = getattr(ds, "file_meta", None)
    fast = (
        out.dtype == np.int16
        and meta is not None
        and meta.get("TransferSyntaxUID") in _NATIVE_LITTLE_ENDIAN
        and ds.get("BitsAllocated") == 16
        and ds.get("SamplesPerPixel", 1) == 1
        and "ModalityLUTSequence" not in ds
        and float(ds.get("RescaleSlope", 1) or 1) == 1.0
        and float(ds.get("RescaleIntercept", 0) or 0).is_integer()
        and 1 <= int(ds.get("BitsStored", 16)) <= 16
        and isinstance(ds.get("PixelData"), bytes)
        and len(ds.PixelData) >= out.size * 2
    )
    if not fast:
        out[...] = decode_slice(ds)
        return
    bits = int(ds.BitsStored)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    intercept = int(float(ds.get("RescaleIntercept", 0) or 0))
    stored = np.frombuffer(ds.PixelData, "<i2" if signed else "<u2", out.size).reshape(out.shape)
    values: np.ndarray = stored
    if bits < 16:  # to Bits Stored, in place in ``out`` (which then fits every value)
        if signed:  # sign-extend: shift the sign bit to the top and back
            np.left_shift(stored, 16 - bits, out=out)
            np.right_shift(out, 16 - bits, out=out)
        else:
            np.bitwise_and(stored, (1 << bits) - 1, out=out.view(np.uint16))
        values = out
    if int(values.min()) + intercept < -32768 or int(values.max()) + intercept > 32767:
        out[...] = decode_slice(ds)  # beyond int16: let numpy's cast decide, as elsewhere
        return
    np.add(values, intercept, out=out, casting="unsafe")  # in range: exact in 16 bits


def _anonymous(shape: tuple[int, int, int], dtype: np.dtype) -> np.ndarray:
    """An array in its own anonymous memory map, unmapped when the last view goes.

    ``numpy.empty`` would take the memory from malloc, which for blocks under its mmap
    threshold (dynamic, up to 32 MiB) keeps freed memory in the process: a chunk freed
    while the volume is being filled would then not give its pages back. The pages are
    populated when the chunk is mapped (Linux): faulting them in one at a time as slices
    were decoded into them cost ingest some 0.3 ms of CPU per 512x512 slice.
    """
    nbytes = int(np.prod(shape)) * dtype.itemsize
    memory = mmap.mmap(-1, max(nbytes, 1), flags=_CHUNK_FLAGS)
    return np.frombuffer(memory, dtype, int(np.prod(shape))).reshape(shape)


class StagedSeries:
    """The slices of one series decoded so far, in arrival order, with their headers."""

    def __init__(self, series_uid: str, budget: _Budget) -> None:
        self.series_uid = series_uid
        self._budget = budget
        self._done = threading.Condition()
        self._pending = 0
        #: spool path -> (arrival index, header without pixel data)
        self._slices: dict[str, tuple[int, Dataset]] = {}
        self._chunks: list[np.ndarray | None] = []
        self._per_chunk = 0
        self._dtype: np.dtype | None = None
        self._frame: tuple[int, int] | None = None
        #: Why the staged slices cannot be used; ``None`` while they can.
        self.problem: str | None = None

    def __len__(self) -> int:
        return len(self._slices)

    # -- the decoder's side ---------------------------------------------------------------
    def _expect(self) -> None:
        with self._done:
            self._pending += 1

    def _decode(self, path: str, ds: Dataset, meta: bytes | None) -> None:
        try:
            if self.problem is None:
                self._stage(path, ds, meta)
        except Exception as exc:  # noqa: BLE001 - the spool path reports it with its reason
            self._give_up(f"a slice could not be decoded ({exc})")
        finally:
            with self._done:
                self._pending -= 1
                self._done.notify_all()

    def _stage(self, path: str, ds: Dataset, meta: bytes | None) -> None:
        if ds.get("SOPClassUID") in MULTIFRAME_CT_SOP_CLASSES or "PixelData" not in ds:
            self._give_up("not a single-frame CT slice")
            return
        frame = (int(ds.Rows), int(ds.Columns))
        dtype: np.dtype[Any] = np.dtype(pixel_dtype([ds]))
        if self._dtype is None:
            self._dtype, self._frame = dtype, frame
            slice_bytes = frame[0] * frame[1] * dtype.itemsize
            self._per_chunk = max(1, min(CHUNK_SLICES, CHUNK_BYTES // slice_bytes))
        elif frame != self._frame:
            self._give_up("slices of different sizes")
            return
        elif dtype != self._dtype and self._dtype != np.float32:
            # an integer staging area cannot hold this slice's rescaled values
            self._give_up("a slice needs floating-point voxels")
            return
        index = len(self._slices)
        chunk, row = divmod(index, self._per_chunk)
        if chunk == len(self._chunks):
            shape = (self._per_chunk, *frame)
            if not self._budget.take(int(np.prod(shape)) * self._dtype.itemsize):
                self._give_up("the staging budget is spent")
                return
            self._chunks.append(_anonymous(shape, self._dtype))
        target = self._chunks[chunk]
        assert target is not None
        decode_into(ds, target[row])
        # The data set becomes its own header: the pixel elements go (their bytes with
        # them) in place, cheaper than a sliced copy while the series is still arriving.
        for tag in [t for t in ds.keys() if int.__ge__(t, _PIXEL_TAGS_START)]:
            del ds[tag]
        # the spool file's meta group, as a header read from the spool has it: parsed here,
        # off the C-STORE's way and before the series completes, from the header as written
        ds.file_meta = read_file_meta_info(path) if meta is None else file_meta_of(meta)
        self._slices[path] = (index, ds)

    def _give_up(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem
            log.info("series %s: slices will be read from the spool: %s", self.series_uid, problem)
        self.release()

    def release(self) -> None:
        """Give the staging memory back (after assembly, or when it cannot be used)."""
        for i, chunk in enumerate(self._chunks):
            if chunk is not None:
                self._budget.give(chunk.nbytes)
                self._chunks[i] = None
        self._slices.clear()

    # -- the job's side -------------------------------------------------------------------
    def assemble(
        self, paths: Sequence[Path], min_slices: int, allocate: Allocator
    ) -> SeriesVolume | None:
        """The series as a volume from the staged slices, or ``None`` to read the spool.

        ``paths`` are the series' instances as the job database lists them, in the order
        :func:`~dicom_node.series.volume.assemble_series` would read them, so that the checks see
        the headers in the same order and a series that is not a volume fails with the
        same :class:`~dicom_node.series.volume.VolumeError`. The result is the same volume, bit
        for bit, as :func:`~dicom_node.series.volume.assemble_series` of ``paths``.
        """
        with self._done:
            if not self._done.wait_for(lambda: self._pending == 0, timeout=_DRAIN_TIMEOUT):
                self.problem = self.problem or "the decoder did not catch up"
        try:
            if self.problem is not None:
                return None
            keys = [str(p) for p in paths]
            if len(keys) != len(self._slices) or any(k not in self._slices for k in keys):
                log.info(
                    "series %s: %d slice(s) staged, %d in the job database (restart?): "
                    "reading the spool",
                    self.series_uid,
                    len(self._slices),
                    len(keys),
                )
                return None
            datasets = [self._slices[k][1] for k in keys]
            plan = plan_single_frame(datasets, min_slices)
            if np.dtype(plan.dtype) != self._dtype:
                return None  # float32 staged, but the whole series fits int16: re-read
            slot_of_arrival = np.empty(len(keys), dtype=np.int64)
            for slot, k in enumerate(plan.order):
                slot_of_arrival[self._slices[keys[k]][0]] = slot
            array = allocate(plan.shape, plan.dtype)
            for c in range(len(self._chunks)):
                chunk = self._chunks[c]
                assert chunk is not None
                first = c * self._per_chunk
                for row in range(min(self._per_chunk, len(keys) - first)):
                    array[int(slot_of_arrival[first + row])] = chunk[row]
                # unmapped now: the volume and the staging area never both hold it all
                self._chunks[c] = None
                self._budget.give(chunk.nbytes)
                del chunk
            return volume_from_plan(datasets, plan, array, headers_only=True)
        finally:
            self.release()


class StreamingAssembler:
    """Stages every series the node is receiving; one decoder thread for them all.

    One thread is enough to keep up with ingest (a slice decodes in well under the time a
    C-STORE takes) and, being one, it takes at most one core's worth of time, and the GIL,
    from the associations the node is serving.
    """

    def __init__(self, max_bytes: int = MAX_STAGED_BYTES) -> None:
        self._budget = _Budget(max_bytes)
        self._series: dict[str, StagedSeries] = {}
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[StagedSeries, str, Dataset, bytes | None] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name="dicom-node-assembly", daemon=True)
        self._thread.start()

    def feed(self, series_uid: str, path: str, dataset: Dataset, meta: bytes | None = None) -> None:
        """Queue a newly stored instance for decoding; returns at once (C-STORE thread).

        ``meta`` is the spool file's Part 10 header (preamble and File Meta Information),
        as written; without it the header is read back from ``path``.
        """
        with self._lock:
            staged = self._series.get(series_uid)
            if staged is None:
                staged = self._series[series_uid] = StagedSeries(series_uid, self._budget)
            staged._expect()
        self._queue.put((staged, path, dataset, meta))

    def on_stored(self, outcome: StoreOutcome) -> None:
        """Intake's C-STORE event: stage a new instance (a queue put: the C-STORE response
        does not wait for its decoding)."""
        if outcome.new and outcome.dataset is not None:
            self.feed(outcome.series_uid, outcome.path, outcome.dataset, outcome.meta or None)

    def take(self, series_uid: str) -> StagedSeries | None:
        """The series' staged slices, for a job; instances stored later start a new one."""
        with self._lock:
            return self._series.pop(series_uid, None)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    @property
    def staged_bytes(self) -> int:
        return self._budget.used

    def _run(self) -> None:
        try:  # Linux: a lower priority for this thread only, under the associations'
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)
        except (AttributeError, OSError):
            pass
        while True:
            item = self._queue.get()
            if item is None:
                return
            staged, path, dataset, meta = item
            staged._decode(path, dataset, meta)
            del item, staged, dataset  # the received bytes go with the last reference
