"""The node: its components built from the settings, wired, started and stopped.

Data flows one way, and nothing here decides anything about it::

    intake (C-STORE) --events--> series (completion, assembly) --> jobs (route, infer,
    encode, write) --> state (outbox) --> export (transports) --> the PACS

Intake emits each C-STORE's outcome and each release (:mod:`dicom_node.intake.events`):
the streaming assembler and the metrics take the first, completion the second. Completion
hands each complete series to the job runner; the runner emits the start and end of each
job (:mod:`dicom_node.jobs.runner`), which the embedded PACS (the CT for the viewer), the
metrics and the exporter (new results to send) take. With ``[[sources]]``, the fetch worker
retrieves what is asked for into intake and hands each series it completes to the runner,
and the runner tops up series the settle timer completed (:mod:`dicom_node.sources.fetch`).

The audit trail (:mod:`dicom_node.service.audit`, ``[audit]``) takes intake's stored
instances, association ends and refusals, the exporter's batches and acknowledgements, and
is called by the status pages and the viewer; it records the node's start and stop.

On start the node recovers from whatever the last run left: partial files are removed,
spooled files the database missed are registered (:mod:`dicom_node.intake.recovery`), and
series interrupted while processing are processed again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dicom_node.common.events import Events
from dicom_node.common.heap import freeze_heap
from dicom_node.common.standard_tables import load_standard_tables
from dicom_node.config import Settings
from dicom_node.encode.processes import EncoderProcesses, remove_stale_labels
from dicom_node.export.sender import Exporter, ExportStarted, ResultSent
from dicom_node.inference import Backends
from dicom_node.intake.events import AssociationEnded, AssociationRefused, AssociationReleased
from dicom_node.intake.recovery import reconcile
from dicom_node.intake.scp import StorageSCP
from dicom_node.intake.spool import Spool
from dicom_node.intake.storage import StoreOutcome
from dicom_node.jobs.runner import JobEnded, JobRunner, JobStarted
from dicom_node.series.assembly import StreamingAssembler
from dicom_node.series.completion import Completion, rules_for
from dicom_node.service.audit import AssociationLedger, AuditTrail
from dicom_node.service.metrics import NodeMetrics
from dicom_node.service.retention import Retention
from dicom_node.sources.fetch import Fetcher, Retrieval, TopUp
from dicom_node.state import JobDatabase, SeriesState

if TYPE_CHECKING:  # imported when started: a node without them never loads their web stack
    from dicom_node.service.embedded import Embedded
    from dicom_node.service.web import WebServer

__all__ = ["Node"]

log = logging.getLogger("dicom_node.node")


class Node:
    """One DICOM node: its SCP, its job database, its stages and its services."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        data_dir = settings.node.data_dir
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.jobs = JobDatabase(data_dir / "jobs.sqlite")
        self.spool = Spool(data_dir / "spool")
        self.results_dir = data_dir / "results"
        self.results_dir.mkdir(exist_ok=True, mode=0o700)
        self.events = Events()
        self.scp = StorageSCP(settings, self.spool, self.jobs, self.events)
        self.assembler = StreamingAssembler()
        self.backends = Backends(settings.inference, settings.models, data_dir)
        retrieval = Retrieval(settings, self.scp.retrieve_handlers()) if settings.sources else None
        #: The processes that encode results, unless ``[results] encode_processes = 0``.
        self.encoder_processes = (
            EncoderProcesses(
                settings.results.encode_processes, settings.results.encode_processes_min_labels
            )
            if settings.results.encode_processes
            else None
        )
        self.runner = JobRunner(
            settings,
            self.jobs,
            self.assembler,
            self.backends,
            self.results_dir,
            self.events,
            encoder_processes=self.encoder_processes,
            top_up=TopUp(retrieval, self.jobs)
            if retrieval and any(s.top_up for s in settings.sources)
            else None,
        )
        #: The worker that fetches studies from the sources, with [[sources]].
        self.fetcher = Fetcher(retrieval, self.jobs, self.runner.enqueue) if retrieval else None
        settle = settings.node.settle_seconds
        self.completion = Completion(
            rules_for(settings, self.jobs.series),
            self.jobs.series,
            self.runner.enqueue,
            tick_seconds=min(1.0, max(0.05, settle / 4)),
        )
        self.metrics = NodeMetrics(self.jobs)
        self.audit = AuditTrail.from_settings(
            settings.audit,
            data_dir,
            settings.node.ae_title,
            study_evidence=self.jobs.instances.any_in_study,
        )
        self.exporter = Exporter(
            settings, self.jobs, on_attempt=self.metrics.observe_export, events=self.events
        )
        self.retention = Retention(settings.retention, self.jobs, self.spool.root, self.results_dir)
        #: The status pages, once started.
        self.status: WebServer | None = None
        #: The PACS and viewer the node runs for an ``embedded`` destination, once started.
        self.embedded: Embedded | None = None
        self.events.subscribe(StoreOutcome, self.metrics.observe_store)
        self.events.subscribe(StoreOutcome, self.assembler.on_stored)
        self.events.subscribe(AssociationReleased, self.completion.on_release)
        self.events.subscribe(JobEnded, self._job_ended)
        if self.audit.enabled:
            ledger = AssociationLedger(self.audit)
            self.events.subscribe(StoreOutcome, ledger.on_stored)
            self.events.subscribe(AssociationEnded, ledger.on_ended)
            self.events.subscribe(AssociationRefused, self.audit.on_refused)
            self.events.subscribe(ExportStarted, self.audit.on_export_started)
            self.events.subscribe(ResultSent, self.audit.on_result_sent)

    def start(self, serve: bool = True) -> None:
        """Recover from whatever the last run left, then start serving and working."""
        from dicom_node.inference.triton.shm import remove_stale

        removed = self.spool.clean_incoming()
        remove_stale()  # volumes a killed node left in shared memory
        remove_stale_labels()  # and label maps it was encoding
        registered = reconcile(
            self.spool, self.jobs.instances, self.settings.limits.max_rows_columns
        )
        resumed = self.jobs.series.resume()
        fetches = self.jobs.fetches.resume()
        log.info(
            "start: %d partial file(s) removed, %d spooled instance(s) re-registered, "
            "%d interrupted series to process again, %d interrupted fetch(es) to do again",
            removed,
            registered,
            resumed,
            fetches,
        )
        _freeze_long_lived()  # before the first association: no pause once serving
        if serve:
            self._start_embedded()  # the default destination listens before anything is sent
            if self.settings.status.enabled:  # first: a taken port stops before any C-STORE
                from dicom_node.service.status import create_app
                from dicom_node.service.web import WebServer

                app = create_app(
                    self.settings,
                    self.jobs,
                    self.metrics,
                    self.backends.ready,
                    viewer_url=self.embedded.viewer_url if self.embedded else None,
                    audit=self.audit,
                    on_fetch=self.fetcher.wake if self.fetcher else None,
                )
                self.status = WebServer(app, self.settings.status.host, self.settings.status.port)
                self.status.start()
            self.scp.start()
            self.audit.on_start()
        self.runner.start()
        self.completion.start()
        self.exporter.start()
        self.retention.start()
        if serve and self.fetcher is not None:  # C-MOVE retrieves to the SCP
            self.fetcher.start()

    def _start_embedded(self) -> None:
        """Start the PACS and viewer of an ``embedded`` destination, if one is configured;
        each job's CT then goes to it, for the viewer to show the results over."""
        from dicom_node.service.embedded import Embedded, embedded_destination

        destination = embedded_destination(self.settings)
        if destination is not None:
            embedded = Embedded(self.settings, destination, self.audit)
            embedded.start()
            self.embedded = embedded
            self.events.subscribe(JobStarted, lambda started: embedded.archive(started.paths))

    def _job_ended(self, ended: JobEnded) -> None:
        if ended.timings:
            self.metrics.observe_timings(ended.timings)
        if ended.state == SeriesState.DONE:
            if ended.results is not None:
                self.metrics.observe_results(ended.results)
            self.exporter.wake()

    def stop(self) -> None:
        self.audit.on_stop()
        if self.fetcher is not None:
            self.fetcher.stop()
        self.exporter.stop()
        self.completion.stop()
        self.retention.stop()
        if self.status is not None:
            self.status.stop()
        self.scp.stop()
        self.assembler.close()
        self.runner.stop()
        if self.encoder_processes is not None:
            self.encoder_processes.close()
        self.backends.close()
        self.jobs.close()
        self.exporter.close()
        if self.embedded is not None:
            self.embedded.stop()
        self.audit.close()


def _freeze_long_lived() -> None:
    """Load the encoders and highdicom's tables of the standard, then freeze the start-up
    heap (:mod:`dicom_node.common.heap`): half a second of a start, done before the node
    listens, since once it serves it would pause its associations (reading the tables' JSON
    holds the interpreter)."""
    import dicom_node.encode  # noqa: F401

    load_standard_tables()
    freeze_heap()
