"""Integrity under pressure: peers that trickle, idle, flood from one address or send an
instance far over the size limit, against one node process with small limits.

Loopback addresses 127.0.0.2 and up stand for other hosts (Linux routes all of 127/8 to
lo); the node's own clients connect from 127.0.0.1. Every wait polls with a deadline, and
the last test checks that every instance the node acknowledged is recorded.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node_testing.synthetic import SeriesAttributes, ct_slice
from tests.peers import SPLEEN_BUNDLE, NodeProcess, associate, small_tmpfs, storescu

pytestmark = pytest.mark.cost(20)

LIMITS = {
    "max_associations": 16,
    "max_associations_per_address": 4,
    "acse_timeout": 2.0,
    "network_timeout": 3.0,
    "association_deadline_seconds": 2.0,
    "message_deadline_seconds": 3.0,
    "max_instance_bytes": 8 * 1024 * 1024,
}
ACKED: set[str] = set()  # every SOP Instance UID the node acknowledged in this module


@pytest.fixture(scope="module")
def node(tmp_path_factory, dcmtk_tools) -> Iterator[NodeProcess]:
    work = tmp_path_factory.mktemp("pressure")
    n = NodeProcess(
        work / "node",
        node={"settle_seconds": 3600, "complete_on_release": False},
        limits=LIMITS,
        inference={"backend": "local", "bundle": str(SPLEEN_BUNDLE)},
    ).start()
    yield n
    n.stop()


# -- peers --------------------------------------------------------------------------------
def _ae() -> AE:
    ae = AE(ae_title="PRESSURE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae


def _associate(node: NodeProcess, source: str = "127.0.0.1"):
    return _ae().associate("127.0.0.1", node.port, ae_title="DICOM_NODE", bind_address=(source, 0))


def _echo_seconds(node: NodeProcess, source: str = "127.0.0.1") -> float | None:
    """Seconds a C-ECHO from ``source`` took, association included; None if refused."""
    started = time.monotonic()
    assoc = _associate(node, source)
    if not assoc.is_established:
        return None
    ok = assoc.send_c_echo().Status == 0
    assoc.release()
    return time.monotonic() - started if ok else None


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def _associate_rq() -> bytes:
    """A valid A-ASSOCIATE-RQ (PS3.8 9.3.2) for CT Image Storage."""
    pc = (
        bytes([1, 0, 0, 0])
        + _item(0x30, CTImageStorage.encode())
        + _item(0x40, ExplicitVRLittleEndian.encode())
    )
    body = (
        struct.pack(">HH", 1, 0)
        + b"DICOM_NODE".ljust(16)
        + b"TRICKLE".ljust(16)
        + bytes(32)
        + _item(0x10, b"1.2.840.10008.3.1.1.1")
        + _item(0x20, pc)
        + _item(0x50, _item(0x51, struct.pack(">L", 16384)))
    )
    return struct.pack(">BBL", 1, 0, len(body)) + body


class Trickle:
    """Connections from one address sending an A-ASSOCIATE-RQ one byte every 0.25 s."""

    def __init__(self, node: NodeProcess, source: str, count: int) -> None:
        self.rq = _associate_rq()
        self.socks = []
        self.opened: list[float] = []
        self.ended: dict[int, tuple[float, bytes]] = {}  # index: (seconds, first bytes)
        for _ in range(count):
            s = socket.socket()
            s.bind((source, 0))
            s.connect(("127.0.0.1", node.port))
            s.setblocking(False)
            self.socks.append(s)
            self.opened.append(time.monotonic())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sent = 0
        while not self._stop.is_set() and sent < len(self.rq):
            for k, s in enumerate(self.socks):
                if k in self.ended:
                    continue
                try:
                    got = s.recv(64)
                    self.ended[k] = (time.monotonic() - self.opened[k], got)
                    continue
                except BlockingIOError:
                    pass
                except OSError:
                    self.ended[k] = (time.monotonic() - self.opened[k], b"")
                    continue
                try:
                    s.send(self.rq[sent : sent + 1])
                except OSError:
                    self.ended[k] = (time.monotonic() - self.opened[k], b"")
            sent += 1
            self._stop.wait(0.25)

    def rejected(self) -> int:
        return sum(1 for _, got in self.ended.values() if got[:1] == b"\x03")

    def closed(self) -> list[float]:
        return [t for t, got in self.ended.values() if got[:1] != b"\x03"]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self.socks:
            s.close()


def _small_slice(size: int = 16) -> pydicom.Dataset:
    """A ``size`` x ``size`` CT slice of a series of its own."""
    return ct_slice(
        np.zeros((size, size), np.int16),
        (0.0, 0.0, 0.0),
        (1, 0, 0, 0, 1, 0),
        (0.7, 0.7),
        2.0,
        1,
        SeriesAttributes(),
    )


def _until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _open_deleted_files(pid: int) -> list[str]:
    """The removed files a process still holds open (their space is not free yet)."""
    held = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            if (target := os.readlink(fd)).endswith(" (deleted)"):
                held.append(target)
    return held


def _series(out: Path, n: int = 3) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    attrs = SeriesAttributes()
    paths = []
    for k in range(n):
        ds = ct_slice(
            np.zeros((16, 16), np.int16),
            (0.0, 0.0, 2.0 * k),
            (1, 0, 0, 0, 1, 0),
            (0.7, 0.7),
            2.0,
            k + 1,
            attrs,
        )
        paths.append(out / f"{k}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _store_with_storescu(node: NodeProcess, paths: list[Path]) -> None:
    r = storescu(node.port, paths)
    assert r.returncode == 0, r.stderr
    ACKED.update(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths)


# -- slow and idle peers ------------------------------------------------------------------
def test_trickle_from_one_address_does_not_block_another(node, tmp_path):
    flood = Trickle(node, "127.0.0.2", 20)
    try:
        # 4 of 20 are admitted and trickle; 16 are rejected at once, unread
        assert _until(lambda: flood.rejected() == 16, 5), sorted(flood.ended.items())
        assert not flood.closed()
        started = time.monotonic()
        seconds = _echo_seconds(node)
        _store_with_storescu(node, _series(tmp_path / "s"))
        served_in = time.monotonic() - started
        assert seconds is not None and served_in < 3, (seconds, served_in)
        # the 4 admitted are closed at association_deadline_seconds, though bytes trickle
        assert _until(lambda: len(flood.closed()) == 4, 6), flood.ended
        assert max(flood.closed()) < LIMITS["association_deadline_seconds"] + 2
    finally:
        flood.stop()
    print(
        f"\nflood of 20 trickling connections from 127.0.0.2: C-ECHO from 127.0.0.1 in "
        f"{seconds:.2f} s, a series stored in {served_in:.2f} s; the 4 admitted closed "
        f"after {max(flood.closed()):.1f} s"
    )


def test_trickle_from_many_addresses_frees_slots_at_the_deadline(node):
    # 5 addresses x 4 admitted = 20 connections: every one of the 16 slots is taken
    floods = [Trickle(node, f"127.0.0.{k}", 4) for k in range(10, 15)]
    try:
        started = time.monotonic()
        assert _until(lambda: _echo_seconds(node) is not None, 10)
        waited = time.monotonic() - started
        assert waited < LIMITS["association_deadline_seconds"] + 3, waited
        assert all(len(f.closed()) == 4 for f in floods) or _until(
            lambda: all(len(f.closed()) == 4 for f in floods), 3
        )
    finally:
        for f in floods:
            f.stop()
    print(f"\n20 trickling connections from 5 addresses: served again after {waited:.1f} s")


def test_idle_associations_are_released_and_the_address_limit_holds(node):
    # the slots an earlier test's floods held are free again once the node serves
    assert _until(lambda: _echo_seconds(node, "127.0.0.3") is not None, 10)
    held = [_associate(node, "127.0.0.3") for _ in range(4)]
    try:
        assert all(a.is_established for a in held)
        fifth, rejection = associate(
            _ae(), node.port, ae_title="DICOM_NODE", bind_address=("127.0.0.3", 0)
        )
        assert rejection == (2, 3, 2) and not fifth.is_established
        assert _echo_seconds(node, "127.0.0.4") is not None  # another address is served
        started = time.monotonic()
        assert _until(lambda: not any(a.is_established for a in held), 8)
        released_after = time.monotonic() - started
        assert all(a.is_aborted for a in held)
        assert released_after < LIMITS["network_timeout"] + 2
        assert _until(lambda: _echo_seconds(node, "127.0.0.3") is not None, 3)
    finally:
        for a in held:
            if a.is_established:
                a.release()
    assert "limits.max_associations_per_address" in node.log.read_text(errors="replace")


def test_an_association_outlives_the_association_deadline(node):
    """The deadline ends at establishment: a long association stores and releases."""
    assoc = _associate(node, "127.0.0.5")
    assert assoc.is_established
    until = time.monotonic() + LIMITS["association_deadline_seconds"] + 1
    while time.monotonic() < until:  # busy, never idle for network_timeout
        assert assoc.send_c_echo().Status == 0
        time.sleep(0.5)
    ds = _small_slice()
    assert assoc.send_c_store(ds).Status == 0
    ACKED.add(str(ds.SOPInstanceUID))
    assoc.release()
    assert assoc.is_released
    assert _until(lambda: "association released: PRESSURE" in node.log.read_text(), 5)
    assert "from 127.0.0.5 closed" not in node.log.read_text(errors="replace")


def test_a_message_trickled_past_its_deadline_is_aborted(node):
    """Fragments every 0.5 s keep the connection from ever being idle; the message
    deadline still ends it."""
    assoc = _associate(node)
    assert assoc.is_established
    ds = _small_slice(64)
    pdus = list(_store_message(ds, assoc.accepted_contexts[-1].context_id, 256))
    started = time.monotonic()
    for pdu in pdus:
        if not assoc.is_established or time.monotonic() - started > 12:
            break
        try:
            assoc.dul.socket.socket.sendall(pdu)
        except OSError:
            break
        time.sleep(0.5)
    assert _until(lambda: not assoc.is_established, 5)
    ended_after = time.monotonic() - started
    assert (
        LIMITS["message_deadline_seconds"] - 0.5
        < ended_after
        < LIMITS["message_deadline_seconds"] + 3
    ), ended_after
    assert "message_deadline_seconds" in node.log.read_text(errors="replace")
    assert str(ds.SOPInstanceUID) not in _recorded(node)


# -- an instance far over the size limit --------------------------------------------------
def _store_message(ds, context_id: int, pdu_size: int) -> Iterator[bytes]:
    """The encoded P-DATA-TF PDUs of a C-STORE-RQ of ``ds``, at most ``pdu_size`` long."""
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = io.BytesIO(encode(ds, False, True))
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    for primitive in msg.encode_msg(context_id, pdu_size):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        yield pdu.encode()


def _vm(pid: int, key: str) -> int:
    """A /proc/PID/status value of the node process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _p_data(context_id: int, data: bytes | memoryview, last: bool) -> bytes:
    pdv = struct.pack(">LBB", len(data) + 2, context_id, 0x02 if last else 0x00)
    return struct.pack(">BBL", 4, 0, len(pdv) + len(data)) + pdv + bytes(data)


def _command_set(context_id: int, sop_uid: str) -> bytes:
    """The C-STORE-RQ command set of a data set that follows, as one P-DATA PDU."""
    req = C_STORE()
    req.MessageID = 7
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = sop_uid
    req.Priority = 2
    req.DataSet = io.BytesIO(b"\x00")
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    pdu = P_DATA_TF()
    pdu.from_primitive(next(iter(msg.encode_msg(context_id, 0))))
    return pdu.encode()


def _store_by_hand(node: NodeProcess) -> tuple[object, int, str, socket.socket]:
    """An association whose C-STORE the test writes on the socket itself: the association,
    the CT context's ID, a new SOP Instance UID and the socket."""
    assoc = _associate(node)
    assert assoc.is_established
    return (
        assoc,
        assoc.accepted_contexts[-1].context_id,
        pydicom.uid.generate_uid(),
        assoc.dul.socket.socket,
    )


@pytest.mark.parametrize("how", ["1 MiB PDUs", "one PDU"])
def test_an_instance_far_over_the_limit_is_aborted_as_it_arrives(node, how):
    """A 600 MB C-STORE: the node reads no more than about the limit of it (8 MiB)."""
    size = 600 * 1024 * 1024
    pid = node.proc.pid
    rss_before, hwm_before = _vm(pid, "VmRSS"), _vm(pid, "VmHWM")
    assoc, cx, sop_uid, sock = _store_by_hand(node)
    chunk = memoryview(bytes(1024 * 1024))
    sent = 0
    started = time.monotonic()
    try:
        sock.sendall(_command_set(cx, sop_uid))
        if how == "one PDU":  # its header declares the whole 600 MB
            sock.sendall(
                struct.pack(">BBL", 4, 0, size + 6) + struct.pack(">LBB", size + 2, cx, 0x02)
            )
        while sent < size and time.monotonic() - started < 30:
            if how == "one PDU":
                sock.sendall(chunk)
            else:
                sock.sendall(_p_data(cx, chunk, last=sent + len(chunk) >= size))
            sent += len(chunk)
    except OSError:  # the node aborted and closed
        pass
    assert _until(lambda: not assoc.is_established, 5)
    aborted_after = time.monotonic() - started
    hwm = _vm(pid, "VmHWM")
    growth = max(hwm - hwm_before, _vm(pid, "VmRSS") - rss_before)
    print(
        f"\n600 MB C-STORE in {how}: aborted after {aborted_after:.2f} s, "
        f"{sent / 2**20:.0f} MiB sent; node VmHWM {hwm_before / 2**20:.0f} -> "
        f"{hwm / 2**20:.0f} MiB"
    )
    assert sent < size / 4  # the node stopped reading long before the end
    assert aborted_after < 5
    assert growth < 64 * 1024 * 1024, growth  # a fraction of the 600 MB
    assert sop_uid not in _recorded(node)
    assert "(limits.max_instance_bytes 8388608)" in node.log.read_text(errors="replace")


# -- nothing lost -------------------------------------------------------------------------
def _recorded(node: NodeProcess) -> set[str]:
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in (node.data_dir / "spool").glob("*/*/*.dcm")
    }


def test_nothing_acknowledged_is_lost(node, tmp_path):
    _store_with_storescu(node, _series(tmp_path / "after"))  # still serving normally
    recorded = _recorded(node)
    assert ACKED and ACKED <= recorded, ACKED - recorded
    jobs = node.jobs()
    assert sum(j["instance_count"] for j in jobs) == len(ACKED) == len(recorded)
    assert list((node.data_dir / "spool" / ".incoming").iterdir()) == []


def test_a_large_instance_is_aborted_when_spilling_it_would_pass_the_disk_watermark(tmp_path):
    """data_dir on a 96 MiB tmpfs, the intake watermark at 64 MiB free: a data set large
    enough to go to the spool's disk as it arrives is refused as soon as writing it would
    take the free space below the watermark, not after the whole of it was written, when
    the C-STORE's own check comes; the partial file goes; the node serves on."""
    import shutil

    from dicom_node.intake.received import SPILL_ABOVE

    with small_tmpfs(tmp_path / "data", 96) as data:
        node = NodeProcess(
            tmp_path / "node",
            node={"data_dir": str(data), "settle_seconds": 3600, "complete_on_release": False},
            limits={"min_free_disk_mb": 64, "reserved_disk_mb": 4},
            inference={"backend": "local", "bundle": str(SPLEEN_BUNDLE)},
        )
        try:
            node.start()
            free_before = shutil.disk_usage(data).free
            assoc, cx, sop_uid, sock = _store_by_hand(node)
            chunk = memoryview(bytes(1024 * 1024))
            size, sent = 200 * 1024 * 1024, 0
            try:
                sock.sendall(_command_set(cx, sop_uid))
                while sent < size:
                    sock.sendall(_p_data(cx, chunk, last=sent + len(chunk) >= size))
                    sent += len(chunk)
            except OSError:  # the node aborted and closed
                pass
            assert _until(lambda: not assoc.is_established, 10)
            # it read past the spill threshold, and stopped before the watermark was passed
            assert SPILL_ABOVE <= sent < 64 * 1024 * 1024, sent
            log = node.log.read_text(errors="replace")
            assert "below the 64 MB watermark (limits.min_free_disk_mb)" in log
            assert shutil.disk_usage(data).free >= 64 * 1024 * 1024
            assert sop_uid not in _recorded(node)
            incoming = data / "spool" / ".incoming"
            assert _until(lambda: not list(incoming.iterdir()), 5), list(incoming.iterdir())
            # its space comes back once the node has closed the file as well
            returned = _until(lambda: shutil.disk_usage(data).free >= free_before - 2**20, 5)
            assert returned, _open_deleted_files(node.proc.pid)
            # the node serves on, and a small instance is stored
            ds = _small_slice()
            store = _associate(node)
            assert store.is_established
            try:
                assert store.send_c_store(ds).Status == 0
            finally:
                store.release()
            assert str(ds.SOPInstanceUID) in _recorded(node)
        finally:
            node.stop()
