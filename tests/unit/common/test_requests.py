"""Every association the node requests sends without Nagle's delay (``TCP_NODELAY``).

A peer that delays its ACKs would otherwise hold the last segment of every C-STORE for up
to 40 ms. Checked on a real association with a pynetdicom SCP, and in the source: each
``associate`` call of the package names :data:`NO_DELAY` among its handlers.
"""

from __future__ import annotations

import ast
import socket

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.common.requests import NO_DELAY
from tests.peers import ROOT, free_port


@pytest.fixture
def verification_scp():
    ae = AE(ae_title="PEER")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    yield port
    server.shutdown()


@pytest.mark.parametrize("handlers", [[NO_DELAY], []])
def test_the_handler_turns_nagle_off_on_the_association_s_socket(verification_scp, handlers):
    ae = AE(ae_title="NODE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", verification_scp, ae_title="PEER", evt_handlers=handlers)
    try:
        assert assoc.is_established
        sock = assoc.dul.socket.socket
        assert bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)) == bool(handlers)
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_every_association_the_node_requests_names_no_delay():
    calls = []
    for path in sorted((ROOT / "dicom_node").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "associate"
            ):
                handlers = next((k.value for k in node.keywords if k.arg == "evt_handlers"), None)
                named = handlers is not None and "NO_DELAY" in ast.unparse(handlers)
                calls.append((path.relative_to(ROOT).as_posix(), node.lineno, named))
    assert len(calls) >= 4  # export, storage commitment, push, query/retrieve
    assert [c for c in calls if not c[2]] == []
