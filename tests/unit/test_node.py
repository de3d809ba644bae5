"""The node's start: what a crash left is recovered before anything is served, and the
components are wired (a complete series reaches the runner, its results the outbox)."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node.config import settings_from_dict
from dicom_node.inference import BACKENDS
from dicom_node.intake.spool import Spool
from dicom_node.node import Node
from dicom_node.state import JobDatabase, NewInstance, OutboxState, SeriesState
from dicom_node_testing import threshold
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.peers import SPLEEN_BUNDLE, wait_for


@pytest.fixture
def settings(tmp_path, monkeypatch):
    monkeypatch.setitem(BACKENDS, "threshold", threshold.create_backends)
    return settings_from_dict(
        {
            "node": {"data_dir": str(tmp_path / "var"), "settle_seconds": 0.2},
            "limits": {"min_free_disk_mb": 1},
            "inference": {"backend": "threshold"},
            "models": [{"name": "spleen", "bundle": str(SPLEEN_BUNDLE)}],
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}],
        }
    )


def test_a_start_recovers_the_spool_and_processes_what_was_interrupted(settings, tmp_path):
    data = settings.node.data_dir
    spool = Spool(data / "spool")
    hu = np.full((4, 16, 16), 100, np.int16)
    attrs = SeriesAttributes()
    paths = write_ct_series(hu, tmp_path / "ct", spacing=(2.0, 1.0, 1.0), attrs=attrs)
    # a crash after the acknowledged write, before the database row: files the database
    # does not know; and one written half (never acknowledged)
    for path in paths:
        target = spool.path_for(attrs.study_instance_uid, attrs.series_instance_uid, path.stem)
        spool.write(target, path.read_bytes())
    (spool.incoming / "half.part").write_bytes(b"partial")
    torn = spool.path_for(attrs.study_instance_uid, "1.2.3", "1.2.3.4")
    spool.write(torn, paths[0].read_bytes()[:300])
    # and a job that was processing when the node died
    jobs = JobDatabase(data / "jobs.sqlite")
    jobs.instances.add(
        NewInstance("9.1.1", "1.2.840.10008.5.1.4.1.1.2", "9.1", "1.2", "CT", "A",
                    data / "none.dcm", 1, "d")
    )  # fmt: skip
    jobs.series.complete("9.1", "test", 1)
    jobs.series.claim("9.1")
    jobs.close()

    node = Node(settings)
    node.start(serve=False)
    try:
        assert not list(spool.incoming.iterdir())
        assert not torn.exists() and list((data / "quarantine").glob("*.reason.txt"))
        uid = attrs.series_instance_uid
        assert node.jobs.series.count(uid) == 4
        # the interrupted job runs again (and fails: its instance's file is gone)
        wait_for(lambda: node.jobs.series.get("9.1").state == SeriesState.FAILED, 20, "a retry")
        # the recovered series completes by the timer and is processed through the runner
        wait_for(lambda: node.jobs.series.get(uid).state == SeriesState.DONE, 30, "the series done")
        kinds = [i.kind for i in node.jobs.outbox.items(uid)]
        assert kinds == ["SEG", "RTSTRUCT", "SR"]
        assert {i.state for i in node.jobs.outbox.items(uid)} <= {
            OutboxState.PENDING,
            OutboxState.FAILED,
        }
    finally:
        node.stop()
