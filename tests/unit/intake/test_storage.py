"""One C-STORE's work without the network: the limits, the duplicate rule, the durable write
and its database row, and what is left when the database refuses."""

from __future__ import annotations

import sqlite3

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom.dsutils import encode

from dicom_node.config import LimitSettings, Settings
from dicom_node.intake.checks import (
    SUCCESS,
    TOO_LARGE,
    TOO_MANY_INSTANCES,
    UID_CONFLICT,
    StoreRefused,
)
from dicom_node.intake.received import Received
from dicom_node.intake.spool import Spool
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
    assert storage.jobs.instances.find(sop).digest == received.digest()


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


def test_a_row_the_database_refuses_leaves_no_file_to_adopt(storage, monkeypatch):
    attrs = SeriesAttributes()
    received, sop = _received(attrs, 0.0)

    def refuse(instance):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(storage.jobs.instances, "add", refuse)
    with pytest.raises(sqlite3.OperationalError):
        _store(storage, received, sop)
    # not acknowledged, so not in the spool either: a restart will not adopt it
    assert storage.spool.all_files() == []
