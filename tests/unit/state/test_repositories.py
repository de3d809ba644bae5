"""The job database's repositories: what each transaction guarantees, on a real SQLite file."""

from __future__ import annotations

import pytest

from dicom_node.state import (
    FinishOutcome,
    InstanceConflict,
    JobDatabase,
    ModelResults,
    NewInstance,
    NewOutboxItem,
    OutboxState,
    ResultFile,
    SeriesResults,
    SeriesState,
)


def _instance(series: str, k: int, digest: str | None = None) -> NewInstance:
    return NewInstance(
        sop_uid=f"{series}.{k}",
        sop_class="1.2.840.10008.5.1.4.1.1.2",
        series_uid=series,
        study_uid="1.2",
        modality="CT",
        calling_ae="SCANNER",
        path=f"/spool/{series}.{k}.dcm",
        size=10,
        digest=digest or f"d{k}",
    )


def _item(series: str, kind: str, dest: str = "pacs", **kw) -> NewOutboxItem:
    return NewOutboxItem(series, kind, dest, f"/r/{kind}.dcm", f"{series}.{kind}", "m", **kw)


def _results(series: str) -> SeriesResults:
    return SeriesResults([ModelResults("m", {"SEG": ResultFile("/r/SEG.dcm", f"{series}.SEG")})])


@pytest.fixture
def db(tmp_path):
    jobs = JobDatabase(tmp_path / "jobs.sqlite")
    yield jobs
    jobs.close()


def test_instances_make_their_series_and_a_duplicate_is_no_new_instance(db):
    assert db.instances.add(_instance("1.1", 0)) == (True, None)
    assert db.instances.add(_instance("1.1", 1)) == (True, SeriesState.RECEIVING)
    assert db.instances.add(_instance("1.1", 1)) == (False, None)  # same content again
    with pytest.raises(InstanceConflict):
        db.instances.add(_instance("1.1", 1, digest="other"))
    record = db.series.get("1.1")
    assert (record.state, record.instance_count, record.calling_ae) == (
        SeriesState.RECEIVING,
        2,
        "SCANNER",
    )
    assert db.instances.find("1.1.1").digest == "d1"
    assert [p.name for p in db.instances.paths("1.1")] == ["1.1.0.dcm", "1.1.1.dcm"]


def test_rows_written_behind_are_gathered_into_few_commits_and_read_at_once(db, tmp_path):
    import sqlite3
    import threading
    import time

    from dicom_node.state import instances as repository

    def committed() -> int:  # seen by another connection: committed, not only queued
        with sqlite3.connect(tmp_path / "jobs.sqlite") as raw:
            query = "SELECT COUNT(*) FROM instances WHERE series_uid = '1.3'"
            return int(raw.execute(query).fetchone()[0])

    flushes = []  # the writer's commits of queued rows
    flush = repository.InstanceRepository.flush

    def counted(self) -> None:
        if threading.current_thread().name == "dicom-node-instances" and self._pending:
            flushes.append(len(self._pending))
        flush(self)

    repository.InstanceRepository.flush = counted  # type: ignore[method-assign]
    try:
        for k in range(20):  # instances arriving a millisecond apart
            db.instances.record(_instance("1.3", k))
            time.sleep(0.001)
        assert db.instances.find("1.3.7") is not None  # queued rows are seen at once
        deadline = time.monotonic() + 10
        while committed() < 20 and time.monotonic() < deadline:  # no read of the node's
            time.sleep(0.01)
    finally:
        repository.InstanceRepository.flush = flush  # type: ignore[method-assign]
    assert committed() == 20
    assert 1 <= len(flushes) < 10  # gathered, not one transaction per instance
    assert db.series.get("1.3").instance_count == 20


def test_settling_commits_the_queued_rows_now_or_says_it_could_not(db, tmp_path, monkeypatch):
    import sqlite3

    from dicom_node.state import instances as repository

    monkeypatch.setattr(repository, "GATHER_SECONDS", 60.0)  # the writer would wait a minute

    def committed() -> int:
        with sqlite3.connect(tmp_path / "jobs.sqlite") as raw:
            return int(raw.execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    db.instances.record(_instance("1.4", 0))
    assert db.instances.settle(10.0)  # committed without the gathering's wait
    assert committed() == 1
    lock = sqlite3.connect(tmp_path / "jobs.sqlite", timeout=10, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        db.instances.record(_instance("1.4", 1))
        assert not db.instances.settle(0.2)  # locked: not committed, and said so in time
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert db.instances.settle(15.0)  # the writer's retry, once the lock is gone
    assert committed() == 2


def test_a_job_ends_done_only_for_the_instances_it_processed(db):
    for k in range(3):
        db.instances.add(_instance("2.1", k))
    assert db.series.complete("2.1", "a rule", 2) is False  # not the count the rule saw
    assert db.series.complete("2.1", "a rule", 3) is True
    assert db.series.claim("2.1") == (True, 3)
    assert db.series.claim("2.1") == (False, 3)  # processing already
    db.instances.add(_instance("2.1", 3))  # arrives while the job runs
    assert db.series.get("2.1").state == SeriesState.PROCESSING
    outcome = db.series.finish_run("2.1", 3, _results("2.1"), [_item("2.1", "SEG")], {"m": set()})
    assert outcome == FinishOutcome.OVERTAKEN
    assert db.outbox.items("2.1") == []  # nothing queued for a run overtaken


def test_finishing_queues_the_results_and_supersedes_what_was_not_sent(db):
    for k in range(3):
        db.instances.add(_instance("3.1", k))
    db.series.complete("3.1", "r", 3)
    db.series.claim("3.1")
    done = db.series.finish_run("3.1", 3, _results("3.1"), [_item("3.1", "SEG")], {"m": set()})
    assert done == FinishOutcome.DONE
    (first,) = db.outbox.items("3.1")
    assert first.state == OutboxState.PENDING
    record = db.series.get("3.1")
    assert record.state == SeriesState.DONE and record.results == _results("3.1")
    # a new instance reaches the done series: the unsent result will never be sent
    db.instances.add(_instance("3.1", 3))
    assert db.series.get("3.1").state == SeriesState.RECEIVING
    assert db.outbox.items("3.1")[0].state == OutboxState.CANCELLED


def test_a_result_acknowledged_meanwhile_makes_the_run_encode_again(db):
    for k in range(3):
        db.instances.add(_instance("4.1", k))
    db.outbox.enqueue(_item("4.1", "SR", form=""))
    (earlier,) = db.outbox.items("4.1")
    db.series.complete("4.1", "r", 3)
    db.series.claim("4.1")
    db.outbox.mark_sent(earlier.id)  # acknowledged after the run read its predecessors
    stale = db.series.finish_run("4.1", 3, _results("4.1"), [], {"m": set()})
    assert stale == FinishOutcome.STALE_PREDECESSORS
    named = db.series.finish_run("4.1", 3, _results("4.1"), [], {"m": {earlier.sop_uid}})
    assert named == FinishOutcome.DONE


def test_the_binary_form_taken_becomes_the_item(db):
    db.outbox.enqueue(_item("5.1", "SEG", form="labelmap", alt_path="/r/bin.dcm", alt_sop_uid="b"))
    (item,) = db.outbox.items("5.1")
    db.outbox.mark_sent(item.id, alternative=True)
    (sent,) = db.outbox.items("5.1")
    assert (sent.state, sent.path, sent.sop_uid, sent.sent_as) == (
        OutboxState.SENT,
        "/r/bin.dcm",
        "b",
        "binary",
    )
    assert (sent.alt_path, sent.alt_sop_uid) == ("/r/SEG.dcm", "5.1.SEG")
    assert db.outbox.sent_form("5.1", "m", "pacs", "SEG") == "binary"
    assert [i.sop_uid for i in db.outbox.sent("5.1", "m")] == ["b"]


def test_failures_wait_and_give_up_and_an_operator_retries(db):
    db.outbox.enqueue(_item("6.1", "SEG"))
    (item,) = db.outbox.items("6.1")
    db.outbox.mark_attempt_failed(item.id, "refused", next_attempt=2e9, give_up=False)
    assert db.outbox.due(now=1e9) == [] and db.outbox.pending_count() == 1
    db.outbox.mark_attempt_failed(item.id, "refused", next_attempt=0, give_up=True)
    assert db.outbox.items("6.1")[0].state == OutboxState.FAILED
    assert db.series.retry("6.1") == 1
    (again,) = db.outbox.due()
    assert (again.state, again.attempts) == (OutboxState.PENDING, 0)


def test_retention_may_take_only_finished_series_owing_nothing(db):
    for series, state in (("7.1", SeriesState.DONE), ("7.2", SeriesState.DONE)):
        db.instances.add(_instance(series, 0))
        db.series.set_state(series, state)
    db.outbox.enqueue(_item("7.2", "SEG"))  # still owed to the PACS
    db.instances.add(_instance("7.3", 0))  # still receiving
    assert [r.series_uid for r in db.series.retention_candidates()] == ["7.1"]
    assert [p.name for p in db.series.purge("7.1")] == ["7.1.0.dcm"]
    assert db.series.get("7.1") is None and db.instances.find("7.1.0") is None
    assert db.series.purge("7.3") == []  # not finished: refused


def test_a_restart_processes_interrupted_jobs_again(tmp_path):
    path = tmp_path / "jobs.sqlite"
    db = JobDatabase(path)
    db.instances.add(_instance("8.1", 0))
    db.series.complete("8.1", "r", 1)
    db.series.claim("8.1")
    db.close()
    db = JobDatabase(path)
    assert db.series.resume() == 1
    assert db.series.get("8.1").state == SeriesState.COMPLETE
    counts = db.series.counts_by_state()
    assert counts[SeriesState.COMPLETE] == 1 and counts[SeriesState.DONE] == 0
    (listed,) = db.listing()
    assert listed.to_json()["state"] == "complete" and listed.to_json()["outbox"] == []
    db.close()
