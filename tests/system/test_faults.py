"""Faults with the real components: the node killed mid-job, the PACS down, Triton gone.

Each test prints a one-line summary: what was tried and instances lost (always 0).
"""

from __future__ import annotations

import socket
import time

import pytest

from dicom_node_testing.phantom import make_phantom
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.peers import NodeProcess, Orthanc, free_port, storescu

pytestmark = [pytest.mark.slow, pytest.mark.cost(55)]


def _phantom_series(folder, seed: int) -> SeriesAttributes:
    phantom = make_phantom(shape=(40, 96, 96), spacing=(5.0, 3.5, 3.5), seed=seed)
    attrs = SeriesAttributes(patient_id=f"FAULT-{seed}")
    write_ct_series(phantom.hu, folder, spacing=phantom.spacing, attrs=attrs)
    return attrs


def _job(jobs: list[dict], series_uid: str) -> dict | None:
    return next((j for j in jobs if j["series_uid"] == series_uid), None)


def _results_in_pacs(pacs: Orthanc, study_uid: str) -> dict[str, int]:
    found = pacs.rest(
        "/tools/find",
        {"Level": "Instance", "Expand": True, "Query": {"StudyInstanceUID": study_uid}},
    )
    counts: dict[str, int] = {}
    for inst in found:
        modality = pacs.rest(f"/instances/{inst['ID']}/simplified-tags").get("Modality", "")
        counts[modality] = counts.get(modality, 0) + 1
    return counts


def _node(tmp_path, pacs: Orthanc | None, **inference) -> NodeProcess:
    dests = (
        []
        if pacs is None
        else [
            {
                "name": "pacs",
                "ae_title": pacs.aet,
                "host": "127.0.0.1",
                "port": pacs.dicom_port,
                "retry_backoff_seconds": 0.5,
                "max_backoff_seconds": 1.0,
            }
        ]
    )
    return NodeProcess(
        tmp_path / "node",
        node={"settle_seconds": 0.5},
        inference={"backend": "local", "retry_backoff_seconds": 0.2, **inference},
        destinations=dests,
    )


def test_killed_while_inferring_then_restarted(tmp_path, orthanc):
    attrs = _phantom_series(tmp_path / "ct", seed=11)
    node = _node(tmp_path, orthanc)
    node.start()
    try:
        assert storescu(node.port, tmp_path / "ct").returncode == 0
        node.wait_for(
            lambda js: (
                (j := _job(js, attrs.series_instance_uid)) is not None
                and j["state"] == "processing"
            ),
            120,
            "processing",
        )
        node.kill()
        node.start()
        jobs = node.wait_for(
            lambda js: (
                (j := _job(js, attrs.series_instance_uid)) is not None
                and j["state"] == "done"
                and j["outbox"]
                and all(o["state"] == "sent" for o in j["outbox"])
            ),
            300,
            "results sent",
            failures_allowed=False,
        )
        job = _job(jobs, attrs.series_instance_uid)
        assert job["instance_count"] == 40
        assert job["attempts"] >= 2  # processed again after the crash
        # sent is final; a duplicate would have been acknowledged before it: counted now
        counts = _results_in_pacs(orthanc, attrs.study_instance_uid)
        assert counts == {"SEG": 1, "RTSTRUCT": 1, "SR": 1}
        print(
            "fault killed-while-inferring: 40 acknowledged, 40 processed, results once, "
            "instances lost = 0"
        )
    finally:
        node.stop()


def test_killed_while_exporting_then_restarted(tmp_path):
    pacs = Orthanc(tmp_path / "pacs")  # not started: results wait in the outbox
    attrs = _phantom_series(tmp_path / "ct", seed=12)
    node = _node(tmp_path, pacs)
    node.start()
    try:
        assert storescu(node.port, tmp_path / "ct").returncode == 0
        node.wait_for(
            lambda js: (
                (j := _job(js, attrs.series_instance_uid)) is not None
                and j["state"] == "done"
                and j["outbox"]
                and all(o["attempts"] >= 1 for o in j["outbox"])
            ),
            300,
            "export retrying",
            failures_allowed=False,
        )
        node.kill()
        pacs.start()
        node.start()
        node.wait_for(
            lambda js: all(
                o["state"] == "sent" for o in _job(js, attrs.series_instance_uid)["outbox"]
            ),
            120,
            "results sent after restart",
        )
        # sent is final; a duplicate would have been acknowledged before it: counted now
        assert _results_in_pacs(pacs, attrs.study_instance_uid) == {
            "SEG": 1,
            "RTSTRUCT": 1,
            "SR": 1,
        }
        print("fault killed-while-exporting: results sent once after restart, instances lost = 0")
    finally:
        node.stop()
        pacs.stop()


@pytest.mark.parametrize("failure", ["unreachable", "unresponsive"])
def test_triton_gone_fails_the_job_after_its_attempts(tmp_path, failure):
    port = free_port()
    silent = None
    if failure == "unresponsive":  # accepts connections, never answers
        silent = socket.socket()
        silent.bind(("127.0.0.1", port))
        silent.listen(16)
    attrs = _phantom_series(tmp_path / "ct", seed=13)
    node = _node(
        tmp_path,
        None,
        backend="triton",
        triton_url=[f"127.0.0.1:{port}"],
        attempts=2,
        timeout_seconds=3.0,
    )
    node.start()
    try:
        t0 = time.time()
        assert storescu(node.port, tmp_path / "ct").returncode == 0
        jobs = node.wait_for(
            lambda js: (
                (j := _job(js, attrs.series_instance_uid)) is not None and j["state"] == "failed"
            ),
            120,
            "failed job",
        )
        job = _job(jobs, attrs.series_instance_uid)
        assert job["reason"].startswith("inference failed after 2 attempt(s)"), job["reason"]
        assert job["instance_count"] == 40
        print(
            f"fault triton-{failure}: failed after 2 attempts in {time.time() - t0:.0f} s "
            f"({job['reason'][:80]}), instances lost = 0"
        )
        # the operator fixes Triton and retries: nothing was lost, the series is still there
        assert len(list((node.data_dir / "spool").glob("*/*/*.dcm"))) == 40
    finally:
        node.stop()
        if silent is not None:
            silent.close()
