"""Fetch: studies the node did not receive, retrieved from a source and processed as pushed.

Two things bring instances from a source (``[[sources]]``) rather than from a sender:

* a **fetch** (:class:`Fetcher`): ``dicom-node fetch --study UID --from SOURCE`` or the
  status service's ``POST /fetch`` records it in the job database
  (:mod:`dicom_node.state.fetches`); the node's fetch worker takes it, lists the study's CT
  series with C-FIND (or the one series asked for), counts each one's instances at IMAGE
  level, and retrieves the series one at a time: by C-MOVE to the node's own AE title
  (the source opens associations to the node's SCP, which stores the instances as any
  C-STORE) or by C-GET (the instances come back on the worker's association and go through
  the SCP's own C-STORE handler, :meth:`~dicom_node.intake.scp.StorageSCP.retrieve_handlers`).
  Once a series' retrieve has ended, every instance the source holds is here: the series is
  complete (rule :data:`FETCHED`) unless a release already completed it, and goes to the
  job runner once, whole. The series records the source it came from (``fetched_from``).
* a **top-up** (:class:`TopUp`): before the job runner processes a series the settle
  timer completed, each source with ``top_up = true`` is asked which instances of it it
  holds; the ones the node lacks are retrieved (C-MOVE or C-GET of those instances), so the
  series is processed once, whole, and its job says what was added (``topped_up``).

Each failure is the source's one sentence (:mod:`.qr`): on the fetch (and so the command's
output and ``GET /fetches/<id>``), on the job of a series whose top-up failed, and in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from pynetdicom import evt

from dicom_node.common.worker import Worker
from dicom_node.config import Settings
from dicom_node.series.completion import FETCHED
from dicom_node.sources.qr import SourceClient, SourceError, StoreHandler
from dicom_node.sources.settings import SourceSettings
from dicom_node.state import FetchedSeries, FetchRecord, FetchState, JobDatabase, SeriesState

__all__ = ["Fetcher", "Retrieval", "TopUp", "TopUpFailed"]

log = logging.getLogger("dicom_node.sources.fetch")

#: Modality of the series a study fetch retrieves: the node segments CT.
MODALITY = "CT"


class TopUpFailed(RuntimeError):
    """A top-up could not be made; the message is the sentence the job records."""


class Retrieval:
    """What a retrieve needs of the node: its AE title and TLS settings (for the
    association), and, for C-GET, the SCP's C-STORE and release handlers."""

    def __init__(self, settings: Settings, handlers: Sequence[tuple[Any, ...]]) -> None:
        self.settings = settings
        self.sources = {s.name: s for s in settings.sources}
        store = [h for h in handlers if h[0] is evt.EVT_C_STORE]
        if len(store) != 1:
            raise ValueError("retrieve handlers need exactly one EVT_C_STORE handler")
        self.on_store: StoreHandler = store[0][1]
        self.handlers = [h for h in handlers if h[0] is not evt.EVT_C_STORE]

    def client(self, source: SourceSettings) -> SourceClient:
        return SourceClient(source, self.settings.node.ae_title, self.settings.tls)

    def retrieve(
        self,
        client: SourceClient,
        study_uid: str,
        series_uid: str,
        sop_instance_uids: Sequence[str] = (),
    ) -> None:
        """Retrieve a series (or some of its instances) into the node, the source's way."""
        client.retrieve(
            study_uid,
            series_uid,
            destination_ae=self.settings.node.ae_title,
            on_store=self.on_store,
            sop_instance_uids=sop_instance_uids,
            handlers=self.handlers,
        )


class Fetcher:
    """The fetch worker: takes pending fetches from the job database, one at a time.

    Parameters
    ----------
    retrieval:
        The node's AE title, TLS settings and C-GET handlers.
    jobs:
        Where fetches are asked for and recorded, and series looked up.
    on_complete:
        Called with each series a fetch completed (the job runner's ``enqueue``).
    """

    #: Seconds between looks for fetches another process (``dicom-node fetch``) asked for.
    POLL_SECONDS = 0.25

    def __init__(
        self, retrieval: Retrieval, jobs: JobDatabase, on_complete: Callable[[str], None]
    ) -> None:
        self.retrieval = retrieval
        self.jobs = jobs
        self.on_complete = on_complete
        self._worker = Worker(
            "dicom-node-fetch", lambda: self.run_once() is not None, self.POLL_SECONDS, "fetch"
        )

    def run_once(self) -> FetchRecord | None:
        """Do the oldest pending fetch; it as it ended, or ``None`` when none was pending."""
        record = self.jobs.fetches.claim()
        if record is None:
            return None
        try:
            self._fetch(record)
        except SourceError as exc:
            self._failed(record, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug: the fetch says so, the worker goes on
            log.exception("fetch %d: unexpected error", record.id)
            self._failed(record, f"internal error (see the node's log): {exc}")
        return self.jobs.fetches.get(record.id)

    def _failed(self, record: FetchRecord, reason: str) -> None:
        log.warning("fetch %d of study %s failed: %s", record.id, record.study_uid, reason)
        self.jobs.fetches.update(record.id, FetchState.FAILED, reason=reason)

    def _fetch(self, record: FetchRecord) -> None:
        source = self.retrieval.sources.get(record.source)
        if source is None:
            known = ", ".join(repr(n) for n in self.retrieval.sources) or "none"
            raise SourceError(f"source {record.source!r} is not configured (configured: {known})")
        client = self.retrieval.client(source)
        log.info(
            "fetch %d: %s%s from %s",
            record.id,
            f"series {record.series_uid} of " if record.series_uid else "",
            f"study {record.study_uid}",
            source.describe(),
        )
        found = client.find_series(record.study_uid, record.series_uid)
        wanted = [s for s in found if s.modality.upper() == MODALITY]
        if not wanted:
            what = (
                f"series {record.series_uid}" if record.series_uid else f"study {record.study_uid}"
            )
            held = ", ".join(sorted({s.modality or "no modality" for s in found}))
            raise SourceError(
                f"{what} at {source.describe()} has no {MODALITY} series (it holds {held}): "
                f"the node segments {MODALITY} only"
            )
        series = [
            FetchedSeries(
                s.series_uid,
                s.modality,
                expected=client.count_instances(record.study_uid, s.series_uid),
            )
            for s in wanted
        ]
        self.jobs.fetches.update(record.id, FetchState.RETRIEVING, series)
        for n, fetched in enumerate(series):
            series[n] = self._retrieve(client, source, record.study_uid, fetched)
            self.jobs.fetches.update(record.id, FetchState.RETRIEVING, series)
        self.jobs.fetches.update(record.id, FetchState.DONE, series)
        log.info(
            "fetch %d done: %s",
            record.id,
            "; ".join(f"series {s.series_uid} {s.new} new instance(s), {s.state}" for s in series),
        )

    def _retrieve(
        self, client: SourceClient, source: SourceSettings, study_uid: str, fetched: FetchedSeries
    ) -> FetchedSeries:
        uid = fetched.series_uid
        before = self.jobs.series.count(uid)
        self.retrieval.retrieve(client, study_uid, uid)
        count = self.jobs.series.count(uid)
        if count > before:
            self.jobs.series.mark_fetched(uid, source.name)
        # Every instance the source holds is here: complete it, unless a release did.
        if self.jobs.series.complete(uid, FETCHED, count):
            log.info("series %s: complete (%d instances, %s)", uid, count, FETCHED)
            self.on_complete(uid)
        record = self.jobs.series.get(uid)
        state = str(record.state) if record is not None else ""
        if record is not None and record.state.finished and count == before:
            log.info(
                "series %s was here already (%s): nothing new retrieved, nothing processed "
                "again (dicom-node retry processes it again)",
                uid,
                record.state,
            )
        return FetchedSeries(uid, fetched.modality, fetched.expected, count - before, state)

    # -- running ----------------------------------------------------------------------
    def start(self) -> None:
        self._worker.start()

    def wake(self) -> None:
        """A fetch was asked for in this process: take it now."""
        self._worker.wake()

    def stop(self) -> None:
        self._worker.stop()


class TopUp:
    """Completes a series from the sources with ``top_up = true`` before it is processed.

    Called by the job runner for a series the settle timer completed. Each such source in
    turn lists the instances of the series it holds (C-FIND at IMAGE level): the first that
    holds some the node lacks sends them (C-MOVE or C-GET of those instances); one that
    holds the series and nothing more says it is whole. Returns what was added, in words,
    or "" when nothing was. Raises :class:`TopUpFailed` with the source's sentence when the
    instances found missing do not all come, or when no source could say the series is
    whole because one could not be asked.
    """

    def __init__(self, retrieval: Retrieval, jobs: JobDatabase) -> None:
        self.retrieval = retrieval
        self.jobs = jobs
        self.sources = [s for s in retrieval.settings.sources if s.top_up]

    def __call__(self, series_uid: str) -> str:
        record = self.jobs.series.get(series_uid)
        if record is None or record.state != SeriesState.PROCESSING:
            return ""
        unasked: list[SourceError] = []
        for source in self.sources:
            client = self.retrieval.client(source)
            try:
                listed = client.find_instances(record.study_uid, series_uid)
            except SourceError as exc:
                unasked.append(exc)
                continue
            have = self.jobs.instances.sop_uids(series_uid)
            missing = [i.sop_instance_uid for i in listed if i.sop_instance_uid not in have]
            if listed and not missing:
                return ""  # the source holds the series, and nothing more
            if not missing:
                continue  # the source does not hold it
            log.info(
                "series %s: %s holds %d instance(s) more than the %d here: topping up",
                series_uid,
                source.describe(),
                len(missing),
                len(have),
            )
            try:
                self.retrieval.retrieve(client, record.study_uid, series_uid, missing)
            except SourceError as exc:
                raise TopUpFailed(f"not topped up: {exc}") from None
            added = len(self.jobs.instances.sop_uids(series_uid) - have)
            return f"{added} of {len(listed)} instances from source {source.name!r}"
        if unasked:
            raise TopUpFailed(f"not topped up: {unasked[0]}")
        return ""
