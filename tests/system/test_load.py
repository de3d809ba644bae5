"""Load on loopback, bounded in count and time: 8 series of 100 slices over 8 concurrent
associations while a ninth streams in slowly; every series completes, every result arrives
once, nothing is lost or duplicated."""

from __future__ import annotations

import subprocess
import threading
import time

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicom_node.common.associations import TUNE_REQUESTED
from dicom_node_testing.phantom import make_phantom
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.peers import NodeProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.cost(55)]

SERIES, SLICES = 8, 100


@pytest.fixture
def series(tmp_path):
    """Nine phantom series of 100 slices, each in a folder of its own."""
    folders, attrs = [], []
    for i in range(SERIES + 1):
        ph = make_phantom(shape=(SLICES, 80, 80), spacing=(2.5, 4.0, 4.0), seed=100 + i)
        a = SeriesAttributes(patient_id=f"LOAD-{i}")
        write_ct_series(ph.hu, tmp_path / f"s{i}", spacing=ph.spacing, attrs=a)
        folders.append(tmp_path / f"s{i}")
        attrs.append(a)
    return folders, attrs


@pytest.fixture
def node(tmp_path, orthanc):
    """The node with its managed Triton server, ready to infer."""
    n = NodeProcess(
        tmp_path / "node",
        node={"settle_seconds": 2.0},
        inference={
            "backend": "triton",
            "grpc_port": free_port(),
            "http_port": free_port(),
            "metrics_port": free_port(),
            "max_concurrent_jobs": 2,
        },
        destinations=[
            {
                "name": "pacs",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "retry_backoff_seconds": 0.5,
            }
        ],
    ).start()
    try:
        n.wait_for_log("inference backend ready", timeout=240)
        yield n
    finally:
        n.stop()


def test_nine_series_at_once(series, node, orthanc):
    folders, attrs = series
    streamed: list[str] = []

    def stream() -> None:  # the ninth series trickles in, one slice every 30 ms
        ae = AE(ae_title="SLOWSCANNER")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate(
            "127.0.0.1", node.port, ae_title="DICOM_NODE", evt_handlers=[TUNE_REQUESTED]
        )
        for path in sorted(folders[-1].iterdir()):
            status = assoc.send_c_store(pydicom.dcmread(path))
            if status and status.Status == 0:
                streamed.append(path.name)
            time.sleep(0.03)
        assoc.release()

    t0 = time.perf_counter()
    slow = threading.Thread(target=stream)
    slow.start()
    pushes = [
        subprocess.Popen(
            [
                "storescu",
                "-aet",
                f"SCANNER{i}",
                "-aec",
                "DICOM_NODE",
                "+sd",
                "+r",
                "127.0.0.1",
                str(node.port),
                str(f),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i, f in enumerate(folders[:-1])
    ]
    assert [p.wait(300) for p in pushes] == [0] * SERIES
    slow.join(300)
    received = time.perf_counter() - t0
    assert len(streamed) == SLICES

    uids = {a.series_instance_uid for a in attrs}
    jobs = node.wait_for(
        lambda js: (
            {
                j["series_uid"]
                for j in js
                if j["state"] == "done"
                and j["outbox"]
                and all(o["state"] == "sent" for o in j["outbox"])
            }
            >= uids
        ),
        timeout=900,
        what="all nine series through the chain",
        failures_allowed=False,
    )
    total = time.perf_counter() - t0
    by_uid = {j["series_uid"]: j for j in jobs}
    assert all(by_uid[u]["instance_count"] == SLICES for u in uids)
    assert len(list((node.data_dir / "spool").glob("*/*/*.dcm"))) == (SERIES + 1) * SLICES
    # every result is recorded sent (final): a duplicate would already be in the PACS
    found = orthanc.rest("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
    per_study: dict[str, int] = {}
    for inst in found:
        tags = orthanc.rest(f"/instances/{inst['ID']}/simplified-tags")
        per_study[tags["StudyInstanceUID"]] = per_study.get(tags["StudyInstanceUID"], 0) + 1
    assert per_study == {a.study_instance_uid: 3 for a in attrs}
    slowest = max((by_uid[u] for u in uids), key=lambda j: j["updated"] - j["last_received"])
    print(
        f"load: {(SERIES + 1) * SLICES} instances received in {received:.1f} s "
        f"({(SERIES + 1) * SLICES / received:.0f} instances/s); 9 series done and sent in "
        f"{total:.0f} s; slowest job {slowest['updated'] - slowest['last_received']:.0f} s "
        "after its last slice; instances lost = 0, results duplicated = 0"
    )
