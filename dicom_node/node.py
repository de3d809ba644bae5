"""The running node: wires receive -> store -> assemble -> infer -> encode -> send.

Three kinds of background work share one job database:

* completion: a series is complete when the association that carried it is released and
  its slices form a volume without a gap (:mod:`dicom_node.completion`), otherwise when
  the settle loop finds it ``settle_seconds`` after its last instance;
* the streaming assembler decodes each new instance while the rest of its series arrives
  (:mod:`dicom_node.assembly`), so that a complete series is a volume with a few copies;
* workers take complete series through assembly, inference and encoding, write the
  results durably and queue them in the outbox;
* the exporter sends due outbox items to the destinations.

Every step that changes a series' state logs one line and records it, so a restart
(:meth:`Node.start`) knows where each series stood and resumes it.

Why one module of this size: it is the one place where the stages meet. Each stage
lives in its own module; what is here is their order, the job's transaction that queues
results only for a whole series, and the threads that drive them, which read best together.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import logging
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pydicom

from dicom_node.assembly import StreamingAssembler
from dicom_node.backoff import backoff
from dicom_node.completion import RELEASED, SETTLE_TIMER, SliceGeometry, gap_free, slice_geometry
from dicom_node.config import ModelSettings, Settings
from dicom_node.export import Exporter, binary_alternatives_wanted, plan_outbox_items
from dicom_node.heap import empty_volume, freeze_heap
from dicom_node.jobs import (
    COMPLETE,
    DONE,
    FAILED,
    NO_MODEL,
    OVERTAKEN,
    PROCESSING,
    RECEIVING,
    JobStore,
    OutboxItem,
)
from dicom_node.metrics import NodeMetrics
from dicom_node.results import ModelResults, ResultFile, SeriesResults, series_number
from dicom_node.retention import apply_retention
from dicom_node.routing import describe, select_models
from dicom_node.scp import StorageSCP, StoreOutcome
from dicom_node.spool import Spool, check_uid, dataset_digest, write_durably
from dicom_node.standard_tables import load_standard_tables
from dicom_node.volume import VolumeError, assemble_series, read_whole

log = logging.getLogger("dicom_node.node")


class JobFailed(Exception):
    """A step of a job failed for a reason that is recorded on the series."""


class NoModel(Exception):
    """No routing rule sends the series to a model: it is kept, marked "no model"."""


class Node:
    """One DICOM node: its SCP, its job database and its background workers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        data_dir = settings.node.data_dir
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.jobs = JobStore(data_dir / "jobs.sqlite")
        self.spool = Spool(data_dir / "spool")
        self.results_dir = data_dir / "results"
        self.results_dir.mkdir(exist_ok=True, mode=0o700)
        self.scp = StorageSCP(
            settings,
            self.spool,
            self.jobs,
            on_stored=self._on_stored,
            on_released=self._on_released,
        )
        self.metrics = NodeMetrics(self.jobs)
        self.exporter = Exporter(settings, self.jobs, on_attempt=self.metrics.observe_export)
        self.status: Any = None
        #: The PACS and viewer the node runs for an ``embedded`` destination, once started.
        self.embedded: Any = None
        self._queue: queue.Queue[str] = queue.Queue()
        self._queued: set[str] = set()
        self._queued_lock = threading.Lock()
        self._stop = threading.Event()
        self._export_wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._backends: dict[str, Any] | None = None
        self._backend_lock = threading.Lock()
        self._bundles: dict[str, Any] = {}
        self.assembler = StreamingAssembler()
        self.observers: list[Any] = [self.metrics.observe_store, self._stage]

    # -- life cycle -------------------------------------------------------------------
    def start(self, serve: bool = True) -> None:
        """Recover from whatever the last run left, then start serving and working."""
        removed = self.spool.clean_incoming()
        from dicom_node.inference.shm import remove_stale

        remove_stale()  # volumes a killed node left in shared memory
        registered = self.reconcile()
        resumed = self.jobs.resume()
        log.info(
            "start: %d partial file(s) removed, %d spooled instance(s) re-registered, "
            "%d interrupted series to process again",
            removed,
            registered,
            resumed["reprocess"],
        )
        for record in self.jobs.list_series(COMPLETE):
            self._enqueue(record.series_uid)
        _freeze_long_lived()  # before the first association: no pause once serving
        if serve:
            self._start_embedded()  # the default destination listens before anything is sent
            if self.settings.status.enabled:  # first: a taken port stops before any C-STORE
                from dicom_node.status import StatusServer, create_app

                app = create_app(
                    self.settings,
                    self.jobs,
                    self.metrics,
                    self.backend_ready,
                    viewer_url=self.embedded.viewer_url if self.embedded else None,
                )
                self.status = StatusServer(
                    app, self.settings.status.host, self.settings.status.port
                )
                self.status.start()
            self.scp.start()
        workers = max(1, self.settings.inference.max_concurrent_jobs)
        targets = [
            ("settle", self._settle_loop),
            ("export", self._export_loop),
            ("retention", self._retention_loop),
        ]
        targets += [(f"worker-{i}", self._worker_loop) for i in range(workers)]
        for name, target in targets:
            t = threading.Thread(target=target, name=f"dicom-node-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def _start_embedded(self) -> None:
        """Start the PACS and viewer of an ``embedded`` destination, if one is configured."""
        from dicom_node.embedded import Embedded, embedded_destination

        destination = embedded_destination(self.settings)
        if destination is not None:
            embedded = Embedded(self.settings, destination)
            embedded.start()
            self.embedded = embedded

    def stop(self) -> None:
        self._stop.set()
        self._export_wake.set()
        if self.status is not None:
            self.status.stop()
        self.scp.stop()
        self.assembler.close()
        for _ in self._threads:
            self._queue.put("")
        for t in self._threads:
            t.join(timeout=30)
        with self._backend_lock:
            for backend in (self._backends or {}).values():
                backend.close()
            self._backends = None
        self.jobs.close()
        self.exporter.journal.close()
        if self.embedded is not None:
            self.embedded.stop()

    def reconcile(self) -> int:
        """Register spooled files the database does not know.

        A crash between the acknowledged sync and the database commit leaves a whole file
        that the sender was told is stored: it is registered. A crash mid-write leaves a
        partial file that was never acknowledged: it is moved to ``quarantine/``.
        """
        known = self.jobs.known_paths()
        n = 0
        for path in self.spool.all_files():
            if str(path) in known:
                continue
            data = path.read_bytes()
            try:
                ds = read_whole(data)
                sop = check_uid(ds.SOPInstanceUID, "SOP Instance UID")
            except Exception as exc:  # noqa: BLE001 - an unreadable spool file is set aside
                moved = self.spool.quarantine(path, f"incomplete or unreadable: {exc}")
                log.warning(
                    "spool file %s is incomplete (never acknowledged); moved to %s",
                    path.name,
                    moved,
                )
                continue
            self.jobs.add_instance(
                sop_uid=sop,
                sop_class=str(ds.SOPClassUID),
                series_uid=str(ds.SeriesInstanceUID),
                study_uid=str(ds.StudyInstanceUID),
                modality=str(ds.get("Modality", "")),
                calling_ae=str(ds.file_meta.get("SourceApplicationEntityTitle", "")).strip(),
                path=path,
                size=len(data),
                digest=dataset_digest(data),
                received=path.stat().st_mtime,
                geometry=slice_geometry(ds).to_json(),
            )
            n += 1
        return n

    # -- receiving --------------------------------------------------------------------
    def _on_stored(self, outcome: StoreOutcome) -> None:
        for observer in self.observers:
            observer(outcome)

    def _stage(self, outcome: StoreOutcome) -> None:
        """Hand a new instance to the streaming assembler (a queue put: the C-STORE
        response does not wait for its decoding)."""
        if outcome.new and outcome.dataset is not None:
            self.assembler.feed(outcome.series_uid, outcome.path, outcome.dataset)

    def _on_released(self, carried: dict[str, set[str]]) -> None:
        """An association was released normally: complete what it carried, if whole."""
        if not self.settings.node.complete_on_release:
            return
        for uid in sorted(carried):
            self._complete_if_whole(uid, len(carried[uid]))

    def _complete_if_whole(self, series_uid: str, carried: int) -> bool:
        """Complete a receiving series now if this association carried all of it and its
        headers show a whole volume.

        A series some of whose instances came over another association is left to the
        settle timer: the release of one association is no evidence that the sender of
        the others is done. Only the very instances looked at count: one stored meanwhile
        leaves the series receiving.
        """
        if series_uid in self.scp.open_series():
            return False
        found = self.jobs.receiving_geometry(series_uid)
        if found is None:  # not receiving: processing (see process), done, or gone
            return False
        count, stored = found
        if carried != count:
            log.info(
                "series %s: association released with %d of its %d instance(s), the "
                "rest from other associations; waiting %.0f s for more",
                series_uid,
                carried,
                count,
                self.settings.node.settle_seconds,
            )
            return False
        if not gap_free([SliceGeometry.from_json(g) for g in stored]):
            log.info(
                "series %s: association released, but its %d instance(s) do not form "
                "a volume without a gap; waiting %.0f s for more",
                series_uid,
                count,
                self.settings.node.settle_seconds,
            )
            return False
        if not self.jobs.complete(series_uid, RELEASED, count):
            return False
        log.info("series %s: complete (%d instances, %s)", series_uid, count, RELEASED)
        self._enqueue(series_uid)
        return True

    def _settle_loop(self) -> None:
        settle = self.settings.node.settle_seconds
        tick = min(1.0, max(0.05, settle / 4))
        while not self._stop.wait(tick):
            for uid in self.jobs.settle(time.time() - settle, SETTLE_TIMER):
                log.info(
                    "series %s: complete (%d instances, %s)",
                    uid,
                    self.jobs.series_count(uid),
                    SETTLE_TIMER,
                )
                self._enqueue(uid)

    def _enqueue(self, series_uid: str) -> None:
        with self._queued_lock:
            if series_uid in self._queued:
                return
            self._queued.add(series_uid)
        self._queue.put(series_uid)

    # -- processing -------------------------------------------------------------------
    def _worker_loop(self) -> None:
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
                self.jobs.set_state(
                    uid, FAILED, "internal error (see the node's log)", expect=PROCESSING
                )

    def backends(self) -> dict[str, Any]:
        """Inference backends by model name, created on first use (Triton takes a while)."""
        with self._backend_lock:
            if self._backends is None:
                from dicom_node.inference import make_backends

                self._backends = make_backends(
                    self.settings.inference, self.settings.models, self.settings.node.data_dir
                )
            return self._backends

    def backend_ready(self) -> bool:
        """Whether a series would be segmented now (the status service's ``/readyz``).

        The local pipeline loads in a moment on first use and remote Triton servers are
        checked per request; a Triton server the node starts must be up and running.
        """
        with self._backend_lock:
            backends = self._backends
        inf = self.settings.inference
        if backends is None:
            return inf.backend == "local" or bool(inf.triton_url)
        for backend in backends.values():
            server = getattr(backend, "server", None)
            if server is not None and not server.is_alive():
                return False
            if server is None and hasattr(backend, "ready") and not backend.ready():
                return False  # remote servers: some server must have the model ready
        return True

    def bundle(self, model: ModelSettings) -> Any:
        if model.name not in self._bundles:
            from dicom_node.pipeline import read_bundle_info

            self._bundles[model.name] = read_bundle_info(model.bundle)
        return self._bundles[model.name]

    def process(self, series_uid: str) -> str:
        """Take one complete series through the whole chain; return its final state."""
        claimed, count = self.jobs.claim(series_uid)
        if not claimed:
            return self.jobs.get_series(series_uid).state  # type: ignore[union-attr]
        record = self.jobs.get_series(series_uid)
        log.info("series %s: processing (%d instances)", series_uid, count)
        if self.embedded is not None:  # the viewer shows the results over this CT
            self.embedded.archive(self.jobs.instance_paths(series_uid))
        # from the last instance to this job's start: the completion rule and the queue
        timings: dict[str, float] = {
            "completion": max(0.0, time.time() - record.last_received) if record else 0.0
        }
        try:
            results = self._run_chain(series_uid, timings, count)
        except NoModel as exc:
            if self._finish(series_uid, count, NO_MODEL, str(exc)) != NO_MODEL:
                return RECEIVING
            log.info("series %s: no model: %s", series_uid, exc)
            return NO_MODEL
        except JobFailed as exc:
            self.jobs.record_timings(series_uid, timings)
            self.metrics.observe_timings(timings)
            if self._finish(series_uid, count, FAILED, str(exc)) != FAILED:
                return RECEIVING
            log.warning("series %s: failed: %s", series_uid, exc)
            return FAILED
        self.jobs.record_timings(series_uid, timings)
        self.metrics.observe_timings(timings)
        if results is None:  # overtaken: nothing was queued, its files are gone
            self._receiving_again(series_uid, count)
            return RECEIVING
        log.info(
            "series %s: done (%s)",
            series_uid,
            ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()),
        )
        self._export_wake.set()
        return DONE

    def _finish(
        self, series_uid: str, count: int, state: str, reason: str = "", model: str | None = None
    ) -> str:
        """End a job in ``state`` if the series still holds the ``count`` instances it
        processed; otherwise it is receiving again and will be processed once more, whole.

        The late instances came over another association than the job's (or the same one,
        still open, whose release then decides): the series has become one spread over
        several associations, which the settle timer completes.
        """
        if self.jobs.set_state(
            series_uid, state, reason, expect=PROCESSING, model=model, instance_count=count
        ):
            return state
        self._receiving_again(series_uid, count)
        return RECEIVING

    def _receiving_again(self, series_uid: str, count: int) -> None:
        self.jobs.set_state(series_uid, RECEIVING, expect=PROCESSING)
        log.info(
            "series %s: %d new instance(s) arrived while processing; receiving again",
            series_uid,
            self.jobs.series_count(series_uid) - count,
        )

    def _route(self, series_uid: str, paths: list[Path]) -> list[ModelSettings]:
        """The models this series goes to, from its first instance's header."""
        record = self.jobs.get_series(series_uid)
        calling_ae = record.calling_ae if record else ""
        header = pydicom.dcmread(paths[0], stop_before_pixels=True)
        count = len(paths)
        if count == 1:
            count = int(header.get("NumberOfFrames", 1) or 1)
        models = select_models(self.settings, header, count, calling_ae)
        if not models:
            raise NoModel(f"no routing rule matched ({describe(header, count, calling_ae)})")
        return models

    def _run_chain(
        self, series_uid: str, timings: dict[str, float], count: int
    ) -> SeriesResults | None:
        """Assemble, segment, encode and write; queue the results in the transaction that
        ends the job, if the series still holds the ``count`` instances processed.
        Returns the results, or ``None`` when new instances overtook the run (its files
        are deleted, nothing is queued)."""
        paths = self.jobs.instance_paths(series_uid)
        staged = self.assembler.take(series_uid)
        try:
            models = self._route(series_uid, paths)
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
            earlier = {m.name: self.jobs.sent_results(series_uid, m.name) for m in models}
            out = SeriesResults()
            items: list[dict[str, Any]] = []
            written: list[Path] = []
            try:
                for index, (model, result) in enumerate(zip(models, results, strict=True)):
                    t0 = time.perf_counter()
                    files = self._encode(
                        model,
                        volume,
                        result.labels,
                        index,
                        self._predecessors(earlier[model.name]),
                    )
                    timings["encode"] = timings.get("encode", 0.0) + time.perf_counter() - t0
                    t0 = time.perf_counter()
                    stored = self._write_results(out_dir, files, written)
                    out.models.append(
                        ModelResults(
                            model=model.name,
                            files={
                                k: ResultFile(f["path"], f["sop_uid"]) for k, f in stored.items()
                            },
                            volumes_ml=self._label_volumes(model, volume, result.labels),
                            algorithm=self._algorithm(model).as_dict(),
                        )
                    )
                    items += plan_outbox_items(self.settings, series_uid, model.name, stored)
                    timings["write"] = timings.get("write", 0.0) + time.perf_counter() - t0
            except BaseException:
                _discard(written)
                raise
            out.supersedes = sorted(i.sop_uid for v in earlier.values() for i in v)
            outcome = self.jobs.finish_run(
                series_uid,
                count,
                out,
                items,
                {name: {i.sop_uid for i in sent} for name, sent in earlier.items()},
            )
            if outcome == DONE:
                if out.supersedes:
                    log.info(
                        "series %s: the new results supersede %d acknowledged earlier result(s)",
                        series_uid,
                        len(out.supersedes),
                    )
                self.metrics.observe_results(out)
                return out
            _discard(written)
            if outcome == OVERTAKEN:
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

    def _predecessors(self, earlier: list[OutboxItem]) -> list[Any]:
        """Headers of the acknowledged earlier results a new SR supersedes (their files are
        kept while the series is: retention removes both together)."""
        out = []
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
                    "earlier result %s cannot be read (%s): not named as superseded",
                    item.sop_uid,
                    exc,
                )
        return out

    def _assemble(self, series_uid: str, paths: list[Path], staged: Any, allocate: Any) -> Any:
        """The series' volume from the slices decoded as they arrived, or, when those are
        not exactly the instances listed (a restart, a slice that would not decode...),
        from the spool; the same volume either way."""
        min_slices = self.settings.limits.min_slices
        volume = staged.assemble(paths, min_slices, allocate) if staged is not None else None
        if volume is not None:
            log.info("series %s: assembled from slices decoded as they arrived", series_uid)
            return volume
        return assemble_series(paths, min_slices, allocate)

    def _allocator(self, models: list[ModelSettings]) -> Any:
        """Where to assemble the volume: where every model's backend reads it without a copy
        (GPU memory or a system shared-memory region for a Triton server on this host), or
        ordinary memory (:func:`~dicom_node.heap.empty_volume`) when they disagree or the
        backends are not up.
        """
        try:
            backends = self.backends()
        except Exception:  # noqa: BLE001 - not started: _infer reports it and retries
            return empty_volume
        allocators = {backends[m.name].volume_allocator() for m in models}
        return allocators.pop() if len(allocators) == 1 else empty_volume

    def _write_results(
        self, out_dir: Path, files: dict[str, tuple[Any, str]], written: list[Path]
    ) -> dict[str, dict[str, str]]:
        """Write each result durably (appending its path to ``written``); the caller
        queues them. Below the disk reserve, or when the disk says no, the job fails with
        the reason and nothing half-written is left (``dicom-node retry`` once there is
        space)."""
        reserve = self.settings.limits.reserved_disk_mb * 1024 * 1024
        out = {}
        for kind, (ds, sop_uid) in files.items():
            # named by SOP Instance UID: a series processed again never overwrites a
            # result an earlier outbox item still has to send
            path = out_dir / f"{kind.lower()}-{sop_uid}.dcm"
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            data = buf.getvalue()
            free = shutil.disk_usage(out_dir).free
            if free - len(data) < reserve:
                raise JobFailed(
                    f"results not written: {free // 2**20} MB free, {len(data) // 2**20 + 1} "
                    f"MB needed above the {self.settings.limits.reserved_disk_mb} MB kept for "
                    "the database and logs; retry the series once there is space"
                )
            try:
                write_durably(path, data)
            except OSError as exc:
                raise JobFailed(
                    f"results not written: {exc}; retry the series once the disk is writable"
                ) from None
            written.append(path)
            out[kind] = {"path": str(path), "sop_uid": sop_uid}
        return out

    def _infer(
        self,
        model: ModelSettings,
        volume: Any,
        timings: dict[str, float],
        *,
        last_model: bool = False,
        reassemble: Any = None,
    ) -> Any:
        """The model's result on ``volume``, with the configured retries.

        For the last model of a series, a backend that runs the pipeline in this process
        (``takes_hand_over``) is handed the voxels: it lets go of them once preprocessed, and
        the volume keeps its geometry only. A retry after that assembles the volume again
        (``reassemble``), from the spool.
        """
        from dicom_node.inference import InferenceError
        from dicom_node.pipeline.result import HandOver

        inf = self.settings.inference

        def pause(attempt: int) -> float:  # uncapped: attempts are few
            return backoff(attempt, inf.retry_backoff_seconds, float("inf"))

        last: Exception | None = None
        for attempt in range(1, inf.attempts + 1):
            t0 = time.perf_counter()
            try:
                backend = self.backends()[model.name]
            except Exception as exc:  # noqa: BLE001 - e.g. Triton did not start; retried
                last = exc
                log.warning(
                    "inference backend unavailable (attempt %d/%d): %s", attempt, inf.attempts, exc
                )
                if attempt < inf.attempts and not self._stop.wait(pause(attempt)):
                    continue
                break
            try:
                if volume.has_pixels():
                    hand_over = (
                        last_model
                        and getattr(backend, "takes_hand_over", False)
                        and volume.device_pixels is None
                    )
                    if hand_over:
                        pixels = HandOver(volume.array)
                        volume.release_pixels()
                        result = backend.segment(pixels, volume.affine)
                    else:
                        result = backend.segment(volume.array, volume.affine)
                else:  # handed over in an attempt that failed
                    result = backend.segment(reassemble().array, volume.affine)
            except InferenceError as exc:
                last = exc
                log.warning("inference attempt %d/%d failed: %s", attempt, inf.attempts, exc)
                if attempt < inf.attempts and not self._stop.wait(pause(attempt)):
                    continue
                break
            timings["inference_total"] = (
                timings.get("inference_total", 0.0) + time.perf_counter() - t0
            )
            for k, v in getattr(result, "timings", {}).items():
                timings[k] = timings.get(k, 0.0) + float(v)
            # The result is what the model said: read-only from here on, which also lets
            # the encoders share one count of its labels (encode.labels.label_counts).
            result.labels.flags.writeable = False
            return result
        raise JobFailed(f"inference failed after {inf.attempts} attempt(s): {last}")

    def _segments(self, model: ModelSettings) -> list[Any]:
        from dicom_node.encode import segment_info_for

        return [segment_info_for(v, n) for v, n in sorted(self.bundle(model).labels.items())]

    def _algorithm(self, model: ModelSettings) -> Any:
        from dicom_node.encode import AlgorithmInfo

        return AlgorithmInfo.of_bundle(self.bundle(model))

    def _encode(
        self,
        model: ModelSettings,
        volume: Any,
        labels: Any,
        model_index: int = 0,
        predecessors: list[Any] | None = None,
        results: Any = None,
    ) -> dict[str, tuple[Any, str]]:
        from dicom_node.encode import EncodeError, build_rtstruct, build_seg, build_sr

        res = results or self.settings.results
        segments, algorithm = self._segments(model), self._algorithm(model)
        out: dict[str, tuple[Any, str]] = {}
        # The RTSTRUCT needs neither the SEG nor the SR: traced in a thread of its own while
        # they are built, its numpy and scikit-image work overlaps their Python work.
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rtstruct") as pool:
            traced = (
                pool.submit(
                    build_rtstruct,
                    volume,
                    labels,
                    segments,
                    algorithm,
                    res,
                    series_number("RTSTRUCT", model_index),
                )
                if res.make_rtstruct
                else None
            )
            try:
                seg = build_seg(
                    volume, labels, segments, algorithm, res, series_number("SEG", model_index)
                )
                sr = None
                if res.make_sr:
                    sr = build_sr(
                        seg,
                        volume,
                        labels,
                        segments,
                        algorithm,
                        res,
                        series_number("SR", model_index),
                        predecessors or (),
                    )
                rt = traced.result() if traced is not None else None
            except EncodeError as exc:
                raise JobFailed(f"results cannot be encoded: {exc}") from None
        # in the order they are sent: SEG, RTSTRUCT, SR
        for kind, ds in (("SEG", seg if res.make_seg else None), ("RTSTRUCT", rt), ("SR", sr)):
            if ds is not None:
                out[kind] = (ds, str(ds.SOPInstanceUID))
        if (
            res.seg_type == "labelmap"
            and res.make_seg
            and binary_alternatives_wanted(self.settings)
        ):
            # a destination may refuse the Label Map SEG: the binary SEG, and an SR that
            # names it, are made now while the labels are in memory (dicom_node.delivery)
            binary = dataclasses.replace(res, seg_type="binary", make_rtstruct=False)
            alternatives = self._encode(
                model, volume, labels, model_index, predecessors, results=binary
            )
            out.update({f"{kind}_BINARY": v for kind, v in alternatives.items()})
        return out

    def _label_volumes(self, model: ModelSettings, volume: Any, labels: Any) -> dict[str, float]:
        import numpy as np

        from dicom_node.encode import label_counts

        voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
        counts = label_counts(labels)
        return {n: float(counts[v] * voxel_ml) for v, n in self.bundle(model).labels.items()}

    def _retention_loop(self) -> None:
        policy = self.settings.retention
        while not self._stop.wait(policy.interval_seconds):
            try:
                apply_retention(policy, self.jobs, self.spool.root, self.results_dir)
            except Exception:  # noqa: BLE001 - the policy must not stop the node
                log.exception("retention error")

    # -- exporting --------------------------------------------------------------------
    def _export_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.exporter.run_once()
            except Exception:  # noqa: BLE001 - keep exporting whatever one item does
                log.exception("exporter error")
            self._export_wake.wait(1.0)
            self._export_wake.clear()


def _freeze_long_lived() -> None:
    """Load the encoders and highdicom's tables of the standard, then freeze the start-up
    heap (:mod:`dicom_node.heap`): half a second of a start, which, once the node listened,
    paused its associations (reading the tables' JSON holds the interpreter 0.2 s)."""
    import dicom_node.encode  # noqa: F401

    load_standard_tables()
    freeze_heap()


def _discard(paths: list[Path]) -> None:
    """Delete result files that will never be queued."""
    for path in paths:
        path.unlink(missing_ok=True)
