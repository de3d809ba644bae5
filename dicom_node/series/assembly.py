"""Streaming assembly: each slice staged while the rest of its series is still arriving.

Reading and decoding a series' slices after it is complete would be most of the
"assemble" stage. Here the C-STORE handler hands each new instance's parsed data set to
:meth:`StreamingAssembler.feed`, which keeps its header (without Pixel Data) for the
series. When the series is complete, :meth:`StagedSeries.assemble` plans the volume from
those headers with the very checks and highdicom geometry of
:func:`dicom_node.series.volume.plan_single_frame`, allocates the volume with the node's
allocator (shared memory for a local Triton server) and fills it; no header is parsed
again.

How a slice's voxels reach the volume depends on its encoding:

* **The common CT slice** (native little-endian 16-bit samples, rescale slope 1, an
  integer intercept, Pixel Data last in the data set) is not decoded while the series
  arrives. The handler notes where its stored values lie in its spool file (the file is
  synced before the C-STORE is answered, so its pages are in the page cache), and
  assembly reads them straight into the volume's slot and turns them into Hounsfield units
  there, with whole-array numpy operations. Decoding each slice as it arrived, on a thread
  beside the associations, took the interpreter and a core from them: ingest was a fifth
  slower for it, for the few milliseconds per series it saves assembly.
* **Any other slice** (compressed, big-endian, a real rescale) is decoded as it arrives by
  one background thread into a staging area for the series (a queue put: the
  acknowledgement never waits). Slice positions order a volume, and they are known only
  once every slice is in, so a slice cannot go to its final place as it arrives. The
  staging area is a list of anonymous memory maps of up to :data:`CHUNK_SLICES` slices:
  after one chunk's slices are copied into the volume, the chunk is unmapped, so while the
  volume is filled the two together hold little more than one volume (the node's memory
  bound, README "Memory").

Whenever the staged slices cannot be trusted to be the series the job database lists (the
node restarted mid-series, a slice could not be decoded or read back, the staging budget
ran out, an Enhanced CT, slices of different sizes), :meth:`StagedSeries.assemble` returns
``None`` and the caller assembles from the spool with
:func:`dicom_node.series.volume.assemble_series`, which also gives every failure its usual
reason.
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
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
#: (7FE0,0010) Pixel Data.
_PIXEL_DATA = 0x7FE00010
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


@dataclass(frozen=True)
class InSpool:
    """Where a common CT slice's stored values lie in its spool file, and what makes them
    Hounsfield units: the samples (``signed``, ``bits`` stored of 16) plus ``intercept``."""

    offset: int
    signed: bool
    bits: int
    intercept: int


def in_spool(ds: Dataset, path: str, size: int | None = None) -> InSpool | None:
    """Where the slice ``ds``, stored at ``path`` (a file of ``size`` bytes, or as large as
    it is now), keeps its stored values, if it is a common CT slice that :func:`read_into`
    gives bit for bit as :func:`decode_into` would; ``None`` for any other slice (it is
    decoded from ``ds``).

    Pixel Data must be the data set's last element, so that its value ends the spool file
    (the Part 10 header, then the data set as received): it starts the value's length
    before the file's end.
    """
    meta = getattr(ds, "file_meta", None)
    if not (
        meta is not None
        and meta.get("TransferSyntaxUID") in _NATIVE_LITTLE_ENDIAN
        and ds.get("BitsAllocated") == 16
        and ds.get("SamplesPerPixel", 1) == 1
        and "ModalityLUTSequence" not in ds
        and ds.get("SOPClassUID") not in MULTIFRAME_CT_SOP_CLASSES
        and list(ds.keys())[-1:] == [_PIXEL_DATA]
    ):
        return None
    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        bits = int(ds.get("BitsStored", 16))
        pixels = ds.PixelData
        samples = int(ds.Rows) * int(ds.Columns)
    except (TypeError, ValueError, AttributeError):
        return None  # the decoding path gives its own reason
    if (
        slope != 1.0
        or not intercept.is_integer()
        or not 1 <= bits <= 16
        or not isinstance(pixels, bytes)
        or len(pixels) < samples * 2
    ):
        return None
    if size is None:
        try:
            size = os.stat(path).st_size
        except OSError:
            return None
    return InSpool(
        offset=size - len(pixels),
        signed=int(ds.get("PixelRepresentation", 0)) == 1,
        bits=bits,
        intercept=int(intercept),
    )


def read_into(fd: int, where: InSpool, out: np.ndarray) -> bool:
    """Read a slice's stored values from its spool file ``fd`` into ``out`` and make them
    what :func:`decode_into` gives; ``False`` where the file no longer holds them or a
    value does not fit ``out`` (the caller then reads the spool as a new series).

    An int16 ``out`` is read into directly and changed in place (masked or sign-extended
    to Bits Stored, the intercept added in 16 bits once the range is checked); a float32
    one through a scratch slice. The read and the numpy operations release the interpreter.
    """
    in_place = out.dtype == np.int16 and where.bits < 16
    stored: np.ndarray = (
        out.view(np.int16 if where.signed else np.uint16)
        if in_place
        else np.empty(out.shape, "<i2" if where.signed else "<u2")
    )
    view = memoryview(stored.reshape(-1)).cast("B")  # type: ignore[arg-type]  # numpy buffer
    done = 0
    while done < view.nbytes:
        n = os.preadv(fd, [view[done:]], where.offset + done)
        if n <= 0:
            return False  # the file is shorter than when it was stored
        done += n
    if where.bits < 16:  # to Bits Stored, in place (then every value fits an int16)
        if where.signed:  # sign-extend: shift the sign bit to the top and back
            np.left_shift(stored, 16 - where.bits, out=stored)
            np.right_shift(stored, 16 - where.bits, out=stored)
        else:
            np.bitwise_and(stored, (1 << where.bits) - 1, out=stored)
    if out.dtype == np.int16:
        values = out if in_place else stored  # masked in place: every value fits int16
        low, high = int(values.min()) + where.intercept, int(values.max()) + where.intercept
        if low < -32768 or high > 32767:
            return False  # numpy's cast decides, as on the spool path
        np.add(values, where.intercept, out=out, casting="unsafe")  # in range: exact
    else:  # float32: exact for every 16-bit value plus an integer intercept
        np.add(stored, np.float32(where.intercept), out=out, casting="unsafe")
    return True


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
    """The slices of one series staged so far, in arrival order, with their headers."""

    def __init__(self, series_uid: str, budget: _Budget) -> None:
        self.series_uid = series_uid
        self._budget = budget
        self._done = threading.Condition()
        self._pending = 0
        #: Guards the slices and chunks: handlers note slices while the decoder stages.
        self._lock = threading.Lock()
        #: spool path -> (where its voxels are, header without pixel data, spool file's
        #: Part 10 header as written or None): an :class:`InSpool`, or the slice's row in
        #: the staging chunks
        self._slices: dict[str, tuple[InSpool | int, Dataset, bytes | None]] = {}
        self._decoded = 0
        self._chunks: list[np.ndarray | None] = []
        self._per_chunk = 0
        self._dtype: np.dtype | None = None
        self._frame: tuple[int, int] | None = None
        #: Why the staged slices cannot be used; ``None`` while they can.
        self.problem: str | None = None

    def __len__(self) -> int:
        return len(self._slices)

    # -- the handlers' side ---------------------------------------------------------------
    def note(self, path: str, ds: Dataset, where: InSpool, meta: bytes | None) -> None:
        """Keep the header of a slice whose voxels stay in its spool file until assembly."""
        frame = (int(ds.Rows), int(ds.Columns))
        _strip_pixels(ds)
        with self._lock:
            if self.problem is not None:
                return
            if self._frame is None:
                self._frame = frame
            elif frame != self._frame:
                self._give_up("slices of different sizes")
                return
            self._slices[path] = (where, ds, meta)

    # -- the decoder's side ---------------------------------------------------------------
    def _expect(self) -> None:
        with self._done:
            self._pending += 1

    def _decode(self, path: str, ds: Dataset, meta: bytes | None) -> None:
        try:
            if self.problem is None:
                self._stage(path, ds, meta)
        except Exception as exc:  # noqa: BLE001 - the spool path reports it with its reason
            with self._lock:
                self._give_up(f"a slice could not be decoded ({exc})")
        finally:
            with self._done:
                self._pending -= 1
                self._done.notify_all()

    def _stage(self, path: str, ds: Dataset, meta: bytes | None) -> None:
        if ds.get("SOPClassUID") in MULTIFRAME_CT_SOP_CLASSES or "PixelData" not in ds:
            with self._lock:
                self._give_up("not a single-frame CT slice")
            return
        frame = (int(ds.Rows), int(ds.Columns))
        dtype: np.dtype[Any] = np.dtype(pixel_dtype([ds]))
        with self._lock:
            if self._frame is None:
                self._frame = frame
            elif frame != self._frame:
                self._give_up("slices of different sizes")
                return
            if self._dtype is None:
                self._dtype = dtype
                slice_bytes = frame[0] * frame[1] * dtype.itemsize
                self._per_chunk = max(1, min(CHUNK_SLICES, CHUNK_BYTES // slice_bytes))
            elif dtype != self._dtype and self._dtype != np.float32:
                # an integer staging area cannot hold this slice's rescaled values
                self._give_up("a slice needs floating-point voxels")
                return
            row = self._decoded
            chunk, offset = divmod(row, self._per_chunk)
            if chunk == len(self._chunks):
                shape = (self._per_chunk, *frame)
                if not self._budget.take(int(np.prod(shape)) * self._dtype.itemsize):
                    self._give_up("the staging budget is spent")
                    return
                self._chunks.append(_anonymous(shape, self._dtype))
            target = self._chunks[chunk]
            assert target is not None
            self._decoded += 1
        decode_into(ds, target[offset])
        _strip_pixels(ds)
        with self._lock:
            if self.problem is None:
                self._slices[path] = (row, ds, meta)

    def _give_up(self, problem: str) -> None:
        """Stop staging (with :attr:`_lock` held)."""
        if self.problem is None:
            self.problem = problem
            log.info("series %s: slices will be read from the spool: %s", self.series_uid, problem)
        self._release()

    def release(self) -> None:
        """Give the staging memory back (after assembly, or when it cannot be used)."""
        with self._lock:
            self._release()

    def _release(self) -> None:
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
                with self._lock:
                    self._give_up("the decoder did not catch up")
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
            staged = [self._slices[k] for k in keys]
            datasets = [ds for _, ds, _ in staged]
            for key, (_, ds, meta) in zip(keys, staged, strict=True):
                # the spool file's meta group, as a header read from the spool has it
                ds.file_meta = read_file_meta_info(key) if meta is None else file_meta_of(meta)
            plan = plan_single_frame(datasets, min_slices)
            if self._dtype is not None and np.dtype(plan.dtype) != self._dtype:
                return None  # float32 staged, but the whole series fits int16: re-read
            array = allocate(plan.shape, plan.dtype)
            slot_of_row = np.full(self._decoded, -1, dtype=np.int64)
            for slot, k in enumerate(plan.order):
                where = staged[k][0]
                if isinstance(where, int):
                    slot_of_row[where] = slot
                elif not _read_slice(keys[k], where, array[slot]):
                    log.info(
                        "series %s: slice %s no longer as stored: reading the spool",
                        self.series_uid,
                        keys[k],
                    )
                    return None
            for c in range(len(self._chunks)):
                chunk = self._chunks[c]
                assert chunk is not None
                first = c * self._per_chunk
                for row in range(min(self._per_chunk, self._decoded - first)):
                    array[int(slot_of_row[first + row])] = chunk[row]
                # unmapped now: the volume and the staging area never both hold it all
                with self._lock:
                    self._chunks[c] = None
                self._budget.give(chunk.nbytes)
                del chunk
            return volume_from_plan(datasets, plan, array, headers_only=True)
        finally:
            self.release()


def _strip_pixels(ds: Dataset) -> None:
    """Make the data set its own header: the pixel elements go (their bytes with them) in
    place, cheaper than a sliced copy while the series is still arriving."""
    for tag in [t for t in ds.keys() if int.__ge__(t, _PIXEL_TAGS_START)]:
        del ds[tag]


def _read_slice(path: str, where: InSpool, out: np.ndarray) -> bool:
    """:func:`read_into` from the spool file at ``path``; ``False`` if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return read_into(fd, where, out)
    except OSError:
        return False
    finally:
        os.close(fd)


class StreamingAssembler:
    """Stages every series the node is receiving: notes where the common slices lie, and
    decodes the others on one background thread for them all.

    One thread is enough to keep up with the slices that need decoding and, being one, it
    takes at most one core's worth of time, and the GIL, from the associations the node
    is serving.
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

    def feed(
        self,
        series_uid: str,
        path: str,
        dataset: Dataset,
        meta: bytes | None = None,
        size: int | None = None,
    ) -> None:
        """Stage a newly stored instance, written to ``path``; returns at once (C-STORE
        thread): a common CT slice is noted where it lies (:func:`in_spool`), any other is
        queued for the decoder.

        ``meta`` is the spool file's Part 10 header (preamble and File Meta Information),
        as written, and ``size`` the file's size; without them the header is read back
        from ``path`` at assembly, and the size asked of the file system.
        """
        with self._lock:
            staged = self._series.get(series_uid)
            if staged is None:
                staged = self._series[series_uid] = StagedSeries(series_uid, self._budget)
        where = in_spool(dataset, path, size)
        if where is not None:
            staged.note(path, dataset, where, meta)
            return
        staged._expect()
        self._queue.put((staged, path, dataset, meta))

    def on_stored(self, outcome: StoreOutcome) -> None:
        """Intake's C-STORE event: stage a new instance (the C-STORE response waits for no
        decoding)."""
        if outcome.new and outcome.dataset is not None:
            self.feed(
                outcome.series_uid,
                outcome.path,
                outcome.dataset,
                outcome.meta or None,
                outcome.size or None,
            )

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
