"""What the commitment step decides (:func:`dicom_node.export.commitment.plan`), as a pure
function of the items' recorded states: ask, wait, ask again, send again, give up."""

from __future__ import annotations

from dataclasses import replace

from pydicom.uid import generate_uid

from dicom_node.export.commitment import CommitmentPolicy, plan
from dicom_node.state import CommitmentState
from dicom_node.state.commitments import Tracked

POLICY = CommitmentPolicy(report_timeout=60, max_requests=2, resend_wait=30, max_sends=3)


def policy(name: str) -> CommitmentPolicy | None:
    return None if name == "gone" else POLICY


def _item(state: CommitmentState, since: float = 0.0, **kw) -> Tracked:
    return Tracked(
        item_id=kw.pop("item_id", 1),
        destination=kw.pop("destination", "pacs"),
        sop_uid=kw.pop("sop_uid", generate_uid()),
        path="unused.dcm",
        state=state,
        since=since,
        **kw,
    )


def test_plan_asks_each_destination_once_for_what_it_owes():
    items = [
        _item(CommitmentState.OWED, item_id=1),
        _item(CommitmentState.OWED, item_id=2),
        _item(CommitmentState.OWED, item_id=3, destination="other"),
        _item(CommitmentState.COMMITTED, item_id=4),
        _item(CommitmentState.OWED, item_id=5, destination="gone"),  # no longer asks
    ]
    due = plan(items, policy, now=10.0)
    assert sorted(due.request) == ["other", "pacs"]
    assert [i.item_id for i in due.request["pacs"]] == [1, 2]
    assert len({i.transaction_uid for i in due.request["pacs"]}) == 1
    assert due.request["pacs"][0].transaction_uid != due.request["other"][0].transaction_uid
    assert all(
        i.state == CommitmentState.REQUESTED and i.since == 10.0 and i.requests == 1
        for i in due.request["pacs"]
    )


def test_plan_waits_for_the_report_then_asks_again_then_gives_up():
    asked = _item(CommitmentState.REQUESTED, since=100.0, requests=1, transaction_uid="1.2.3")
    assert plan([asked], policy, now=159.0).empty
    (again,) = plan([asked], policy, now=160.0).request["pacs"]
    assert (again.requests, again.state) == (2, CommitmentState.REQUESTED)
    assert again.transaction_uid != "1.2.3"
    (gave_up,) = plan([again], policy, now=220.0).give_up
    assert gave_up.state == CommitmentState.FAILED
    assert gave_up.reason.startswith("no storage commitment report from pacs after 2 request(s)")


def test_a_request_made_before_the_node_started_is_asked_again_at_once():
    """Its association, and any report on it, went with the node that made it."""
    asked = _item(CommitmentState.REQUESTED, since=100.0, requests=1, transaction_uid="1.2.3")
    assert plan([asked], policy, now=101.0, started_at=99.0).empty
    (again,) = plan([asked], policy, now=101.0, started_at=100.5).request["pacs"]
    assert (again.requests, again.transaction_uid != "1.2.3") == (2, True)


def test_plan_resends_failures_within_the_attempts():
    failed = _item(CommitmentState.FAILED, since=0.0, sends=2, reason="0x0213 Resource limitation")
    assert plan([failed], policy, now=29.0).empty
    assert plan([failed], policy, now=30.0).resend == [failed]
    (gave_up,) = plan([replace(failed, sends=3)], policy, now=30.0).give_up
    assert gave_up.reason == "not committed by pacs after 3 send(s): 0x0213 Resource limitation"


def test_a_request_refused_as_often_as_allowed_is_given_up():
    refused = _item(CommitmentState.OWED, requests=2, reason="pacs refused the request")
    (gave_up,) = plan([refused], policy, now=5.0).give_up
    assert gave_up.state == CommitmentState.FAILED
    assert gave_up.reason == (
        "storage commitment not requested after 2 refusal(s): pacs refused the request"
    )
