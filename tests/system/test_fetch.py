"""Segment what the node did not receive: studies fetched from a PACS, series topped up.

One node (in this process, the ``threshold`` backend in place of a model: what is checked
here is where instances come from and how often a series is processed) with three
``[[sources]]`` on two real Q/R SCPs, and Orthanc as its destination too:

* ``pacs``: Orthanc 1.10, C-MOVE to the node; ``pacs-get``: the same Orthanc, C-GET;
* ``archive``: DCMTK ``dcmqrscp``, C-GET, ``top_up = true``; ``archive-move``: the same
  ``dcmqrscp``, which does not know the node's AE title, by C-MOVE;
* ``gone``: nothing listens there (``top_up = true``: a series the archive does not hold
  cannot be said to be whole).

A study fetched with ``dicom-node fetch`` comes back to the PACS with its SEG, RTSTRUCT and
SR; a series fetched through the status service (behind its credentials) by C-GET is
processed as a pushed one; a series pushed without a third of its instances is completed
from the archive and processed once, whole; and each error a user can act on is one
sentence in the fetch, the command's output and the log.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import load_settings
from dicom_node.export.push import push_paths
from dicom_node.inference import BACKENDS
from dicom_node.node import Node
from dicom_node.state import FetchState, OutboxState, SeriesState
from dicom_node_testing import threshold
from dicom_node_testing.phantom import make_phantom
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.conftest import require
from tests.peers import (
    ROOT,
    SPLEEN_BUNDLE,
    DcmQRSCP,
    Orthanc,
    _toml,
    free_port,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.cost(16)

NODE_AE = "DICOM_NODE"
#: The status service's user and password (read from the environment, as configured).
CREDENTIALS = "operator:s3cret"
CREDENTIALS_ENV = "DICOM_NODE_TEST_FETCH_STATUS"


@dataclass
class Setup:
    node: Node
    config: Path
    pacs: Orthanc
    archive: DcmQRSCP
    status_url: str
    work: Path


def _series(work: Path, name: str, seed: int) -> tuple[SeriesAttributes, list[Path]]:
    """A 12-slice phantom CT series of a study of its own."""
    phantom = make_phantom(shape=(12, 40, 40), spacing=(5.0, 8.0, 8.0), seed=seed)
    attrs = SeriesAttributes()
    return attrs, write_ct_series(phantom.hu, work / name, spacing=phantom.spacing, attrs=attrs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[Setup]:
    require("Orthanc")
    require("dcmqrscp")
    work = tmp_path_factory.mktemp("fetch")
    port, status_port = free_port(), free_port()
    pacs = Orthanc(work / "orthanc", modalities={"node": [NODE_AE, "127.0.0.1", port]}).start()
    archive = DcmQRSCP(work / "dcmqrscp").start()  # knows no move destination
    local = {"host": "127.0.0.1"}
    config = work / "node.toml"
    config.write_text(
        _toml(
            {
                "node": {
                    "ae_title": NODE_AE,
                    "host": "127.0.0.1",
                    "port": port,
                    "data_dir": str(work / "var"),
                    "settle_seconds": 1.0,
                },
                "limits": {"min_free_disk_mb": 1},
                "inference": {"backend": "threshold"},
                "status": {
                    "enabled": True,
                    "port": status_port,
                    "auth": "basic",
                    "credentials_env": CREDENTIALS_ENV,
                },
                "models": [{"name": "spleen", "bundle": str(SPLEEN_BUNDLE)}],
                "destinations": [
                    {"name": "pacs", "ae_title": pacs.aet, "port": pacs.dicom_port, **local}
                ],
                "sources": [
                    {"name": "pacs", "ae_title": pacs.aet, "port": pacs.dicom_port, **local},
                    {
                        "name": "pacs-get",
                        "ae_title": pacs.aet,
                        "port": pacs.dicom_port,
                        "retrieve": "get",
                        **local,
                    },
                    {
                        "name": "archive",
                        "ae_title": archive.aet,
                        "port": archive.port,
                        "retrieve": "get",
                        "top_up": True,
                        **local,
                    },
                    {
                        "name": "archive-move",
                        "ae_title": archive.aet,
                        "port": archive.port,
                        **local,
                    },
                    {
                        "name": "gone",
                        "ae_title": "GONE",
                        "port": free_port(),
                        "top_up": True,
                        **local,
                    },
                ],
            }
        )
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(BACKENDS, "threshold", threshold.create_backends)
        mp.setenv(CREDENTIALS_ENV, CREDENTIALS)
        node = Node(load_settings(config))
        node.start()
        try:
            yield Setup(node, config, pacs, archive, f"http://127.0.0.1:{status_port}", work)
        finally:
            node.stop()
            pacs.stop()
            archive.stop()


def _cli(setup: Setup, *args: str) -> subprocess.CompletedProcess:
    """``dicom-node`` (with the test backend registered) on the node's configuration."""
    return subprocess.run(
        [sys.executable, "-m", "dicom_node_testing.cli", *args, "--config", str(setup.config)],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=ROOT,
        env=dict(os.environ),
        check=False,
    )


def _http(setup: Setup, path: str, body: dict | None = None, auth: bool = True) -> tuple[int, dict]:
    request = urllib.request.Request(
        setup.status_url + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    if auth:
        token = base64.b64encode(CREDENTIALS.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw.startswith(b"{") else {}


def _page(setup: Setup, path: str) -> str:
    token = base64.b64encode(CREDENTIALS.encode()).decode()
    request = urllib.request.Request(
        setup.status_url + path, headers={"Authorization": f"Basic {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def _fetch_by_status(setup: Setup, body: dict) -> dict:
    """Ask for a fetch through the status service; the fetch as it ended."""
    status, answer = _http(setup, "/fetch", body)
    assert status == 202, answer
    return wait_for(
        lambda: (got := _http(setup, answer["url"])[1])["state"] in ("done", "failed") and got,
        30,
        "the fetch ended",
    )


def _outbox_sent(setup: Setup, series_uid: str) -> list:
    return wait_for(
        lambda: (
            (items := setup.node.jobs.outbox.items(series_uid))
            and all(i.state == OutboxState.SENT for i in items)
            and items
        ),
        30,
        "the results acknowledged",
    )


def test_a_study_in_the_pacs_is_fetched_segmented_and_sent_back(setup, caplog):
    """``dicom-node fetch --study UID --from pacs``: C-FIND, C-MOVE to the node, the series
    processed, its SEG, RTSTRUCT and SR in the PACS beside the CT."""
    attrs, files = _series(setup.work, "study", seed=1)
    assert push_paths(files, setup.pacs.aet, "127.0.0.1", setup.pacs.dicom_port).sent == 12
    caplog.set_level(logging.INFO, logger="dicom_node")
    run = _cli(setup, "fetch", "--study", attrs.study_instance_uid, "--from", "pacs")
    assert run.returncode == 0, run.stderr
    uid = attrs.series_instance_uid
    assert f"series {uid}: 12 of 12 instances retrieved" in run.stdout
    assert f"series {uid}: done (RTSTRUCT, SEG, SR)" in run.stdout
    record = setup.node.jobs.series.get(uid)
    assert (record.fetched_from, record.calling_ae, record.attempts) == ("pacs", "ORTHANC", 1)
    assert record.completed_by in ("association released", "fetched")
    _outbox_sent(setup, uid)
    study = next(
        s
        for s in setup.pacs.rest("/studies?expand")
        if s["MainDicomTags"]["StudyInstanceUID"] == attrs.study_instance_uid
    )
    modalities = sorted(
        setup.pacs.rest(f"/series/{s}")["MainDicomTags"]["Modality"] for s in study["Series"]
    )
    assert modalities == ["CT", "RTSTRUCT", "SEG", "SR"]
    seg = pydicom.dcmread(record.results.models[0].files["SEG"].path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert any("fetch" in r.message and "done" in r.message for r in caplog.records)


def test_a_series_fetched_by_c_get_through_the_status_service(setup):
    """``POST /fetch`` asks for one series, by C-GET from Orthanc: its instances come back
    on the node's own association and are stored and processed as pushed ones."""
    attrs, files = _series(setup.work, "by-get", seed=2)
    assert push_paths(files, setup.pacs.aet, "127.0.0.1", setup.pacs.dicom_port).sent == 12
    body = {
        "study": attrs.study_instance_uid,
        "series": attrs.series_instance_uid,
        "source": "pacs-get",
    }
    assert _http(setup, "/fetch", body, auth=False)[0] == 401  # behind the credentials
    assert _http(setup, "/fetch", {"study": "1.2.3", "source": "nowhere"})[0] == 400
    fetched = _fetch_by_status(setup, body)
    assert fetched["state"] == "done", fetched
    (series,) = fetched["series"]
    assert (series["series_uid"], series["expected"], series["new"]) == (
        attrs.series_instance_uid,
        12,
        12,
    )
    assert fetched["requested_by"].startswith("status service")
    uid = attrs.series_instance_uid
    wait_for(
        lambda: setup.node.jobs.series.get(uid).state == SeriesState.DONE, 30, "the series done"
    )
    record = setup.node.jobs.series.get(uid)
    assert (record.fetched_from, record.calling_ae, record.instance_count) == (
        "pacs-get",
        "ORTHANC",  # the peer's AE title, though the node opened the association
        12,
    )
    assert len(_outbox_sent(setup, uid)) == 3


def test_a_series_missing_a_third_is_topped_up_and_processed_once_whole(setup):
    """Pushed without every third slice: the release finds a gap, the settle timer
    completes it, and before it is processed the archive (``top_up``) sends the 4 missing
    instances by C-GET. One job, on 12 slices."""
    attrs, files = _series(setup.work, "partial", seed=3)
    setup.archive.store(files)
    sent = [f for n, f in enumerate(files) if n % 3 != 1]
    assert storescu(setup.node.scp.port, sent).returncode == 0
    uid = attrs.series_instance_uid
    wait_for(
        lambda: (r := setup.node.jobs.series.get(uid)) is not None and r.state.finished,
        30,
        "the series processed",
    )
    record = setup.node.jobs.series.get(uid)
    assert record.state == SeriesState.DONE, record.reason
    assert record.topped_up == "4 of 12 instances from source 'archive'"
    assert (record.instance_count, record.attempts, record.completed_by) == (
        12,
        1,
        "settle timer",
    )
    items = _outbox_sent(setup, uid)
    assert sorted(i.kind for i in items) == ["RTSTRUCT", "SEG", "SR"]  # processed once
    seg = pydicom.dcmread(record.results.models[0].files["SEG"].path)
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    expected = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert {str(r.ReferencedSOPInstanceUID) for r in referenced} == expected
    page = _page(setup, f"/jobs/{uid}")  # the job page says so
    assert "4 of 12 instances from source &#39;archive&#39;" in page


def test_a_top_up_that_cannot_ask_a_source_fails_the_job_with_its_sentence(setup):
    """The archive does not hold this series and the other top-up source cannot be reached:
    nothing says the series is whole, so it is not processed as it is."""
    attrs, files = _series(setup.work, "unknown-elsewhere", seed=5)
    assert storescu(setup.node.scp.port, files[:4] + files[6:]).returncode == 0
    uid = attrs.series_instance_uid
    wait_for(
        lambda: (r := setup.node.jobs.series.get(uid)) is not None and r.state.finished,
        30,
        "the job ended",
    )
    record = setup.node.jobs.series.get(uid)
    gone = setup.node.settings.sources[-1]
    assert (record.state, record.reason) == (
        SeriesState.FAILED,
        f"not topped up: source 'gone' (GONE at 127.0.0.1:{gone.port}) cannot be reached: "
        f"nothing listens on port {gone.port}",
    )
    assert setup.node.jobs.outbox.items(uid) == []


def test_errors_a_user_can_act_on_are_one_sentence_each(setup, caplog):
    """A study not at the source, a source that does not know the node as a move
    destination, a source that cannot be reached: in the command's output, the fetch and
    the log."""
    caplog.set_level(logging.INFO, logger="dicom_node")
    pacs, archive = setup.pacs, setup.archive
    run = _cli(setup, "fetch", "--study", "1.2.3.4", "--from", "pacs")
    not_found = f"study 1.2.3.4 is not at source 'pacs' (ORTHANC at 127.0.0.1:{pacs.dicom_port})"
    assert (run.returncode, run.stderr) == (2, f"dicom-node: {not_found}\n")
    attrs, files = _series(setup.work, "unmovable", seed=4)
    archive.store(files)
    unknown = _fetch_by_status(setup, {"study": attrs.study_instance_uid, "source": "archive-move"})
    assert unknown["state"] == FetchState.FAILED
    assert unknown["reason"] == (
        f"source 'archive-move' (DCMQRSCP at 127.0.0.1:{archive.port}) answered 0xA801 (Move "
        f"Destination Unknown): add '{NODE_AE}' with this node's host and port to its DICOM "
        "modalities (the PACS must know where to send the instances)"
    )
    gone = _fetch_by_status(setup, {"study": attrs.study_instance_uid, "source": "gone"})
    assert gone["reason"].endswith(
        f"cannot be reached: nothing listens on port {setup.node.settings.sources[-1].port}"
    )
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for reason in (not_found, unknown["reason"], gone["reason"]):
        assert reason in logged
