"""Prometheus metrics of one node: what it received, how long each stage took, what waits.

Event counts and latencies (instances received, stage durations, Triton round trips, export
attempts) are recorded by the node as they happen through the ``observe_*`` methods. Levels
(series per state, queue depths) are read from the job database when Prometheus scrapes, so
they are right after a restart and never drift from what ``dicom-node jobs`` shows.

Each :class:`NodeMetrics` has its own registry rather than prometheus_client's global one:
two nodes in one process (the tests) would otherwise collide on metric names.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from dicom_node.state import JobDatabase, SeriesResults, SeriesState

if TYPE_CHECKING:
    from dicom_node.intake.storage import StoreOutcome

__all__ = ["CONTENT_TYPE", "JOB_STAGES", "STAGES", "NodeMetrics"]

#: Content type of :meth:`NodeMetrics.exposition` (Prometheus text format 0.0.4).
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: The stages a job times itself, in order (the keys of its timings that are stages; the
#: status pages show them). "pre", "inference" and "post" are the pipeline's own steps (on
#: Triton, as measured in the server); "write" is making the results durable.
JOB_STAGES = ("assemble", "pre", "inference", "post", "encode", "write")
#: Every stage: a job's, then "export", one association to a destination.
STAGES = (*JOB_STAGES, "export")

# From a fraction of a second (a CT assembles in tens of ms) up to the ten minutes a large
# volume may take on a CPU-only node.
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


_SUCCESS = 0x0000


class _JobLevels:
    """Series per state and queue depths, read from the job database at each scrape."""

    def __init__(self, jobs: JobDatabase) -> None:
        self.jobs = jobs

    def describe(self) -> list[Metric]:
        # Describing without reading the database lets the registry check names at
        # registration time even before the job store holds anything.
        return [
            GaugeMetricFamily(
                "dicom_node_series", "Series known to the node, by state.", labels=["state"]
            ),
            GaugeMetricFamily(
                "dicom_node_queue_depth",
                "Work waiting: complete series not yet taken by a worker "
                "(processing) and result files not yet sent (export).",
                labels=["queue"],
            ),
        ]

    def collect(self) -> Iterator[Metric]:
        counts = self.jobs.series.counts_by_state()
        series = GaugeMetricFamily(
            "dicom_node_series", "Series known to the node, by state.", labels=["state"]
        )
        for state, count in counts.items():
            series.add_metric([str(state)], count)
        yield series
        queue = GaugeMetricFamily(
            "dicom_node_queue_depth",
            "Work waiting: complete series not yet taken by a worker "
            "(processing) and result files not yet sent (export).",
            labels=["queue"],
        )
        queue.add_metric(["processing"], counts[SeriesState.COMPLETE])
        queue.add_metric(["export"], self.jobs.outbox.pending_count())
        yield queue


class NodeMetrics:
    """The node's metrics and the calls that record them.

    ``jobs`` adds the levels read from the job database; ``process_metrics`` adds the
    standard process, platform and garbage-collector metrics of this Python process.
    """

    def __init__(
        self,
        jobs: JobDatabase | None = None,
        *,
        registry: CollectorRegistry | None = None,
        process_metrics: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.instances = Counter(
            "dicom_node_instances_received",
            "C-STORE requests answered, by DIMSE status and outcome "
            "(stored, duplicate: same instance again, refused).",
            ["status", "outcome"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "dicom_node_stage_duration_seconds",
            "Seconds each stage of a job took.",
            ["stage"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.triton_seconds = Histogram(
            "dicom_node_triton_request_duration_seconds",
            "Seconds of one segmentation request to Triton, sending the volume to receiving "
            "the labels.",
            buckets=_BUCKETS,
            registry=r,
        )
        self.export_attempts = Counter(
            "dicom_node_export_attempts",
            "Result files offered to a destination, by destination and result "
            "(sent, failed: to be retried, gave_up).",
            ["destination", "result"],
            registry=r,
        )
        self.export_retries = Counter(
            "dicom_node_export_retries",
            "Export attempts that repeat an earlier failed one, by destination.",
            ["destination"],
            registry=r,
        )
        self.results = Counter(
            "dicom_node_results",
            "Result objects made and queued for sending, by model and kind (SEG, RTSTRUCT, SR).",
            ["model", "kind"],
            registry=r,
        )
        # Present from the start with count 0, so a dashboard's rate() has a series to read.
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        if jobs is not None:
            r.register(_JobLevels(jobs))
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

    # -- recording --------------------------------------------------------------------
    def observe_store(self, outcome: StoreOutcome) -> None:
        """Count one answered C-STORE (a ``Node.observers`` callback)."""
        if outcome.status != _SUCCESS:
            kind = "refused"
        else:
            kind = "stored" if outcome.new else "duplicate"
        self.instances.labels(f"0x{outcome.status:04X}", kind).inc()

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record how long ``stage`` (one of :data:`STAGES`) took."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
        self.stage_seconds.labels(stage).observe(seconds)

    def observe_timings(self, timings: Mapping[str, float]) -> None:
        """Record a job's timings as :meth:`~dicom_node.jobs.runner.JobRunner.process` collects them.

        Stage keys go to the stage histogram. A Triton result's "server" and "transfer"
        (model execution there, everything else) add up to one request's round trip.
        Other keys are ignored.
        """
        for key, seconds in timings.items():
            if key in JOB_STAGES:  # not "inference_total": it may include a start-up
                self.stage_seconds.labels(key).observe(seconds)
        if "server" in timings:
            self.observe_triton(timings["server"] + timings.get("transfer", 0.0))

    def observe_results(self, results: SeriesResults) -> None:
        """Count the result objects of one finished run, per model and kind."""
        for model in results:
            for kind in model.kinds():
                self.results.labels(model.model, kind).inc()

    def observe_triton(self, seconds: float) -> None:
        """Record one Triton request's round trip."""
        self.triton_seconds.observe(seconds)

    def observe_export(
        self,
        destination: str,
        ok: bool,
        attempt: int,
        seconds: float | None = None,
        gave_up: bool = False,
    ) -> None:
        """Record attempt number ``attempt`` (1 for the first) to send one result file.

        ``seconds`` is the association's duration (observed as the "export" stage);
        ``gave_up`` says a failed attempt was the destination's last.
        """
        result = "sent" if ok else ("gave_up" if gave_up else "failed")
        self.export_attempts.labels(destination, result).inc()
        if attempt > 1:
            self.export_retries.labels(destination).inc()
        if seconds is not None:
            self.stage_seconds.labels("export").observe(seconds)

    # -- exposition -------------------------------------------------------------------
    def exposition(self) -> bytes:
        """All metrics in the Prometheus text format (serve with :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)
