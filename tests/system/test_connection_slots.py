"""No host can take the node's association slots from the others.

Hostile peers on loopback addresses of their own (127.0.0.x all reach ``lo`` on Linux)
open bare connections that send nothing, connections that trickle an A-ASSOCIATE-RQ a
byte at a time, or idle associations, while another address pushes a CT slice: that
C-STORE must go through at once, its association, DIMSE and network timeouts at 2 s (so
"at once" is the protocol's bound, not a timer here). An association that only C-ECHOes
is aborted after ``idle_timeout_seconds``; one that stores is not.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack

import numpy as np
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node_testing.synthetic import SeriesAttributes, ct_slice
from tests.peers import NodeProcess, associate

pytestmark = pytest.mark.cost(12)

#: The node's own settings are the defaults (16 slots, 12 connections per address, 4 slots
#: kept for other addresses, 64 connections pending); only the idle timeout differs.
NODE = {"settle_seconds": 3600, "complete_on_release": False}


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[NodeProcess]:
    n = NodeProcess(
        tmp_path_factory.mktemp("slots") / "node",
        node=NODE,
        limits={"idle_timeout_seconds": 60.0, "acse_timeout": 30.0},
    ).start()
    yield n
    # Killed, not stopped: the refused connections' threads wait out acse_timeout (they hold
    # no slot, which is the point), and a stop aborts each in turn, 0.1 s apiece.
    n.kill()
    n.stop()  # closes its log


def _ae(timeout: float = 2.0) -> AE:
    ae = AE(ae_title="PUSHER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae


def _slice(k: int = 1):
    ds = ct_slice(
        np.zeros((16, 16), np.int16), (0, 0, k), (1, 0, 0, 0, 1, 0), (1, 1), 1.0, k,
        SeriesAttributes(),
    )  # fmt: skip
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    return ds


def _store_from(source: str, port: int) -> int | None:
    """A C-STORE from ``source`` with every timeout at 2 s: its status, or None."""
    assoc, rejection = associate(_ae(), port, ae_title="DICOM_NODE", bind_address=(source, 0))
    assert assoc.is_established, f"{source} was refused: {rejection}"
    try:
        rsp = assoc.send_c_store(_slice())
        return int(rsp.Status) if rsp else None
    finally:
        assoc.release()


def _bare(source: str, port: int) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def _wait_hung_up(socks: list[socket.socket], count: int) -> None:
    """Until the node has closed ``count`` of ``socks`` (those it refused, after their
    A-ASSOCIATE-RJ): from then on their threads are pynetdicom's to end."""
    closed: set[int] = set()
    deadline = time.monotonic() + 30
    while len(closed) < count:
        assert time.monotonic() < deadline, f"{len(closed)} of {count} refused closed"
        readable, _, _ = select.select([s for s in socks if s.fileno() not in closed], [], [], 0.1)
        for s in readable:
            try:
                if s.recv(65536) == b"":
                    closed.add(s.fileno())
            except OSError:
                closed.add(s.fileno())


def _wait_refused(node: NodeProcess, sources: list[str]) -> None:
    """Until the node has refused a connection from each of ``sources`` for holding
    max_associations_per_address (12) already: it accepts in order, so the 12 before are
    the node's own open connections by then, not connections waiting in the kernel."""
    for source in sources:
        node.wait_for_log(f"{source} already holds 12 connection(s)", 30)


@pytest.mark.parametrize(
    ("sources", "count"),
    [(["127.0.0.2"], 17), (["127.0.0.5", "127.0.0.6"], 100)],
    ids=["17 from one address", "100 from two addresses"],
)
def test_bare_connections_hold_no_slot(node, sources, count):
    with ExitStack() as stack:
        socks = [
            stack.enter_context(_bare(sources[k % len(sources)], node.port)) for k in range(count)
        ]
        _wait_refused(node, sources)
        _wait_hung_up(socks, count - 12 * len(sources))
        assert _store_from("127.0.0.3", node.port) == 0
        assoc, rejection = associate(
            _ae(), node.port, ae_title="DICOM_NODE", bind_address=("127.0.0.4", 0)
        )
        assert assoc.is_established, rejection
        assert assoc.send_c_echo().Status == 0
        assoc.release()


def _associate_rq_bytes() -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) for Verification, as a requestor's first bytes."""
    app = b"1.2.840.10008.3.1.1.1"
    app_item = struct.pack(">BBH", 0x10, 0, len(app)) + app
    abstract = struct.pack(">BBH", 0x30, 0, len(Verification)) + Verification.encode()
    syntax = b"1.2.840.10008.1.2"
    transfer = struct.pack(">BBH", 0x40, 0, len(syntax)) + syntax
    context_body = struct.pack(">BBBB", 1, 0, 0, 0) + abstract + transfer
    context = struct.pack(">BBH", 0x20, 0, len(context_body)) + context_body
    max_len = struct.pack(">BBHL", 0x51, 0, 4, 16384)
    user = struct.pack(">BBH", 0x50, 0, len(max_len)) + max_len
    body = (
        struct.pack(">HH", 1, 0)
        + b"DICOM_NODE".ljust(16)
        + b"SLOW".ljust(16)
        + bytes(32)
        + app_item
        + context
        + user
    )
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def test_slow_connections_hold_no_slot(node):
    """100 connections from two addresses trickle an A-ASSOCIATE-RQ, a byte each per 0.2 s."""
    request = _associate_rq_bytes()
    stop = threading.Event()
    with ExitStack() as stack:
        socks = [
            stack.enter_context(_bare(("127.0.0.8", "127.0.0.9")[k % 2], node.port))
            for k in range(100)
        ]

        def trickle() -> None:
            sent = 0
            while not stop.is_set() and sent < len(request) - 1:
                for s in socks:
                    try:
                        s.send(request[sent : sent + 1])
                    except OSError:
                        pass
                sent += 1
                stop.wait(0.2)

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            _wait_refused(node, ["127.0.0.8", "127.0.0.9"])
            _wait_hung_up(socks, 100 - 24)
            assert _store_from("127.0.0.10", node.port) == 0
        finally:
            stop.set()
            thread.join(5)


def test_idle_associations_from_two_addresses_leave_slots(node):
    """16 associations asked for from two addresses: the second address gets only what
    leaves reserved_associations free, and a third address stores."""
    held = []
    refusals = []
    try:
        for source in ["127.0.0.11"] * 8 + ["127.0.0.12"] * 8:
            assoc, rejection = associate(
                _ae(10), node.port, ae_title="DICOM_NODE", bind_address=(source, 0)
            )
            if assoc.is_established:
                held.append(assoc)
            else:
                refusals.append(rejection)
        assert len(held) == 12, (len(held), refusals)
        assert refusals == [(2, 3, 2)] * 4  # transient, local limit exceeded
        assert _store_from("127.0.0.13", node.port) == 0
        assert all(a.is_established for a in held)
    finally:
        for a in held:
            a.release()


@pytest.fixture(scope="module")
def idle_node(tmp_path_factory) -> Iterator[NodeProcess]:
    n = NodeProcess(
        tmp_path_factory.mktemp("slots-idle") / "node",
        node=NODE,
        # two associations leave two slots free, no more than the reserved ones: idle
        # associations are reaped from then on
        limits={"idle_timeout_seconds": 2.0, "max_associations": 4, "reserved_associations": 2},
    ).start()
    yield n
    n.kill()
    n.stop()  # closes its log


def test_an_association_that_only_echoes_is_aborted_one_that_stores_is_not(idle_node):
    echoing, _ = associate(_ae(10), idle_node.port, ae_title="DICOM_NODE")
    storing, _ = associate(_ae(10), idle_node.port, ae_title="DICOM_NODE")
    assert echoing.is_established and storing.is_established
    started = time.monotonic()
    k = 0
    try:
        while echoing.is_established and time.monotonic() - started < 30:
            try:
                echoing.send_c_echo()
            except RuntimeError:  # aborted between the check and the request
                break
            k += 1
            rsp = storing.send_c_store(_slice(k))
            assert rsp and rsp.Status == 0, "the storing association was cut"
            time.sleep(0.5)
        assert not echoing.is_established  # aborted by the node
        assert echoing.is_aborted
        assert time.monotonic() - started >= 2.0  # not before idle_timeout_seconds
        assert storing.is_established
        assert storing.send_c_echo().Status == 0
    finally:
        storing.release()
        if echoing.is_established:
            echoing.release()
    log = idle_node.log.read_text(errors="replace")
    assert "stored nothing for 2 s (limits.idle_timeout_seconds)" in log
