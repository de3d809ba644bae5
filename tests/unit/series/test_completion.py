"""The completion rules on recorded headers, with a real job database: which series a
release completes, which the timer completes, and the gap-free test itself."""

from __future__ import annotations

import time

from dicom_node.intake.events import AssociationReleased
from dicom_node.intake.geometry import SliceGeometry
from dicom_node.series.completion import (
    RELEASED,
    SETTLE_TIMER,
    Completion,
    ReleaseRule,
    SettleRule,
    gap_free,
)
from dicom_node.state import JobDatabase, NewInstance, SeriesState


# -- the rule on headers alone ------------------------------------------------------------
def _slices(zs, expected=None, **kw) -> list[SliceGeometry]:
    return [
        SliceGeometry(
            position=(0.0, 0.0, float(z)),
            orientation=(1, 0, 0, 0, 1, 0),
            rows=64,
            columns=64,
            expected=expected,
            **kw,
        )
        for z in zs
    ]


def test_gap_free_on_headers():
    assert gap_free(_slices([0, 2, 4, 6]))
    assert gap_free(_slices([6, 0, 4, 2]))  # arrival order does not matter
    assert not gap_free(_slices([0, 2, 6, 8]))  # a missing slice
    assert not gap_free(_slices([0, 2, 4, 7]))  # uneven
    assert not gap_free(_slices([0, 2, 2, 4]))  # the same position twice
    assert gap_free(_slices([0, 2, 4], expected=3))
    assert not gap_free(_slices([0, 2, 4], expected=5))  # the modality said 5
    assert not gap_free([*_slices([0, 2]), None])  # an instance without recorded geometry
    assert not gap_free([*_slices([0, 2]), SliceGeometry(orientation=(1, 0, 0, 0, 1, 0))])
    tilted = _slices([0, 2, 4])
    tilted[1] = SliceGeometry(
        position=(0.0, 0.0, 2.0), orientation=(1, 0, 0, 0, 0.9, 0.1), rows=64, columns=64
    )
    assert not gap_free(tilted)
    assert gap_free([SliceGeometry(frames=40)])  # one Enhanced CT holds the whole series
    assert not gap_free([SliceGeometry(frames=40), SliceGeometry(frames=40)])


def _receive(jobs: JobDatabase, series: str, slices: list[SliceGeometry], when: float = 0.0):
    for k, geometry in enumerate(slices):
        jobs.instances.add(
            NewInstance(
                sop_uid=f"{series}.{k}",
                sop_class="1.2.840.10008.5.1.4.1.1.2",
                series_uid=series,
                study_uid="1.2",
                modality="CT",
                calling_ae="A",
                path=f"/spool/{series}.{k}.dcm",
                size=1,
                digest=f"{series}.{k}",
                received=when or None,
                geometry=geometry.to_json(),
            )
        )


def _released(series: str, count: int, still_open: frozenset[str] = frozenset()):
    sops = frozenset(f"{series}.{k}" for k in range(count))
    return AssociationReleased(carried={series: sops}, still_open=still_open)


def test_a_release_completes_only_what_it_carried_whole_and_gap_free(tmp_path):
    jobs = JobDatabase(tmp_path / "jobs.sqlite")
    rule = ReleaseRule(jobs.series, settle_seconds=10)
    _receive(jobs, "1.1", _slices([0, 2, 4, 6]))
    _receive(jobs, "1.2", _slices([0, 2, 6, 8]))  # a gap
    _receive(jobs, "1.3", _slices([0, 2, 4]))
    assert rule.on_release(_released("1.2", 4)) == []
    assert rule.on_release(_released("1.3", 2)) == []  # one instance came over another
    assert rule.on_release(_released("1.1", 4, still_open=frozenset({"1.1"}))) == []
    assert rule.on_release(_released("1.1", 4)) == ["1.1"]
    record = jobs.series.get("1.1")
    assert record.state == SeriesState.COMPLETE and record.completed_by == RELEASED
    assert rule.on_release(_released("1.1", 4)) == []  # complete already
    assert rule.on_tick(time.time()) == []


def test_the_timer_completes_what_stopped_arriving(tmp_path):
    jobs = JobDatabase(tmp_path / "jobs.sqlite")
    rule = SettleRule(jobs.series, settle_seconds=10)
    now = time.time()
    _receive(jobs, "2.1", _slices([0, 2, 6, 8]), when=now - 60)
    _receive(jobs, "2.2", _slices([0, 2, 4]), when=now - 1)
    assert rule.on_release(_released("2.1", 4)) == []
    assert rule.on_tick(now) == ["2.1"]
    assert jobs.series.get("2.1").completed_by == SETTLE_TIMER
    assert jobs.series.get("2.2").state == SeriesState.RECEIVING
    assert rule.on_tick(now + 10) == ["2.2"]


def test_completion_hands_each_complete_series_on_once(tmp_path):
    jobs = JobDatabase(tmp_path / "jobs.sqlite")
    handed: list[str] = []
    now = time.time()
    completion = Completion(
        [ReleaseRule(jobs.series, 10), SettleRule(jobs.series, 10)], jobs.series, handed.append
    )
    _receive(jobs, "3.1", _slices([0, 2, 4]), when=now)
    _receive(jobs, "3.2", _slices([0, 2, 6]), when=now)
    completion.on_release(_released("3.1", 3))
    completion.tick(now + 11)
    completion.tick(now + 12)
    assert handed == ["3.1", "3.2"]
