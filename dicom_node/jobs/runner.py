"""The job runner: one complete series through routing, assembly, inference and encoding.

Workers take complete series from a queue (:meth:`JobRunner.enqueue`, which completion
calls). Each job:

1. claims the series (complete -> processing), tops a series the settle timer completed
   up from the sources that hold more of it (``top_up``, :class:`~dicom_node.sources.fetch.TopUp`),
   and emits :class:`JobStarted`;
2. routes it to models by its first instance's header (:mod:`.routing`);
3. assembles its volume from the slices staged as they arrived (the streaming assembler),
   or from the spool, where every model's backend reads it without a copy;
4. asks each model's backend for its labels, with the configured retries;
5. encodes every registered result object per model (:mod:`.outputs`), writes them durably
   and queues them for every destination in the transaction that ends the job "done"
   (:meth:`~dicom_node.state.series.SeriesRepository.finish_run`);
6. emits :class:`JobEnded`.

A job that finds its series grew meanwhile (new instances over another association) queues
nothing: the series is receiving again and will be processed once more, whole.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from dicom_node.common.backoff import backoff
from dicom_node.common.events import Events
from dicom_node.common.heap import empty_volume
from dicom_node.config import ModelSettings, Settings
from dicom_node.encode import (
    AlgorithmInfo,
    EncodeContext,
    EncodeError,
    label_volumes_ml,
    segment_info_for,
)
from dicom_node.encode.processes import EncoderProcesses
from dicom_node.inference import Allocator, Backends, InferenceError
from dicom_node.intake.spool import check_uid
from dicom_node.jobs.outputs import NotWritten, encode_results, plan_outbox_items, write_results
from dicom_node.jobs.routing import describe, select_models
from dicom_node.pipeline import (
    BundleError,
    BundleInfo,
    HandOver,
    SegmentationResult,
    read_bundle_info,
)
from dicom_node.series.assembly import StagedSeries, StreamingAssembler
from dicom_node.series.completion import SETTLE_TIMER
from dicom_node.series.volume import SeriesVolume, VolumeError, assemble_series
from dicom_node.sources.fetch import TopUpFailed
from dicom_node.state import (
    FinishOutcome,
    JobDatabase,
    ModelResults,
    NewOutboxItem,
    OutboxItem,
    ResultFile,
    SeriesResults,
    SeriesState,
)

__all__ = ["JobEnded", "JobFailed", "JobRunner", "JobStarted", "NoModel"]

log = logging.getLogger("dicom_node.jobs")


class JobFailed(Exception):
    """A step of a job failed for a reason that is recorded on the series."""


class NoModel(Exception):
    """No routing rule sends the series to a model: it is kept, marked "no model"."""


@dataclass(frozen=True)
class JobStarted:
    """A job claimed a complete series; ``paths`` are its instances' spool files."""

    series_uid: str
    paths: list[Path]


@dataclass(frozen=True)
class JobEnded:
    """A job ended in ``state`` (receiving: overtaken by new instances)."""

    series_uid: str
    state: SeriesState
    timings: dict[str, float] = field(default_factory=dict)
    results: SeriesResults | None = None


#: Adds to a series from the sources before it is processed: what it added, in words ("" for
#: nothing); raises :class:`~dicom_node.sources.fetch.TopUpFailed` with the job's reason.
TopUp = Callable[[str], str]


class JobRunner:
    """Workers that take complete series through the whole chain.

    ``top_up`` (:class:`~dicom_node.sources.fetch.TopUp`) is asked first about each series
    the settle timer completed.
    """

    def __init__(
        self,
        settings: Settings,
        jobs: JobDatabase,
        assembler: StreamingAssembler,
        backends: Backends,
        results_dir: Path,
        events: Events,
        top_up: TopUp | None = None,
        encoder_processes: EncoderProcesses | None = None,
    ) -> None:
        self.settings = settings
        self.top_up = top_up
        self.encoder_processes = encoder_processes
        self.jobs = jobs
        self.assembler = assembler
        self.backends = backends
        self.results_dir = results_dir
        self.events = events
        self._queue: queue.Queue[str] = queue.Queue()
        self._queued: set[str] = set()
        self._queued_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._bundles: dict[str, BundleInfo] = {}

    # -- workers ----------------------------------------------------------------------
    def enqueue(self, series_uid: str) -> None:
        """Queue a complete series (once, however often it is asked)."""
        with self._queued_lock:
            if series_uid in self._queued:
                return
            self._queued.add(series_uid)
        self._queue.put(series_uid)

    def start(self) -> None:
        """Queue every complete series, then start ``max_concurrent_jobs`` workers."""
        for record in self.jobs.series.records(SeriesState.COMPLETE):
            self.enqueue(record.series_uid)
        for i in range(max(1, self.settings.inference.max_concurrent_jobs)):
            t = threading.Thread(target=self._work, name=f"dicom-node-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for _ in self._threads:
            self._queue.put("")
        for t in self._threads:
            t.join(timeout=30)
        self._threads.clear()

    def _work(self) -> None:
        while not self._stop.is_set():
            uid = self._queue.get()
            if not uid:
                return
            with self._queued_lock:
                self._queued.discard(uid)
            try:
                self.process(uid)
            except Exception:  # noqa: BLE001 - a bug must not kill the worker
                log.exception("series %s: unexpected error", uid)
                self.jobs.series.set_state(
                    uid,
                    SeriesState.FAILED,
                    "internal error (see the node's log)",
                    expect=SeriesState.PROCESSING,
                )

    # -- one job ----------------------------------------------------------------------
    def process(self, series_uid: str) -> SeriesState:
        """Take one complete series through the whole chain; return its final state."""
        claimed, count = self.jobs.series.claim(series_uid)
        record = self.jobs.series.get(series_uid)
        if not claimed:
            return record.state if record else SeriesState.RECEIVING
        if self.top_up is not None and record is not None and record.completed_by == SETTLE_TIMER:
            try:
                added = self.top_up(series_uid)
            except TopUpFailed as exc:  # the source's one sentence
                count = self.jobs.series.count(series_uid)  # what did come stays
                state = self._finish(series_uid, count, SeriesState.FAILED, str(exc))
                log.warning("series %s: failed: %s", series_uid, exc)
                self.events.emit(JobEnded(series_uid, state))
                return state
            if added:
                self.jobs.series.record_top_up(series_uid, added)
                count = self.jobs.series.count(series_uid)
                log.info("series %s: topped up with %s", series_uid, added)
        log.info("series %s: processing (%d instances)", series_uid, count)
        paths = self.jobs.instances.paths(series_uid)
        self.events.emit(JobStarted(series_uid, paths))
        # from the last instance to this job's start: the completion rule and the queue
        timings: dict[str, float] = {
            "completion": max(0.0, time.time() - record.last_received) if record else 0.0
        }
        try:
            results = self._run_chain(series_uid, paths, timings, count)
        except NoModel as exc:
            state = self._finish(series_uid, count, SeriesState.NO_MODEL, str(exc))
            if state == SeriesState.NO_MODEL:
                log.info("series %s: no model: %s", series_uid, exc)
            self.events.emit(JobEnded(series_uid, state))
            return state
        except JobFailed as exc:
            self.jobs.series.record_timings(series_uid, timings)
            state = self._finish(series_uid, count, SeriesState.FAILED, str(exc))
            if state == SeriesState.FAILED:
                log.warning("series %s: failed: %s", series_uid, exc)
            self.events.emit(JobEnded(series_uid, state, timings))
            return state
        self.jobs.series.record_timings(series_uid, timings)
        if results is None:  # overtaken: nothing was queued, its files are gone
            self._receiving_again(series_uid, count)
            self.events.emit(JobEnded(series_uid, SeriesState.RECEIVING, timings))
            return SeriesState.RECEIVING
        log.info(
            "series %s: done%s (%s)",
            series_uid,
            f", {no_finding(results)}" if no_finding(results) else "",
            ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()),
        )
        self.events.emit(JobEnded(series_uid, SeriesState.DONE, timings, results))
        return SeriesState.DONE

    def _finish(self, series_uid: str, count: int, state: SeriesState, reason: str) -> SeriesState:
        """End a job in ``state`` if the series still holds the ``count`` instances it
        processed; otherwise it is receiving again and will be processed once more, whole.

        The late instances came over another association than the job's (or the same one,
        still open, whose release then decides): the series has become one spread over
        several associations, which the settle timer completes.
        """
        if self.jobs.series.set_state(
            series_uid, state, reason, expect=SeriesState.PROCESSING, instance_count=count
        ):
            return state
        self._receiving_again(series_uid, count)
        return SeriesState.RECEIVING

    def _receiving_again(self, series_uid: str, count: int) -> None:
        self.jobs.series.set_state(series_uid, SeriesState.RECEIVING, expect=SeriesState.PROCESSING)
        log.info(
            "series %s: %d new instance(s) arrived while processing; receiving again",
            series_uid,
            self.jobs.series.count(series_uid) - count,
        )

    def _run_chain(
        self, series_uid: str, paths: list[Path], timings: dict[str, float], count: int
    ) -> SeriesResults | None:
        """Assemble, segment, encode and write; queue the results in the transaction that
        ends the job, if the series still holds the ``count`` instances processed.
        Returns the results, or ``None`` when new instances overtook the run (its files
        are deleted, nothing is queued)."""
        staged = self.assembler.take(series_uid)
        try:
            models = self._route(series_uid, paths)
            self._ready_encoders(models)
            allocate = self._allocator(models)
            t0 = time.perf_counter()
            try:
                volume = self._assemble(series_uid, paths, staged, allocate)
            except VolumeError as exc:
                raise JobFailed(f"not a volume: {exc}") from None
            timings["assemble"] = time.perf_counter() - t0
        finally:
            if staged is not None:
                staged.release()

        results = [
            self._infer(
                model,
                volume,
                timings,
                last_model=i == len(models) - 1,
                reassemble=lambda: assemble_series(paths, self.settings.limits.min_slices),
            )
            for i, model in enumerate(models)
        ]
        # The encoders need the geometry and the headers, not the voxels: the volume's
        # memory is free again before the label maps are encoded.
        volume.release_pixels()
        out_dir = self.results_dir / check_uid(series_uid, "Series Instance UID")
        out_dir.mkdir(exist_ok=True, mode=0o700)
        # An earlier result acknowledged while this run encodes would be superseded without
        # being named: the transaction that queues the results sees it, and the run encodes
        # again (a send takes well under a second; three tries are plenty).
        for _ in range(3):
            earlier = {m.name: self.jobs.outbox.sent(series_uid, m.name) for m in models}
            out = SeriesResults()
            items: list[NewOutboxItem] = []
            written: list[Path] = []
            try:
                for index, (model, result) in enumerate(zip(models, results, strict=True)):
                    t0 = time.perf_counter()
                    context = self._context(
                        model, volume, result, index, _predecessors(earlier[model.name])
                    )
                    try:
                        encoded = encode_results(context, self.settings, self.encoder_processes)
                    except EncodeError as exc:
                        raise JobFailed(f"results cannot be encoded: {exc}") from None
                    timings["encode"] = timings.get("encode", 0.0) + time.perf_counter() - t0
                    t0 = time.perf_counter()
                    try:
                        stored = write_results(
                            out_dir, encoded, self.settings.limits.reserved_disk_mb, written
                        )
                    except NotWritten as exc:
                        raise JobFailed(str(exc)) from None
                    out.models.append(
                        ModelResults(
                            model=model.name,
                            files={r.kind: ResultFile(str(r.path), r.sop_uid) for r in stored},
                            volumes_ml=label_volumes_ml(volume, result.labels, context.segments),
                            algorithm=context.algorithm.as_dict(),
                        )
                    )
                    items += plan_outbox_items(self.settings, series_uid, model.name, stored)
                    timings["write"] = timings.get("write", 0.0) + time.perf_counter() - t0
            except BaseException:
                _discard(written)
                raise
            out.supersedes = sorted(i.sop_uid for v in earlier.values() for i in v)
            outcome = self.jobs.series.finish_run(
                series_uid,
                count,
                out,
                items,
                {name: {i.sop_uid for i in sent} for name, sent in earlier.items()},
                reason=no_finding(out),
            )
            if outcome == FinishOutcome.DONE:
                if out.supersedes:
                    log.info(
                        "series %s: the new results supersede %d acknowledged earlier result(s)",
                        series_uid,
                        len(out.supersedes),
                    )
                return out
            _discard(written)
            if outcome == FinishOutcome.OVERTAKEN:
                log.info(
                    "series %s: new instances arrived while processing: this run's "
                    "results are discarded, none was queued",
                    series_uid,
                )
                return None
        raise JobFailed(
            "earlier results kept being acknowledged while the new ones were "
            "encoded; retry the series"
        )

    def _route(self, series_uid: str, paths: list[Path]) -> list[ModelSettings]:
        """The models this series goes to, from its first instance's header."""
        record = self.jobs.series.get(series_uid)
        calling_ae = record.calling_ae if record else ""
        header = pydicom.dcmread(paths[0], stop_before_pixels=True)
        count = len(paths)
        if count == 1:
            count = int(header.get("NumberOfFrames", 1) or 1)
        models = select_models(self.settings, header, count, calling_ae)
        if not models:
            raise NoModel(f"no routing rule matched ({describe(header, count, calling_ae)})")
        return models

    def _allocator(self, models: list[ModelSettings]) -> Allocator:
        """Where to assemble the volume: where every model's backend reads it without a copy
        (GPU memory or a system shared-memory region for a Triton server on this host), or
        ordinary memory (:func:`~dicom_node.common.heap.empty_volume`) when they disagree or
        the backends are not up.
        """
        try:
            backends = self.backends.get()
        except Exception:  # noqa: BLE001 - not started: _infer reports it and retries
            return empty_volume
        allocators = {backends[m.name].volume_allocator() for m in models}
        return allocators.pop() if len(allocators) == 1 else empty_volume

    def _assemble(
        self,
        series_uid: str,
        paths: list[Path],
        staged: StagedSeries | None,
        allocate: Allocator,
    ) -> SeriesVolume:
        """The series' volume from the slices staged as they arrived, or, when those are
        not exactly the instances listed (a restart, a slice that would not decode...),
        from the spool; the same volume either way."""
        min_slices = self.settings.limits.min_slices
        volume = staged.assemble(paths, min_slices, allocate) if staged is not None else None
        if volume is not None:
            log.info("series %s: assembled from slices staged as they arrived", series_uid)
            return volume
        return assemble_series(paths, min_slices, allocate)

    def _infer(
        self,
        model: ModelSettings,
        volume: SeriesVolume,
        timings: dict[str, float],
        *,
        last_model: bool = False,
        reassemble: Callable[[], SeriesVolume],
    ) -> SegmentationResult:
        """The model's result on ``volume``, with the configured retries.

        For the last model of a series, a backend that runs the pipeline in this process
        (``takes_hand_over``) is handed the voxels: it lets go of them once preprocessed, and
        the volume keeps its geometry only. A retry after that assembles the volume again
        (``reassemble``), from the spool.
        """
        inf = self.settings.inference

        def pause(attempt: int) -> float:  # uncapped: attempts are few
            return backoff(attempt, inf.retry_backoff_seconds, float("inf"))

        last: Exception | None = None
        for attempt in range(1, inf.attempts + 1):
            t0 = time.perf_counter()
            try:
                backend = self.backends.get()[model.name]
            except Exception as exc:  # noqa: BLE001 - e.g. Triton did not start; retried
                last = exc
                log.warning(
                    "inference backend unavailable (attempt %d/%d): %s", attempt, inf.attempts, exc
                )
                if attempt < inf.attempts and not self._stop.wait(pause(attempt)):
                    continue
                break
            try:
                if not volume.has_pixels():  # handed over in an attempt that failed
                    result = backend.segment(reassemble().array, volume.affine)
                elif last_model and backend.takes_hand_over and volume.device_pixels is None:
                    pixels = HandOver(volume.array)
                    volume.release_pixels()
                    result = backend.segment(pixels, volume.affine)
                else:
                    result = backend.segment(volume.array, volume.affine)
            except InferenceError as exc:
                last = exc
                log.warning("inference attempt %d/%d failed: %s", attempt, inf.attempts, exc)
                if attempt < inf.attempts and not self._stop.wait(pause(attempt)):
                    continue
                break
            timings["inference_total"] = (
                timings.get("inference_total", 0.0) + time.perf_counter() - t0
            )
            for k, v in result.timings.items():
                timings[k] = timings.get(k, 0.0) + float(v)
            # The result is what the model said: read-only from here on, which also lets
            # the encoders share one count of its labels (encode.labels.label_counts).
            result.labels.flags.writeable = False
            return result
        raise JobFailed(f"inference failed after {inf.attempts} attempt(s): {last}")

    def _ready_encoders(self, models: Sequence[ModelSettings]) -> None:
        """Have the encoder processes start while the network runs, where a model's results
        may hold enough labels to be encoded there."""
        processes = self.encoder_processes
        if processes is None:
            return
        try:
            many = any(len(self.bundle(m).labels) >= processes.min_labels for m in models)
        except BundleError:
            return  # the job fails on its bundle, with that sentence
        if many:
            processes.start()

    def bundle(self, model: ModelSettings) -> BundleInfo:
        """What the model's bundle says of itself (name, version, labels), read once."""
        if model.name not in self._bundles:
            self._bundles[model.name] = read_bundle_info(model.bundle)
        return self._bundles[model.name]

    def _context(
        self,
        model: ModelSettings,
        volume: SeriesVolume,
        result: SegmentationResult,
        index: int,
        predecessors: Sequence[Dataset],
    ) -> EncodeContext:
        info = self.bundle(model)
        return EncodeContext(
            source=volume,
            labels=result.labels,
            segments=[segment_info_for(v, n) for v, n in sorted(info.labels.items())],
            algorithm=AlgorithmInfo.of_bundle(info),
            settings=self.settings.results,
            model_index=index,
            predecessors=predecessors,
        )


def no_finding(results: SeriesResults) -> str:
    """The reason a job that found nothing ends "done" with: ``"no finding: ..."`` naming
    each model that found none of its labels, or ``""`` when every model found some.

    Such a job's results are still made and sent: the SEG and RTSTRUCT describe what was
    looked for without pixels or contours, and the SR says of each label that it is absent
    (:mod:`dicom_node.encode.sr`), so a destination holding an earlier run's results gets
    the objects that supersede them. The reason keeps the job's state from reading as a
    measurement of 0 mL.
    """
    empty = [m for m in results.models if not any(v > 0 for v in m.volumes_ml.values())]
    if not empty:
        return ""
    parts = []
    for model in empty:
        names = list(model.volumes_ml)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        who = "the model" if len(results.models) == 1 else f"model {model.model!r}"
        parts.append(f"{who} found none of {shown}")
    return "no finding: " + "; ".join(parts)


def _predecessors(earlier: list[OutboxItem]) -> list[Dataset]:
    """Headers of the acknowledged earlier results a new SR supersedes (their files are
    kept while the series is: retention removes both together)."""
    out: list[Dataset] = []
    for item in earlier:
        try:
            out.append(
                pydicom.dcmread(
                    item.path,
                    stop_before_pixels=True,
                    specific_tags=[
                        "SOPClassUID",
                        "SOPInstanceUID",
                        "StudyInstanceUID",
                        "SeriesInstanceUID",
                    ],
                )
            )
        except (OSError, ValueError) as exc:
            log.warning(
                "earlier result %s cannot be read (%s): not named as superseded", item.sop_uid, exc
            )
    return out


def _discard(paths: list[Path]) -> None:
    """Delete result files that will never be queued."""
    for path in paths:
        path.unlink(missing_ok=True)
