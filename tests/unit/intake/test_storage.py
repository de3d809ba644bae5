"""One C-STORE's work without the network: the limits, the duplicate rule, the durable write
and its database row, and what is left when the database refuses."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom.dsutils import encode

from dicom_node.config import LimitSettings, Settings
from dicom_node.intake.checks import (
    DOES_NOT_MATCH_SOP_CLASS,
    SUCCESS,
    TOO_LARGE,
    TOO_MANY_INSTANCES,
    UID_CONFLICT,
    StoreRefused,
)
from dicom_node.intake.received import Received
from dicom_node.intake.spool import Spool, dataset_digest
from dicom_node.intake.storage import InstanceStorage
from dicom_node.state import JobDatabase, SeriesState
from dicom_node_testing.synthetic import SeriesAttributes, ct_slice


def _received(attrs: SeriesAttributes, z: float, seed: int = 0) -> tuple[Received, str]:
    hu = np.random.default_rng(seed).integers(-1000, 1000, (16, 16))
    ds = ct_slice(hu, (0.0, 0.0, z), (1, 0, 0, 0, 1, 0), (0.7, 0.7), 2.0, int(z) + 1, attrs)
    data = encode(ds, False, True)
    return Received(size=len(data), data=data), str(ds.SOPInstanceUID)


@pytest.fixture
def storage(tmp_path):
    settings = Settings(limits=LimitSettings(min_free_disk_mb=1, max_instances_per_series=3))
    jobs = JobDatabase(tmp_path / "jobs.sqlite")
    store = InstanceStorage(settings, Spool(tmp_path / "spool"), jobs)
    yield store
    store.close()
    jobs.close()


def _store(storage: InstanceStorage, received: Received, sop_uid: str):
    return storage.store(received, CTImageStorage, ExplicitVRLittleEndian, sop_uid, "SCANNER")


def test_an_instance_is_spooled_and_recorded_then_a_copy_is_no_new_instance(storage):
    attrs = SeriesAttributes()
    received, sop = _received(attrs, 0.0)
    outcome = _store(storage, received, sop)
    assert (outcome.status, outcome.new, outcome.sop_uid) == (SUCCESS, True, sop)
    assert outcome.dataset is not None  # handed on for decoding while the series arrives
    spooled = storage.spool.path_for(attrs.study_instance_uid, attrs.series_instance_uid, sop)
    assert str(spooled) == outcome.path and spooled.stat().st_size > received.size
    record = storage.jobs.series.get(attrs.series_instance_uid)
    assert record.state == SeriesState.RECEIVING and record.calling_ae == "SCANNER"
    again = _store(storage, received, sop)
    assert (again.status, again.new) == (SUCCESS, False)
    assert storage.jobs.series.count(attrs.series_instance_uid) == 1


def test_other_content_under_a_stored_uid_is_refused_and_the_first_kept(storage):
    attrs = SeriesAttributes()
    received, sop = _received(attrs, 0.0, seed=1)
    _store(storage, received, sop)
    ds = pydicom.dcmread(storage.jobs.instances.find(sop).path)
    ds.PixelData = np.zeros((16, 16), np.int16).tobytes()  # other pixels, same UID
    data = encode(ds, False, True)
    with pytest.raises(StoreRefused) as refused:
        _store(storage, Received(size=len(data), data=data), sop)
    assert refused.value.status == UID_CONFLICT
    kept = Path(storage.jobs.instances.find(sop).path).read_bytes()
    assert dataset_digest(kept) == received.digest()


def test_limits_refuse_before_anything_is_written(storage):
    attrs = SeriesAttributes()
    for z in range(3):
        received, sop = _received(attrs, float(z))
        _store(storage, received, sop)
    received, sop = _received(attrs, 3.0)
    with pytest.raises(StoreRefused) as full:
        _store(storage, received, sop)
    assert full.value.status == TOO_MANY_INSTANCES
    big = Received(size=storage.settings.limits.max_instance_bytes + 1, data=b"")
    with pytest.raises(StoreRefused) as large:
        _store(storage, big, "1.2.3")
    assert large.value.status == TOO_LARGE
    assert storage.jobs.series.count(attrs.series_instance_uid) == 3


def _refusing_database(storage, monkeypatch) -> None:
    """The job database refuses every row from now on (a full disk, a lock held)."""

    def refuse(db, instance):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(storage.jobs.instances, "_insert", refuse)


def test_rows_written_behind_are_committed_before_any_other_read(storage):
    attrs = SeriesAttributes()
    for z in range(2):
        received, sop = _received(attrs, float(z))
        assert _store(storage, received, sop).new
    # another connection sees what is committed; this process's readers commit first
    found = storage.jobs.series.receiving_geometry(attrs.series_instance_uid)
    assert found is not None and found[0] == 2 and all(found[1])
    other = sqlite3.connect(storage.jobs.path)
    try:
        (count,) = other.execute(
            "SELECT COUNT(*) FROM instances WHERE series_uid = ?", (attrs.series_instance_uid,)
        ).fetchone()
    finally:
        other.close()
    assert count == 2


def test_queued_rows_count_for_the_duplicate_rule_and_the_series_limit(storage, monkeypatch):
    """While the database refuses rows, acknowledged instances wait in the queue: a second
    C-STORE of one is no new instance, other content under its UID is refused, and the
    series limit counts them."""
    attrs = SeriesAttributes()
    _refusing_database(storage, monkeypatch)
    stored = []
    for z in range(3):
        received, sop = _received(attrs, float(z))
        assert _store(storage, received, sop).new  # synced: acknowledged
        stored.append((received, sop))
    received, sop = stored[0]
    assert not _store(storage, received, sop).new
    other, _ = _received(attrs, 0.0, seed=9)
    ds = pydicom.dcmread(storage.jobs.instances.find(sop).path)
    ds.PixelData = np.zeros((16, 16), np.int16).tobytes()
    data = encode(ds, False, True)
    with pytest.raises(StoreRefused) as refused:
        _store(storage, Received(size=len(data), data=data), sop)
    assert refused.value.status == UID_CONFLICT
    received, sop = _received(attrs, 3.0)
    with pytest.raises(StoreRefused) as full:
        _store(storage, received, sop)
    assert full.value.status == TOO_MANY_INSTANCES
    with pytest.raises(sqlite3.OperationalError):
        storage.jobs.series.count(attrs.series_instance_uid)  # a reader commits first
    monkeypatch.undo()  # the database takes rows again
    assert storage.jobs.series.count(attrs.series_instance_uid) == 3


def test_an_acknowledged_instance_whose_row_a_crash_lost_is_registered(tmp_path, monkeypatch):
    """The spool is the source of truth: a row still queued when the node dies is
    registered from the synced file at the next start."""
    from dicom_node.intake.recovery import reconcile

    settings = Settings(limits=LimitSettings(min_free_disk_mb=1))
    jobs = JobDatabase(tmp_path / "jobs.sqlite")
    storage = InstanceStorage(settings, Spool(tmp_path / "spool"), jobs)
    _refusing_database(storage, monkeypatch)
    attrs = SeriesAttributes()
    received, sop = _received(attrs, 0.0)
    assert _store(storage, received, sop).new
    # the process dies here: the queue is gone, the file is not
    after = JobDatabase(tmp_path / "jobs.sqlite")
    try:
        assert after.instances.find(sop) is None
        assert reconcile(Spool(tmp_path / "spool"), after.instances) == 1
        assert after.instances.find(sop) is not None
        assert after.series.count(attrs.series_instance_uid) == 1
    finally:
        after.close()


def _bad_slope(attrs: SeriesAttributes) -> tuple[Received, str]:
    """An instance whose Rescale Slope 0 the image checks refuse (0xA900)."""
    hu = np.random.default_rng(5).integers(-1000, 1000, (16, 16))
    ds = ct_slice(hu, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0), (0.7, 0.7), 2.0, 1, attrs)
    ds.RescaleSlope = 0
    data = encode(ds, False, True)
    return Received(size=len(data), data=data), str(ds.SOPInstanceUID)


def test_an_image_refused_while_its_file_was_written_leaves_no_file(storage):
    """The image checks run while the file is written and synced: a refusal removes it."""
    received, sop = _bad_slope(SeriesAttributes())
    with pytest.raises(StoreRefused) as refused:
        _store(storage, received, sop)
    assert refused.value.status == DOES_NOT_MATCH_SOP_CLASS
    assert storage.spool.all_files() == []
    assert storage.jobs.instances.find(sop) is None


def test_a_refused_image_a_crash_left_in_the_spool_is_quarantined_not_registered(tmp_path):
    from dicom_node.intake.received import part10_header
    from dicom_node.intake.recovery import reconcile

    attrs = SeriesAttributes()
    received, sop = _bad_slope(attrs)
    spool = Spool(tmp_path / "spool")
    path = spool.path_for(attrs.study_instance_uid, attrs.series_instance_uid, sop)
    spool.write(path, part10_header(CTImageStorage, sop, ExplicitVRLittleEndian), received.data)
    jobs = JobDatabase(tmp_path / "jobs.sqlite")
    try:
        assert reconcile(spool, jobs.instances) == 0
        assert jobs.instances.find(sop) is None
    finally:
        jobs.close()
    assert spool.all_files() == []
    [reason] = (tmp_path / "quarantine").glob("*.reason.txt")
    assert "RescaleSlope 0" in reason.read_text()


def _streamed(storage: InstanceStorage, received: Received, sop_uid: str) -> Received:
    """``received`` as if written through to a file under the spool as it arrived."""
    from dicom_node.intake.received import part10_header

    meta = part10_header(CTImageStorage, sop_uid, ExplicitVRLittleEndian)
    assert received.data is not None
    path = storage.spool.incoming / f"{sop_uid}.part"
    path.write_bytes(meta + received.data)
    return Received(
        size=received.size, data=received.data, offset=len(meta), meta=meta, streamed=path
    )


def test_a_data_set_written_through_is_renamed_into_the_spool(storage):
    attrs = SeriesAttributes()
    received, sop = _received(attrs, 0.0)
    streamed = _streamed(storage, received, sop)
    source = streamed.streamed
    assert source is not None
    inode = source.stat().st_ino
    outcome = _store(storage, streamed, sop)
    assert (outcome.status, outcome.new) == (SUCCESS, True)
    spooled = Path(outcome.path)
    assert spooled.stat().st_ino == inode and not source.exists()  # renamed, not copied
    assert outcome.size == spooled.stat().st_size
    assert pydicom.dcmread(spooled).SOPInstanceUID == sop
    assert dataset_digest(spooled.read_bytes()) == received.digest()
    # a copy of it, written through again: a duplicate stores nothing and leaves no file
    again = _streamed(storage, received, sop)
    assert _store(storage, again, sop).new is False
    assert list(storage.spool.incoming.iterdir()) == []
    assert spooled.stat().st_ino == inode


def test_a_streamed_file_of_a_refused_or_other_header_is_not_the_spool_file(storage):
    received, sop = _bad_slope(SeriesAttributes())
    with pytest.raises(StoreRefused):
        _store(storage, _streamed(storage, received, sop), sop)
    assert list(storage.spool.incoming.iterdir()) == [] and storage.spool.all_files() == []
    # the request named another Affected SOP Instance UID than the file's header: the
    # spool file gets the header of the UID stored, written from memory
    attrs = SeriesAttributes()
    received, sop = _received(attrs, 1.0)
    other = _streamed(storage, received, "1.2.3.4")
    outcome = _store(storage, other, sop)
    assert outcome.status == SUCCESS and list(storage.spool.incoming.iterdir()) == []
    assert pydicom.dcmread(outcome.path).file_meta.MediaStorageSOPInstanceUID == sop
