"""Retention deletes old finished series and never what is still owed to a destination."""

from __future__ import annotations

import time

from dicom_node.config import RetentionSettings
from dicom_node.intake.spool import Spool
from dicom_node.service.retention import apply_retention
from dicom_node.state import JobDatabase, NewInstance, NewOutboxItem, SeriesState


def _series(
    jobs: JobDatabase,
    spool: Spool,
    results,
    uid: str,
    n: int = 3,
    state=SeriesState.DONE,
    owed: str | None = None,
    when: float = 0.0,
) -> None:
    for k in range(n):
        path = spool.path_for("1.2", uid, f"{uid}.{k}")
        spool.write(path, b"x" * 1000)
        jobs.instances.add(
            NewInstance(
                sop_uid=f"{uid}.{k}",
                sop_class="1.2.840.10008.5.1.4.1.1.2",
                series_uid=uid,
                study_uid="1.2",
                modality="CT",
                calling_ae="A",
                path=path,
                size=1000,
                digest=uid + str(k),
                received=when,
            )
        )
    (results / uid).mkdir(parents=True)
    (results / uid / "seg-1.dcm").write_bytes(b"y" * 500)
    jobs.outbox.enqueue(
        NewOutboxItem(
            series_uid=uid,
            kind="SEG",
            destination="pacs",
            path=str(results / uid / "seg-1.dcm"),
            sop_uid=uid + ".9",
        )
    )
    if owed is None:
        jobs.outbox.mark_sent(jobs.outbox.items(uid)[0].id)
    jobs.series.set_state(uid, state)


def test_age_limit_spares_what_is_owed_or_unfinished(tmp_path):
    jobs, spool, results = (
        JobDatabase(tmp_path / "j.sqlite"),
        Spool(tmp_path / "spool"),
        tmp_path / "r",
    )
    _series(jobs, spool, results, "1.1")  # finished, sent: may go
    _series(jobs, spool, results, "1.2", owed="pending")  # result not yet exported
    _series(jobs, spool, results, "1.3", state=SeriesState.RECEIVING)  # still arriving
    later = time.time() + 3 * 86400
    assert apply_retention(RetentionSettings(days=1), jobs, spool.root, results, now=later) == [
        "1.1"
    ]
    assert jobs.series.get("1.1") is None and not (results / "1.1").exists()
    assert not list(spool.root.glob("1.2/1.1/*"))
    for uid in ("1.2", "1.3"):
        assert jobs.series.get(uid) is not None
        assert len(list(spool.root.glob(f"1.2/{uid}/*.dcm"))) == 3
    # not old enough yet: nothing goes
    assert apply_retention(RetentionSettings(days=10), jobs, spool.root, results, now=later) == []


def test_size_limit_deletes_oldest_first(tmp_path):
    jobs, spool, results = (
        JobDatabase(tmp_path / "j.sqlite"),
        Spool(tmp_path / "spool"),
        tmp_path / "r",
    )
    _series(jobs, spool, results, "2.1")
    time.sleep(0.01)
    _series(jobs, spool, results, "2.2")
    # each series holds 3500 bytes: a 5000-byte limit keeps only the newer one
    assert apply_retention(RetentionSettings(max_bytes=5000), jobs, spool.root, results) == ["2.1"]
    assert jobs.series.get("2.2") is not None
    assert apply_retention(RetentionSettings(), jobs, spool.root, results) == []  # policy off
