"""When is a series complete? Rules that decide it, at an association's release or on a
timer.

DICOM has no "end of series" message. A sender that pushes a series over one association and
releases it normally has, in practice, sent all it had; if its slices then stack into a
volume without a gap (and match the count the modality wrote, where it wrote one), waiting
any longer only delays the result. So at each normal release (intake's
:class:`~dicom_node.intake.events.AssociationReleased`; never an abort) the
:class:`ReleaseRule` asks :func:`gap_free` of every series the association carried whole
(every instance the series holds came over it), and completes those that pass. Everything
else (a gap, a sender that aborted, a series spread over several associations) is left to
the :class:`SettleRule`: complete ``settle_seconds`` after its last instance.

The check reads no file: each instance's few geometry attributes are taken from the data set
the C-STORE handler parsed anyway (:mod:`dicom_node.intake.geometry`) and kept beside the
instance in the job database, so a release costs one query and some arithmetic.

A rule is a :class:`CompletionRule`; :class:`Completion` runs the configured rules and hands
each series they complete to the job runner.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from dicom_node.config import Settings
from dicom_node.intake.events import AssociationReleased
from dicom_node.intake.geometry import SliceGeometry
from dicom_node.series.volume import VolumeError, check_spacing
from dicom_node.state import SeriesRepository

__all__ = [
    "FETCHED",
    "RELEASED",
    "SETTLE_TIMER",
    "Completion",
    "CompletionRule",
    "ReleaseRule",
    "SettleRule",
    "gap_free",
    "rules_for",
]

log = logging.getLogger("dicom_node.series.completion")

#: The rules' names, as recorded on a job (``completed_by``).
RELEASED = "association released"
SETTLE_TIMER = "settle timer"
#: A fetch retrieved every instance its source holds (:mod:`dicom_node.sources.fetch`).
FETCHED = "fetched"


class CompletionRule(Protocol):
    """Marks receiving series complete (in the job database) and says which."""

    #: What the job records as having completed the series.
    name: str

    def on_release(self, event: AssociationReleased) -> list[str]:
        """The series this release completes."""
        ...

    def on_tick(self, now: float) -> list[str]:
        """The series complete by now (called about once a second)."""
        ...


class ReleaseRule:
    """Complete a series at the normal release of the association that carried all of it,
    when its headers show a whole volume.

    A series some of whose instances came over another association is left to the settle
    timer: the release of one association is no evidence that the sender of the others is
    done. Only the very instances looked at count: one stored meanwhile leaves the series
    receiving.
    """

    name = RELEASED

    def __init__(self, series: SeriesRepository, settle_seconds: float) -> None:
        self.series = series
        self.settle_seconds = settle_seconds

    def on_release(self, event: AssociationReleased) -> list[str]:
        return [
            uid
            for uid in sorted(event.carried)
            if uid not in event.still_open and self._whole(uid, len(event.carried[uid]))
        ]

    def on_tick(self, now: float) -> list[str]:
        return []

    def _whole(self, series_uid: str, carried: int) -> bool:
        found = self.series.receiving_geometry(series_uid)
        if found is None:  # not receiving: processing, done, or gone
            return False
        count, stored = found
        if carried != count:
            log.info(
                "series %s: association released with %d of its %d instance(s), the "
                "rest from other associations; waiting %.0f s for more",
                series_uid,
                carried,
                count,
                self.settle_seconds,
            )
            return False
        if not gap_free([SliceGeometry.from_json(g) for g in stored]):
            log.info(
                "series %s: association released, but its %d instance(s) do not form "
                "a volume without a gap; waiting %.0f s for more",
                series_uid,
                count,
                self.settle_seconds,
            )
            return False
        return self.series.complete(series_uid, self.name, count)


class SettleRule:
    """Complete a series ``settle_seconds`` after its last instance."""

    name = SETTLE_TIMER

    def __init__(self, series: SeriesRepository, settle_seconds: float) -> None:
        self.series = series
        self.settle_seconds = settle_seconds

    def on_release(self, event: AssociationReleased) -> list[str]:
        return []

    def on_tick(self, now: float) -> list[str]:
        return self.series.settle(now - self.settle_seconds, self.name)


def rules_for(settings: Settings, series: SeriesRepository) -> list[CompletionRule]:
    """The rules ``[node]`` asks for: the release rule unless ``complete_on_release`` is
    off, and always the settle timer."""
    settle = settings.node.settle_seconds
    rules: list[CompletionRule] = []
    if settings.node.complete_on_release:
        rules.append(ReleaseRule(series, settle))
    rules.append(SettleRule(series, settle))
    return rules


class Completion:
    """Runs the completion rules and hands each series they complete to ``on_complete``.

    :meth:`on_release` is subscribed to intake's releases (it runs on the association's
    thread, after the peer was answered); :meth:`start` runs the rules' ticks in a thread.
    """

    def __init__(
        self,
        rules: Sequence[CompletionRule],
        series: SeriesRepository,
        on_complete: Callable[[str], None],
        tick_seconds: float = 1.0,
    ) -> None:
        self.rules = list(rules)
        self.series = series
        self.on_complete = on_complete
        self.tick_seconds = tick_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def on_release(self, event: AssociationReleased) -> None:
        for rule in self.rules:
            self._completed(rule, rule.on_release(event))

    def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for rule in self.rules:
            self._completed(rule, rule.on_tick(now))

    def _completed(self, rule: CompletionRule, uids: list[str]) -> None:
        for uid in uids:
            log.info(
                "series %s: complete (%d instances, %s)", uid, self.series.count(uid), rule.name
            )
            self.on_complete(uid)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dicom-node-settle", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.tick_seconds):
            self.tick()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None


def gap_free(slices: Sequence[SliceGeometry | None]) -> bool:
    """Whether these instances of one series form a whole volume by their headers alone.

    True for one multi-frame instance (an Enhanced CT carries the whole series), and for
    single-frame slices of one size and orientation whose positions are evenly spaced
    along the slice normal, with as many slices as a stated Images in Acquisition. The
    spacing test is the assembler's own (:func:`~dicom_node.series.volume.check_spacing`): a
    series complete by this rule and one assembly accepts agree on what a gap is. Gantry
    tilt is not judged here: a tilted series is complete, and fails at assembly with its
    reason.
    """
    if not slices or any(s is None for s in slices):
        return False
    known: list[SliceGeometry] = [s for s in slices if s is not None]
    if any(s.frames > 1 for s in known):
        return len(known) == 1
    if any(s.position is None or s.orientation is None for s in known):
        return False
    if len({(s.rows, s.columns) for s in known}) > 1:
        return False
    orientations = {tuple(round(v, 4) for v in s.orientation or ()) for s in known}
    if len(orientations) > 1:
        return False
    counts = {s.expected for s in known if s.expected is not None}
    if counts and counts != {len(known)}:
        return False
    orientation = np.array(next(iter(orientations)), dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    along = np.sort(np.array([s.position for s in known], dtype=float) @ normal)
    try:
        check_spacing(np.diff(along))
    except VolumeError:
        return False
    return True
