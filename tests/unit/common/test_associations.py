"""Every association the node requests is tuned on opening (:data:`TUNE_REQUESTED`): no
Nagle delay on its socket, and a DIMSE provider whose reactor leaves responses to the
request waiting for them.

Checked on real associations with a pynetdicom SCP, on the provider's queue directly, and in
the source: each ``associate`` call of the package names the handler.
"""

from __future__ import annotations

import ast
import socket
import types

import pytest
from pynetdicom import AE
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node.common.associations import TUNE_REQUESTED, RequestorDIMSE
from tests.peers import ROOT, free_port


@pytest.fixture
def verification_scp():
    ae = AE(ae_title="PEER")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    yield port
    server.shutdown()


@pytest.mark.parametrize("handlers", [[TUNE_REQUESTED], []])
def test_an_association_is_tuned_when_its_connection_opens(verification_scp, handlers):
    ae = AE(ae_title="NODE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", verification_scp, ae_title="PEER", evt_handlers=handlers)
    try:
        assert assoc.is_established
        sock = assoc.dul.socket.socket
        assert bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)) == bool(handlers)
        assert isinstance(assoc.dimse, RequestorDIMSE) == bool(handlers)
        for _ in range(50):  # one request after another, each answered
            assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def _response() -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 1
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = "1.2.3"
    rsp.Status = 0x0000
    return rsp


def _request() -> C_ECHO:
    req = C_ECHO()
    req.MessageID = 7
    req.AffectedSOPClassUID = Verification
    return req


def test_the_reactor_s_poll_leaves_a_response_for_the_request_waiting_for_it():
    dimse = RequestorDIMSE(types.SimpleNamespace(dimse_timeout=1.0))  # type: ignore[arg-type]
    response = _response()
    dimse.msg_queue.put((1, response))
    assert dimse.get_msg(block=False) == (None, None)  # the reactor's poll: not for it
    assert dimse.msg_queue.qsize() == 1
    assert dimse.get_msg(block=True) == (1, response)  # the send_c_store waiting for it


def test_the_reactor_still_serves_the_peer_s_requests_and_sees_the_end():
    dimse = RequestorDIMSE(types.SimpleNamespace(dimse_timeout=1.0))  # type: ignore[arg-type]
    request = _request()
    dimse.msg_queue.put((3, request))
    dimse.msg_queue.put((None, None))  # what pynetdicom queues when the connection ends
    assert dimse.get_msg(block=False) == (3, request)
    assert dimse.get_msg(block=False) == (None, None)
    assert dimse.msg_queue.empty()
    assert dimse.get_msg(block=False) == (None, None)  # nothing queued
    # pynetdicom's own provider hands the reactor whatever comes first
    plain = DIMSEServiceProvider(types.SimpleNamespace(dimse_timeout=1.0))  # type: ignore[arg-type]
    plain.msg_queue.put((1, _response()))
    assert plain.get_msg(block=False)[1] is not None


def test_every_association_the_node_requests_is_tuned():
    calls = []
    for path in sorted((ROOT / "dicom_node").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "associate"
            ):
                handlers = next((k.value for k in node.keywords if k.arg == "evt_handlers"), None)
                named = handlers is not None and "TUNE_REQUESTED" in ast.unparse(handlers)
                calls.append((path.relative_to(ROOT).as_posix(), node.lineno, named))
    assert len(calls) >= 4  # export, storage commitment, push, query/retrieve
    assert [c for c in calls if not c[2]] == []
