"""Bad input at the transport: bytes that are not DICOM, peers that stop talking, transfers cut
short. The node drops the connection, keeps serving and keeps nothing half-written."""

from __future__ import annotations

import io
import socket
import struct
import time
from collections.abc import Callable

import numpy as np
import pytest
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (
    CTImageStorage,
)

from tests.peers import NodeProcess
from tests.system.bad_input.crafting import (
    association,
    connect,
    ct_slice_ds,
    drain,
    encoded,
    log_lines,
    pdu_kind,
    spooled_uids,
)

pytestmark = [
    pytest.mark.cost(8),
    pytest.mark.filterwarnings(
        "ignore:Invalid value for VR UI",
        "ignore:The value length",
        "ignore:Expected explicit VR",
        "ignore:Invalid value for VR DS",
    ),
]


# -- the transport: bytes that are not DICOM, peers that stop talking ---------------------
def test_garbage_bytes_on_the_port(node, ledger, served):
    before = log_lines(node, "Unknown PDU type")
    with connect(node) as s:
        s.sendall(b"\xee" + np.random.default_rng(3).bytes(4095))
        answer = drain(s)
    time.sleep(0.2)  # let the node's log line land
    lines = log_lines(node, "Unknown PDU type") - before
    ledger.check(
        "garbage bytes on the port",
        "A-ABORT, 1 log line",
        f"{pdu_kind(answer)}, {lines} log line{'s' if lines != 1 else ''}",
    )


def test_http_request_on_the_port(node, ledger, served):
    with connect(node) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: node\r\n\r\n")
        answer = drain(s)
    ledger.check("an HTTP request on the DICOM port", "A-ABORT", pdu_kind(answer))


def test_malformed_associate_request(node, ledger, served):
    body = (
        b"\x00\x01\x00\x00"
        + b"DICOM_NODE".ljust(16)
        + b"BAD_INPUT".ljust(16)
        + bytes(32)
        + b"\x10\x00\x00\x40"
        + b"1.2.840.10008.3.1.1.1"
    )
    with connect(node) as s:
        s.sendall(b"\x01\x00" + struct.pack(">L", len(body)) + body)
        answer = drain(s)
    ledger.check("A-ASSOCIATE-RQ with an item longer than the PDU", "A-ABORT", pdu_kind(answer))


def test_pdu_declaring_4_gib_then_silence(node, ledger, served):
    with connect(node) as s:
        s.sendall(b"\x01\x00\xff\xff\xff\xf0" + bytes(64))
        answer = drain(s)  # the node's read times out after network_timeout
    ledger.check(
        "PDU header declaring 4 GiB, then silence",
        "dropped",
        "dropped" if pdu_kind(answer) in ("close", "A-ABORT") else answer[:16].hex(),
    )


def test_abandoned_connection(node, ledger, served):
    with connect(node) as s:
        answer = drain(s)  # connect, say nothing: dropped after acse_timeout
    ledger.check("connection that never asks for an association", "close", pdu_kind(answer))


def test_silent_association_is_aborted(node, ledger, served):
    with association(node.port) as assoc:
        deadline = time.monotonic() + 30
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.2)
        ledger.check(
            "association that goes quiet",
            "aborted by the node",
            "aborted by the node" if assoc.is_aborted else "still open",
        )


def _partial_store(node: NodeProcess, finish: Callable) -> tuple[str, int]:
    """Send the first fragments of a C-STORE of a 300x300 image, then ``finish(assoc)``; the
    instance's UID and the local port the association came from."""
    ds = ct_slice_ds(rows=300, cols=300)
    with association(node.port) as assoc:
        port = assoc.dul.socket.socket.getsockname()[1]
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = CTImageStorage
        req.AffectedSOPInstanceUID = ds.SOPInstanceUID
        req.Priority = 2
        req.DataSet = io.BytesIO(encoded(ds))
        msg = C_STORE_RQ()
        msg.primitive_to_message(req)
        context_id = assoc.accepted_contexts[-1].context_id
        for k, pdata in enumerate(msg.encode_msg(context_id, 16384)):
            if k == 4:
                break
            assoc.dul.send_pdu(pdata)
        time.sleep(0.3)
        finish(assoc)
    return str(ds.SOPInstanceUID), port


def _tcp_drop(assoc) -> None:
    assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
    assoc.kill()


@pytest.mark.parametrize(
    ("case", "finish"),
    [
        ("A-ABORT mid-transfer", lambda assoc: assoc.abort()),
        ("TCP connection dropped mid-transfer", _tcp_drop),
    ],
)
def test_interrupted_transfer_leaves_nothing(node, ledger, served, case, finish):
    uid, port = _partial_store(node, finish)
    # the node has seen the association end (then anything it began is gone or kept)
    ended = f"association aborted: BAD_INPUT from 127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while ended not in node.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"the node never logged {ended!r}"
        time.sleep(0.05)
    incoming = list((node.data_dir / "spool" / ".incoming").iterdir())
    stored = uid in spooled_uids(node)
    ledger.check(
        case,
        "nothing stored, .incoming empty",
        f"{'stored' if stored else 'nothing stored'}, "
        f".incoming {'empty' if not incoming else incoming}",
    )
