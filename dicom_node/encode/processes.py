"""Result objects built and encoded in worker processes, beside the node's interpreter.

Building a SEG, an RTSTRUCT and an SR is mostly Python: highdicom's content items, pydicom's
data elements, the writing of thousands of nested items. In the node's own process the three
share one interpreter with each other and with every association receiving images: for 104
organs that is 2.5 s of CPU one thread at a time, and ingest slows while it lasts. Here they
run in worker processes, on as many cores:

- The encoders are split into **chains** (:func:`~dicom_node.encode.registry.chains`) that
  can be built apart. The SEG announces its UIDs and segments first
  (:class:`~dicom_node.encode.registry.Announcing`), so the SR, which reads no more of it
  (:class:`~dicom_node.encode.registry.Referencing`), does not wait for it: the SEG, the
  RTSTRUCT and the SR are three chains. The first is built in the node's process while the
  workers build the others.
- The **label map** is written once to a file in ``/dev/shm`` (memory, never the disk) that
  each worker maps read-only; the source's headers and geometry go pickled, the voxels not
  at all.
- A worker hands back each object as its **Part 10 bytes** (:class:`EncodedObject`), ready
  to be written: reading a big SR back into pydicom objects would cost as much as building
  it (0.4 s for 104 organs).
- The workers are forked from a **fork server** that has imported the encoders and read
  highdicom's tables of the standard once, so a worker starts in milliseconds with all of
  it, and none is forked from the node's own threads. The workers run at a lower priority
  than the node, whose process answers C-STOREs meanwhile. A worker ends once the node is
  gone, even one killed outright, and the fork server with it.

An encoder that cannot be pickled (one defined inside a function) is built in the node's
process, as is everything when the pool is off (``[results] encode_processes = 0``), when
the result holds few labels (``encode_processes_min_labels``: the workers would cost more
than they save) or when a worker dies (its chain is built again in the node's process,
with a warning, and the next series gets new workers): results are made either way.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import logging
import multiprocessing
import os
import pickle
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.common.heap import release_free_memory
from dicom_node.common.pids import remove_left_by_ended, runs
from dicom_node.config import ResultSettings
from dicom_node.encode.labels import is_indexed, label_counts, label_index
from dicom_node.encode.registry import (
    Announcing,
    EncodeContext,
    Encoder,
    Referencing,
    announce,
    chains,
    encode_all,
    register,
)
from dicom_node.series.volume import SeriesVolume

__all__ = [
    "EncodeRequest",
    "EncodedObject",
    "EncoderProcesses",
    "encode_in_process",
    "part10",
    "remove_stale_labels",
]

log = logging.getLogger(__name__)

#: Imported by the fork server before it forks any worker (see the module).
WORKER_PRELOAD = "dicom_node.encode._preload"

#: Where a label map is shared with the workers: memory, not the disk.
SHARED_MEMORY_DIR = Path("/dev/shm")
#: A shared label map's file name: this, the node's process id, a dash, a unique part.
LABELS_PREFIX = "dicom-node-labels-"


def remove_stale_labels() -> int:
    """Remove the label maps that node processes no longer running left shared (a node
    killed while encoding); return how many. A running node's are left alone."""

    def pid_of(path: Path) -> int | None:
        try:
            return int(path.name[len(LABELS_PREFIX) :].split("-")[0])
        except ValueError:
            return None

    return sum(
        remove_left_by_ended(folder.glob(f"{LABELS_PREFIX}*-*"), pid_of)
        for folder in {SHARED_MEMORY_DIR, Path(tempfile.gettempdir())}
    )


@dataclass(frozen=True)
class EncodedObject:
    """One result object as written: its kind, SOP Instance UID and Part 10 bytes."""

    kind: str
    sop_instance_uid: str
    data: bytes


def part10(kind: str, ds: Dataset) -> EncodedObject:
    """``ds`` encoded as a Part 10 file (preamble, meta information, data set)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return EncodedObject(kind, str(ds.SOPInstanceUID), buf.getvalue())


@dataclass(frozen=True)
class EncodeRequest:
    """One set of objects to make: ``chosen`` encoders of a context with ``settings`` (the
    same context may be asked for with other settings: a binary SEG beside a label map)."""

    chosen: Sequence[Encoder]
    settings: ResultSettings


def encode_in_process(
    context: EncodeContext, requests: Sequence[EncodeRequest]
) -> list[dict[str, EncodedObject]]:
    """Every request's objects built in this process (the encoders in threads, as
    :func:`~dicom_node.encode.registry.encode_all` does), one dict by kind per request."""
    return [
        _encode_files(dataclasses.replace(context, settings=r.settings), r.chosen) for r in requests
    ]


def _encode_files(context: EncodeContext, chosen: Sequence[Encoder]) -> dict[str, EncodedObject]:
    """``chosen`` built for ``context`` (:func:`~dicom_node.encode.registry.encode_all`),
    each object as the bytes of its file."""
    return {kind: part10(kind, ds) for kind, ds in encode_all(context, chosen).items()}


@dataclass(frozen=True)
class _SharedLabels:
    """A label map in a file the workers map: where, and its shape and type."""

    path: str
    shape: tuple[int, ...]
    dtype: str


def _share(labels: np.ndarray) -> _SharedLabels:
    """Write ``labels`` to a new file, in ``/dev/shm`` where it has room (a container's
    is often 64 MB) and in the temporary directory otherwise."""
    data = np.ascontiguousarray(labels)
    where: str | None = None
    if SHARED_MEMORY_DIR.is_dir():
        try:
            if shutil.disk_usage(SHARED_MEMORY_DIR).free > 2 * data.nbytes + 2**20:
                where = str(SHARED_MEMORY_DIR)
        except OSError:
            pass
    fd, path = tempfile.mkstemp(prefix=f"{LABELS_PREFIX}{os.getpid()}-", dir=where)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.reshape(-1).view(np.uint8).data)
    except BaseException:
        os.unlink(path)
        raise
    return _SharedLabels(path, tuple(data.shape), data.dtype.str)


def _attach(shared: _SharedLabels) -> np.ndarray:
    """The shared label map, read-only (so that its index is made once per worker)."""
    labels = np.memmap(shared.path, dtype=shared.dtype, mode="r", shape=shared.shape)
    return labels.view(np.ndarray)


def _without_pixels(source: SeriesVolume) -> SeriesVolume:
    """``source`` as the encoders read it: geometry and headers, no voxels to pickle."""
    volume = source.volume
    if hasattr(volume, "get_geometry"):
        volume = volume.get_geometry()
    return SeriesVolume(volume, list(source.source_uids), source.frame_numbers, source.headers)


def _encode_chain(
    context_pickle: bytes,
    shared: _SharedLabels,
    chain_pickle: bytes,
    settings: ResultSettings,
    announced: dict[str, Dataset],
    counts: np.ndarray | None,
) -> dict[str, EncodedObject]:
    """In a worker: one chain of encoders on the shared map, each object as Part 10 bytes;
    ``counts``: the map's index counts where the node made them already."""
    context: EncodeContext = pickle.loads(context_pickle)
    chain: list[Encoder] = pickle.loads(chain_pickle)
    for encoder in chain:  # as registered in the node (a deployment's own, say)
        register(encoder)
    labels = _attach(shared)
    if counts is not None:
        label_index(labels, counts)
    context = dataclasses.replace(context, labels=labels, settings=settings, announced=announced)
    try:
        return _encode_files(context, chain)
    finally:
        # what the objects took goes back to the system, not to the idle worker's heaps
        del context, labels
        release_free_memory()


def _ready() -> int:
    return os.getpid()


#: How often a worker checks that the node it works for still runs.
WATCH_SECONDS = 1.0


def _watch_node(node_pid: int) -> None:
    """In a new worker: end it once the node is gone.

    A worker's parent is the fork server, not the node, and it waits for work on a pipe it
    holds both ends of: a node killed outright (SIGKILL, the OOM killer) would leave its
    workers, and through them the fork server, running for good. A thread that looks for
    the node once a second ends the worker instead; the fork server then ends as well."""

    def watch() -> None:
        while runs(node_pid):
            time.sleep(WATCH_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="dicom-node-watch", daemon=True).start()


#: How much lower a worker's scheduling priority is than the node's (``nice``).
WORKER_NICENESS = 10


def _worker_started(node_pid: int) -> None:
    """In a new worker: watch the node (:func:`_watch_node`), and yield the CPU to it.

    The node's own process answers the C-STOREs of the next series while a result is
    encoded. With the workers at a lower priority it comes first for the cores: pushed
    while 104 organs are encoded over and over, it took 0.41 of its idle rate rather than
    0.28, and the encoding itself, with the cores otherwise free, was as quick (1.58 s
    against 1.57 s; docs/performance.md)."""
    _watch_node(node_pid)
    os.nice(WORKER_NICENESS)


@dataclass
class _Chain:
    """One chain of one request, and where it is being built."""

    request: int
    context: EncodeContext
    encoders: list[Encoder]
    future: concurrent.futures.Future | None = None
    pool: concurrent.futures.ProcessPoolExecutor | None = None


class EncoderProcesses:
    """A pool of worker processes that build and encode result objects (see the module).

    ``workers`` processes at most, forked when first needed from a fork server that has
    the encoders loaded; :meth:`start` starts that server ahead of the first encoding.
    Results of fewer than ``min_labels`` labels are encoded in the node's process.
    """

    def __init__(self, workers: int, min_labels: int = 1) -> None:
        if workers < 1:
            raise ValueError("an encoder pool needs at least one worker")
        self.workers = workers
        self.min_labels = min_labels
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._closed = False
        self._starting = False

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("the encoder pool is closed")
            if self._pool is None:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload([WORKER_PRELOAD])
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    self.workers,
                    mp_context=context,
                    initializer=_worker_started,
                    initargs=(os.getpid(),),
                )
            return self._pool

    def start(self) -> None:
        """Start the fork server and a worker in the background, if not started yet: the
        runner calls this as a job of a model with ``min_labels`` labels or more starts, so
        that they are ready by the time it encodes (a second or two of one core, while the
        network runs), and a node that has no such job costs nothing. Returns at once."""
        with self._lock:
            if self._starting or self._closed:
                return
            self._starting = True

        def start() -> None:
            try:
                self._executor().submit(_ready)
            except RuntimeError:  # closed meanwhile
                pass

        threading.Thread(target=start, name="dicom-node-encoders", daemon=True).start()

    def _reset(self, broken: concurrent.futures.ProcessPoolExecutor) -> None:
        """Replace a pool whose worker died; the next request forks new workers."""
        with self._lock:
            if self._pool is broken:
                self._pool = None
        broken.shutdown(wait=False, cancel_futures=True)

    def encode(
        self, context: EncodeContext, requests: Sequence[EncodeRequest]
    ) -> list[dict[str, EncodedObject]]:
        """Every request's objects, one dict by kind per request in the order of its
        encoders. The first chain is built here, the others in the workers; the first
        :class:`~dicom_node.encode.labels.EncodeError` (or bug) of any chain is raised once
        every chain has ended. A map holding fewer than ``min_labels`` labels is encoded
        in this process: for a few organs the workers cost more than they save."""
        if np.count_nonzero(label_counts(context.labels)[1:]) < self.min_labels:
            return encode_in_process(context, requests)
        planned: list[_Chain] = []
        for number, request in enumerate(requests):
            chosen = [e for e in request.chosen if e.enabled(request.settings)]
            to_announce = {e.kind for e in chosen if isinstance(e, Announcing)}
            planned += [
                _Chain(number, dataclasses.replace(context, settings=request.settings), chain)
                for chain in chains(chosen, to_announce)
            ]
        away = [c for c in planned[1:] if _picklable(c.encoders)]
        out: list[dict[str, EncodedObject]] = [{} for _ in requests]
        shared = _share(context.labels) if away else None
        try:
            submit = self._submitter(context, shared) if shared is not None else None
            # What needs no announced header goes first: its workers start at once, while
            # the headers are made here (the SEG's needs the map's index).
            if submit is not None:
                for chain in away:
                    if not _reads_announced(chain.encoders):
                        submit(chain)
            announced: dict[int, EncodeContext] = {}
            try:
                for chain in planned:
                    if chain.request not in announced:
                        request = requests[chain.request]
                        announced[chain.request] = announce(chain.context, request.chosen)
                    chain.context = announced[chain.request]
            except BaseException:
                for chain in planned:
                    if chain.future is not None:
                        chain.future.cancel()
                raise
            if submit is not None:
                for chain in away:
                    if chain.future is None:
                        submit(chain)
            error: BaseException | None = None
            for chain in planned:  # the ones left here first, while the workers build
                if chain.future is None:
                    try:
                        out[chain.request].update(self._here(chain))
                    except BaseException as exc:  # noqa: BLE001 - raised once all ended
                        error = error or exc
            for chain in planned:
                if chain.future is not None:
                    try:
                        out[chain.request].update(self._result(chain))
                    except BaseException as exc:  # noqa: BLE001 - raised once all ended
                        error = error or exc
            if error is not None:
                raise error
        finally:
            if shared is not None:
                os.unlink(shared.path)
        return [
            {e.kind: got[e.kind] for e in request.chosen if e.kind in got}
            for request, got in zip(requests, out, strict=True)
        ]

    def _submitter(self, context: EncodeContext, shared: _SharedLabels) -> Callable[[_Chain], None]:
        """A function that hands a chain to a worker, the context pickled once for all. A
        pool found broken (a worker died while idle) is replaced for the next series, and
        the chain is left to be built here."""
        light = dataclasses.replace(
            context,
            source=_without_pixels(context.source),
            labels=np.empty(0, np.uint8),
            announced={},
        )
        context_pickle = pickle.dumps(light, protocol=pickle.HIGHEST_PROTOCOL)
        pool = self._executor()

        broken = False

        def submit(chain: _Chain) -> None:
            nonlocal broken
            if broken:
                return
            try:
                chain.future = pool.submit(
                    _encode_chain,
                    context_pickle,
                    shared,
                    pickle.dumps(chain.encoders),
                    chain.context.settings,
                    dict(chain.context.announced),
                    _counts_made(context.labels),
                )
            except BrokenProcessPool:
                log.warning("an encoder process had ended; this series is encoded here")
                broken = True
                self._reset(pool)
                return
            chain.pool = pool

        return submit

    @staticmethod
    def _here(chain: _Chain) -> dict[str, EncodedObject]:
        return _encode_files(chain.context, chain.encoders)

    def _result(self, chain: _Chain) -> dict[str, EncodedObject]:
        assert chain.future is not None and chain.pool is not None
        try:
            return chain.future.result()
        except BrokenProcessPool:
            log.warning(
                "an encoder process ended unexpectedly; %s built in the node's process",
                ", ".join(e.kind for e in chain.encoders),
            )
            self._reset(chain.pool)
            return self._here(chain)

    def close(self) -> None:
        """Stop the workers (a running chain is waited for)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _counts_made(labels: np.ndarray) -> np.ndarray | None:
    """The index counts of a read-only map where this process made them already (the SEG's
    announcement does), for the workers that start after."""
    if labels.flags.writeable or not is_indexed(labels):
        return None
    return label_index(labels).counts


def _reads_announced(chain: list[Encoder]) -> bool:
    """Whether a chain announces a header or may read one: its workers need the headers."""
    return any(isinstance(e, Announcing | Referencing) for e in chain)


def _picklable(chain: list[Encoder]) -> bool:
    """Whether a worker can be sent ``chain`` (an encoder class defined inside a function
    cannot: it is built in the node's process)."""
    try:
        pickle.dumps(chain)
    except (pickle.PicklingError, AttributeError, TypeError):
        return False
    return True
