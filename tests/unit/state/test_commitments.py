"""Storage commitment bookkeeping (:mod:`dicom_node.state.commitments`): an acknowledgement
makes it owed, a request is recorded before it is made, a report is applied once, late
reports commit but do not fail, failures are sent again or given up, retention and retry
respect what is owed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dicom_node.state import CommitmentState, JobDatabase, NewInstance, OutboxState
from dicom_node.state.commitments import (
    CommitmentReport,
    Failure,
    Reference,
    Tracked,
    apply_report,
)
from dicom_node.state.outbox import NewOutboxItem

CT = "1.2.840.10008.5.1.4.1.1.2"


def _db(tmp_path: Path, items: int = 2, commitment: bool = True) -> JobDatabase:
    jobs = JobDatabase(tmp_path / "jobs.sqlite")
    jobs.instances.add(
        NewInstance("1.2.1", CT, "1.2.9", "1.2.8", "CT", "SCU", tmp_path / "a.dcm", 1, "d")
    )
    for n in range(items):
        jobs.outbox.enqueue(NewOutboxItem("1.2.9", f"K{n}", "pacs", f"r{n}.dcm", f"1.3.{n}"))
        jobs.outbox.mark_sent(n + 1, sent_at=100.0, commitment=commitment)
    return jobs


def _ask(jobs: JobDatabase, uid: str, now: float = 200.0) -> list[Tracked]:
    asked = [
        replace(t, state=CommitmentState.REQUESTED, transaction_uid=uid, requests=t.requests + 1)
        for t in jobs.commitments.tracked()
        if t.state == CommitmentState.OWED
    ]
    jobs.commitments.record_request("pacs", asked, now)
    return asked


def test_an_acknowledgement_makes_the_commitment_owed_only_where_asked(tmp_path):
    jobs = _db(tmp_path)
    owed = jobs.commitments.tracked()
    assert [(t.state, t.since, t.sends) for t in owed] == [(CommitmentState.OWED, 100.0, 1)] * 2
    assert jobs.outbox.items()[0].summary()["commitment"] == "owed"
    plain = _db(tmp_path / "plain", commitment=False)
    assert plain.commitments.tracked() == []
    assert plain.outbox.items()[0].commitment is None


def test_a_report_commits_and_fails_in_one_transaction(tmp_path):
    jobs = _db(tmp_path)
    _ask(jobs, "2.1")
    assert [t.state for t in jobs.commitments.tracked()] == [CommitmentState.REQUESTED] * 2
    (request,) = jobs.commitments.requests()
    assert (request.item_ids, request.reported_at) == ((1, 2), None)
    report = CommitmentReport(
        "2.1",
        committed=(Reference(CT, "1.3.0"),),
        failed=(Failure(Reference(CT, "1.3.1"), 0x0112),),
        reporter="ORTHANC",
        received_at=300.0,
    )
    changed = jobs.commitments.record_report(report)
    assert [(t.item_id, t.state) for t in changed] == [
        (1, CommitmentState.COMMITTED),
        (2, CommitmentState.FAILED),
    ]
    first, second = jobs.outbox.items()
    assert (first.commitment, first.commit_reason) == (CommitmentState.COMMITTED, "")
    assert second.commit_reason == "0x0112 No such object instance (the PACS does not hold it)"
    assert jobs.commitments.record_report(report) == []  # twice changes nothing
    assert jobs.commitments.requests()[0].outcome == "1 committed, 1 not"
    assert jobs.commitments.record_report(CommitmentReport("9.9")) is None  # not ours


def test_a_late_report_commits_but_never_fails(tmp_path):
    jobs = _db(tmp_path, items=1)
    (first,) = _ask(jobs, "3.1")
    jobs.commitments.request_not_made("3.1", "no report", counts=True)  # as if timed out
    _ask(jobs, "3.2", now=400.0)
    late_failure = CommitmentReport("3.1", failed=(Failure(Reference(CT, "1.3.0"), 0x0110),))
    assert jobs.commitments.record_report(late_failure) == []
    late_success = CommitmentReport("3.1", committed=(Reference(CT, "1.3.0"),))
    (done,) = jobs.commitments.record_report(late_success)
    assert done.state == CommitmentState.COMMITTED


def test_a_request_not_made_owes_again_and_counts_only_when_answered(tmp_path):
    jobs = _db(tmp_path, items=1)
    _ask(jobs, "4.1")
    jobs.commitments.request_not_made("4.1", "pacs cannot be reached", counts=False)
    (item,) = jobs.commitments.tracked()
    assert (item.state, item.requests, item.reason) == (
        CommitmentState.OWED,
        0,
        "pacs cannot be reached",
    )
    _ask(jobs, "4.2")
    jobs.commitments.request_not_made("4.2", "pacs refused", counts=True)
    assert jobs.commitments.tracked()[0].requests == 1
    assert jobs.commitments.requests()[0].outcome == "not made: pacs cannot be reached"


def test_failures_are_sent_again_or_given_up_and_retention_waits(tmp_path):
    jobs = _db(tmp_path)
    jobs.series.set_state("1.2.9", "done")
    _ask(jobs, "5.1")
    jobs.commitments.record_report(
        CommitmentReport(
            "5.1",
            committed=(Reference(CT, "1.3.0"),),
            failed=(Failure(Reference(CT, "1.3.1"), 0x0112),),
        )
    )
    assert jobs.series.retention_candidates() == []  # one result still owes its commitment
    (failed,) = [t for t in jobs.commitments.tracked() if t.state == CommitmentState.FAILED]
    assert jobs.commitments.resend([failed]) == 1
    item = jobs.outbox.items()[1]
    assert (item.state, item.commitment) == (OutboxState.PENDING, None)
    assert item.last_error.startswith("not committed, sent again: 0x0112")
    jobs.outbox.mark_sent(item.id, commitment=True)  # acknowledged again: owed again
    assert jobs.outbox.items()[1].commitment == CommitmentState.OWED
    (owed,) = jobs.commitments.tracked()
    jobs.commitments.give_up([replace(owed, reason="not committed by pacs after 2 send(s)")])
    item = jobs.outbox.items()[1]
    assert (item.state, item.commitment, item.last_error) == (
        OutboxState.FAILED,
        CommitmentState.FAILED,
        "not committed by pacs after 2 send(s)",
    )
    assert jobs.series.retry("1.2.9") == 1  # sent again, its commitment asked anew
    assert (jobs.outbox.items()[1].state, jobs.outbox.items()[1].commitment) == (
        OutboxState.PENDING,
        None,
    )
    jobs.outbox.mark_sent(2, commitment=True)
    _ask(jobs, "5.2")
    jobs.commitments.record_report(CommitmentReport("5.2", committed=(Reference(CT, "1.3.1"),)))
    assert [r.series_uid for r in jobs.series.retention_candidates()] == ["1.2.9"]
    assert jobs.series.purge("1.2.9")
    assert jobs.commitments.requests() == []


def test_apply_report_alone():
    item = Tracked(1, "pacs", "1.3.0", "x", CommitmentState.REQUESTED, 0.0, "6.1", 1)
    silent = CommitmentReport("6.1")
    (failed,) = apply_report([item], silent)
    assert (failed.state, failed.reason) == (
        CommitmentState.FAILED,
        "the PACS's report did not name it",
    )
    assert apply_report([item], CommitmentReport("6.0")) == []  # another transaction
