"""Storage commitment through the node: asked after acknowledgement, reported by a real PACS,
recorded, failures sent again, and a restart between request and report.

Orthanc 1.10 is the destination and Storage Commitment SCP. A Lua filter makes it lose the
first copy of each RTSTRUCT whose Series Description says so (Orthanc acknowledges the
C-STORE and keeps nothing): its commitment report then names that instance with Failure
Reason 0x0112, and the node sends it again and has it committed. DCMTK's ``storescp``,
which has no storage commitment, is a destination whose commitment is refused. A node in a
process of its own is killed after it asked and before the report could reach it (Orthanc
reports to an address where nothing listens), then started again: it asks once more, is
answered, and sends nothing twice.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicom_node.config import load_settings
from dicom_node.inference import BACKENDS
from dicom_node.node import Node
from dicom_node.state import CommitmentState, JobDatabase, OutboxState
from dicom_node_testing import threshold
from dicom_node_testing.phantom import make_phantom
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.conftest import require
from tests.peers import (
    ROOT,
    SPLEEN_BUNDLE,
    NodeProcess,
    Orthanc,
    StoreSCP,
    _toml,
    free_port,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.cost(16)

#: RTSTRUCTs with this Series Description lose their first copy in the PACS.
LOST_ONCE = "AI contours (lost once)"
RESTARTED_AE = "NODE_RESTARTED"


@dataclass
class Pacs:
    orthanc: Orthanc
    #: Where the node that is killed listens once started again.
    restarted_port: int


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> Iterator[Pacs]:
    require("Orthanc")
    work = tmp_path_factory.mktemp("pacs")
    # Orthanc answers 0x0000 to a C-STORE its filter refuses, and keeps nothing; every
    # delivery is logged (Orthanc.deliveries reads the lines)
    script = work / "pacs.lua"
    script.write_text(
        "lost = {}\n"
        "function ReceivedInstanceFilter(dicom, origin, info)\n"
        "  print('DELIVERED ' .. dicom.SOPInstanceUID)\n"
        f"  if dicom.SeriesDescription == '{LOST_ONCE}' and lost[dicom.SOPInstanceUID] == nil then\n"
        "    lost[dicom.SOPInstanceUID] = true\n"
        "    return false\n"
        "  end\n"
        "  return true\n"
        "end\n"
    )
    restarted_port = free_port()
    orthanc = Orthanc(
        work / "orthanc",
        # the restarted node's entry points where nothing listens, until the test fixes it
        modalities={"restarted": [RESTARTED_AE, "127.0.0.1", free_port()]},
        config={"LuaScripts": [str(script)]},
    ).start()
    yield Pacs(orthanc, restarted_port)
    orthanc.stop()


def _push_phantom(port: int, folder: Path, aet: str = "DICOM_NODE") -> str:
    phantom = make_phantom(shape=(12, 40, 40), spacing=(5.0, 8.0, 8.0), seed=7)
    attrs = SeriesAttributes()
    write_ct_series(phantom.hu, folder, spacing=phantom.spacing, attrs=attrs)
    assert storescu(port, folder, aet).returncode == 0
    return attrs.series_instance_uid


def test_a_failure_is_recorded_sent_again_and_committed_and_a_refusal_recorded(
    pacs, tmp_path, monkeypatch, caplog
):
    require("storescp")
    orthanc = pacs.orthanc
    port = free_port()
    orthanc.rest(
        "/modalities/node", {"AET": "DICOM_NODE", "Host": "127.0.0.1", "Port": port}, "PUT"
    )
    store_only = StoreSCP(tmp_path / "store-only", aet="STORE_ONLY").start()
    local = {"host": "127.0.0.1", "storage_commitment": True}
    config = tmp_path / "node.toml"
    config.write_text(
        _toml(
            {
                "node": {"data_dir": str(tmp_path / "var"), "host": "127.0.0.1", "port": port},
                "limits": {"min_free_disk_mb": 1},
                "inference": {"backend": "threshold"},
                "results": {"rtstruct_series_description": LOST_ONCE},
                "status": {"enabled": True, "port": 0},
                "models": [{"name": "spleen", "bundle": str(SPLEEN_BUNDLE)}],
                "destinations": [
                    {
                        "name": "pacs",
                        "ae_title": orthanc.aet,
                        "port": orthanc.dicom_port,
                        "commitment_resend_seconds": 0.5,
                        **local,
                    },
                    {
                        "name": "archive",
                        "ae_title": store_only.aet,
                        "port": store_only.port,
                        "retry_backoff_seconds": 0.1,
                        "commitment_requests": 2,
                        **local,
                    },
                ],
            }
        )
    )
    monkeypatch.setitem(BACKENDS, "threshold", threshold.create_backends)
    caplog.set_level(logging.INFO, logger="dicom_node")
    node = Node(load_settings(config))
    node.start()
    try:
        uid = _push_phantom(port, tmp_path / "ct")

        def settled() -> bool:
            items = node.jobs.outbox.items(uid)
            pacs_items = [i for i in items if i.destination == "pacs"]
            archive_items = [i for i in items if i.destination == "archive"]
            return (
                len(items) == 6
                and all(i.commitment == CommitmentState.COMMITTED for i in pacs_items)
                and all(i.state == OutboxState.FAILED for i in archive_items)
            )

        wait_for(settled, 40, "pacs committed, archive refused")
        assert node.status is not None
        with urllib.request.urlopen(f"{node.status.url}/jobs/{uid}", timeout=10) as response:
            page = response.read().decode()
        items = {(i.destination, i.kind): i for i in node.jobs.outbox.items(uid)}
        requests = node.jobs.commitments.requests()
    finally:
        node.stop()
        store_only.stop()
    rtstruct = items[("pacs", "RTSTRUCT")]
    delivered = orthanc.deliveries()
    assert delivered[rtstruct.sop_uid] == 2  # lost once, sent again once
    assert [delivered[items[("pacs", k)].sop_uid] for k in ("SEG", "SR")] == [1, 1]
    # the RTSTRUCT was asked twice: reported not held, then (sent again) committed; the
    # others once (acknowledgements arriving apart may be asked in separate requests)
    naming = {
        kind: [r for r in requests if items[("pacs", kind)].id in r.item_ids]
        for kind in ("SEG", "RTSTRUCT", "SR")
    }
    first, again = naming["RTSTRUCT"]
    assert first.outcome.endswith(", 1 not") and again.outcome == "1 committed"
    assert again.item_ids == (rtstruct.id,)
    assert [len(naming[k]) for k in ("SEG", "SR")] == [1, 1]
    refused = (
        f"archive (STORE_ONLY at 127.0.0.1:{store_only.port}) does not offer Storage "
        "Commitment Push Model: turn storage_commitment off for this destination, or enable "
        "it on the PACS"
    )
    reason = f"storage commitment not requested after 2 refusal(s): {refused}"
    for kind in ("SEG", "RTSTRUCT", "SR"):
        item = items[("archive", kind)]
        assert (item.last_error, item.commit_reason, item.attempts) == (reason, reason, 1)
    lost = f"{rtstruct.sop_uid} 0x0112 No such object instance (the PACS does not hold it)"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert lost in logged and refused in logged
    assert page.count('class="commitment commitment-committed"') == 3
    assert page.count('class="commitment commitment-failed"') == 3
    # the command line says it too, in the node's words
    listed = _cli(config, "jobs")
    assert f"    RTSTRUCT to archive: failed, failed: {reason}" in listed
    (shown,) = json.loads(_cli(config, "jobs", "--json"))
    assert {(o["destination"], o["commitment"]) for o in shown["outbox"]} == {
        ("pacs", "committed"),
        ("archive", "failed"),
    }


def test_a_node_killed_between_request_and_report_asks_once_more_and_sends_nothing_twice(
    pacs, tmp_path
):
    orthanc = pacs.orthanc
    node = NodeProcess(
        tmp_path,
        command="dicom_node_testing.cli",  # with the threshold backend
        node={"ae_title": RESTARTED_AE, "port": pacs.restarted_port},
        inference={"backend": "threshold"},
        models=[{"name": "spleen", "bundle": str(SPLEEN_BUNDLE)}],
        destinations=[
            {
                "name": "pacs",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "storage_commitment": True,
            }
        ],
    )
    node.port = pacs.restarted_port
    node.start()
    try:
        _push_phantom(node.port, tmp_path / "ct", RESTARTED_AE)

        def commitments() -> list[str]:
            return [o["commitment"] for j in node.jobs() for o in j["outbox"]]

        wait_for(lambda: commitments() == ["requested"] * 3, 40, "commitment requested")
        transaction = _transactions(node)[0]
        _wait_for_report_job(orthanc, transaction, "Failure")  # nothing listened for it
        killed_at = time.time()
        node.kill()
        before = orthanc.deliveries()
        # the PACS is told where the node listens now, and the node starts again
        orthanc.rest(
            "/modalities/restarted",
            {"AET": RESTARTED_AE, "Host": "127.0.0.1", "Port": node.port},
            "PUT",
        )
        node.start()
        wait_for(lambda: commitments() == ["committed"] * 3, 40, "committed after the restart")
    finally:
        node.stop()
    jobs = JobDatabase(node.data_dir / "jobs.sqlite")
    results = [i.sop_uid for i in jobs.outbox.items()]
    assert orthanc.deliveries() == before  # nothing sent again
    assert [before[uid] for uid in results] == [1, 1, 1]
    requests = jobs.commitments.requests()
    # asked before the kill (in one request, or several as the results were acknowledged),
    # none reported; then once more after it, for all three, and committed. An N-ACTION the
    # PACS could not take (a loaded machine) is recorded as not made and asked again.
    before_kill = [r for r in requests if r.requested_at < killed_at]
    after = [r for r in requests if r.requested_at >= killed_at]
    assert before_kill and all(r.reported_at is None for r in before_kill), requests
    asked = sorted(i for r in before_kill for i in r.item_ids)
    made = [r for r in after if not r.outcome.startswith("not made: ")]
    assert len(made) == 1 and len(after) - len(made) <= 1, requests
    assert (sorted(made[0].item_ids), made[0].outcome) == (asked, "3 committed")
    assert len(asked) == 3


def _transactions(node: NodeProcess) -> list[str]:
    jobs = JobDatabase(node.data_dir / "jobs.sqlite")
    try:
        return [r.transaction_uid for r in jobs.commitments.requests()]
    finally:
        jobs.close()


def _wait_for_report_job(pacs: Orthanc, transaction_uid: str, state: str) -> None:
    """Wait until Orthanc's job reporting ``transaction_uid`` is in ``state``."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for job in pacs.rest("/jobs?expand"):
            if job.get("Content", {}).get("TransactionUid") == transaction_uid:
                if job["State"] == state:
                    return
        time.sleep(0.2)
    raise TimeoutError(f"Orthanc's report of {transaction_uid} did not reach {state}")


def _cli(config: Path, *args: str) -> str:
    """``dicom-node`` (with the test backend registered) on ``config``; its output."""
    return subprocess.run(
        [sys.executable, "-m", "dicom_node_testing.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
