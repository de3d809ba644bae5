"""Connection-level guards below pynetdicom: deadlines, P-DATA size, connections per address.

pynetdicom bounds each socket read by ``network_timeout``, and the association phases by
``acse_timeout`` and ``dimse_timeout``, but only between reads: a peer sending one byte a
second never lets a read time out, and its DUL thread, blocked inside
``AssociationSocket.recv``, never looks at the ARTIM timer. Seventeen such peers held every
association slot for as long as they trickled. pynetdicom also reads each PDU whole, of
whatever length its header declares, and the DIMSE layer joins the fragments of a data set
in memory before the C-STORE handler can look at its size.

pynetdicom has no setting for any of this, so the guard replaces the ``recv`` of each
connection's ``AssociationSocket`` (the one method the DUL reads with, checked against
pynetdicom 3.0.4 with :mod:`dicom_node.intake.pynetdicom_tuning`) with :class:`GuardedReader`,
which

* reads with a *total* deadline: ``association_deadline_seconds`` from accept until the
  association is established, then ``message_deadline_seconds`` from the first byte of
  each PDU and of each message (all fragments of a command set or data set);
* reads each PDU header first and refuses, before reading the body, a P-DATA PDU that
  would take the data set past ``max_instance_bytes`` or that is longer than the node
  announced it would receive (:data:`MAX_PDU`); the node then sends an A-ABORT and the
  association ends, with one log line saying why;
* refuses, in the same way, a P-DATA PDU of a data set large enough to be written to the
  spool's file system as it arrives (:data:`~dicom_node.intake.received.SPILL_ABOVE`) when
  writing it would take the free space below ``min_free_disk_mb``: the C-STORE's own
  disk check comes only once the whole data set is in, and by then the file written so
  far could have filled the disk the job database and the results need.

A failed read is an ``OSError`` to pynetdicom, which closes the connection as it does for a
peer that hung up. :class:`AddressLimiter` counts connections per source address from the
moment they are accepted, so that one address cannot take every slot
(``max_associations_per_address``); one over the limit, or over ``max_pending_connections``
not yet associated in all, gets an A-ASSOCIATE-RJ (transient, local limit exceeded) without
anything it sent being read, and its thread ends at once.

Association slots (``max_associations``) are the node's, not pynetdicom's: pynetdicom counts
every live acceptor thread against ``maximum_associations``, so connections that never sent
a request, and connections already refused (whose threads wait out ``acse_timeout``), kept
everyone else out. :class:`AssociationSlots` gives a slot when an association is requested
and takes it back when it ends or is refused; an address that already holds one gets
another only while more than ``reserved_associations`` are free; and an association that
has stored nothing for ``idle_timeout_seconds`` (a C-ECHO does not count) is aborted.

The network allow-list (``[node] allowed_hosts``, :func:`allowed_networks` and
:func:`address_allowed`) lives here too, with the other rules on peer addresses.

Why one module of this size (~400 lines): every rule about a connection below pynetdicom,
where one reader sees each byte as it arrives.
"""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable

from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket

from dicom_node.config import ConfigError, LimitSettings
from dicom_node.intake.received import SPILL_ABOVE

log = logging.getLogger("dicom_node.intake.scp")

#: A-ABORT, service-provider initiated, reason not specified (PS3.8 9.3.8).
A_ABORT_PROVIDER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x00])
#: A-ASSOCIATE-RJ, rejected-transient, service-provider (presentation), local limit exceeded.
A_ASSOCIATE_RJ_LIMIT = bytes([0x03, 0, 0, 0, 0, 4, 0, 0x02, 0x03, 0x02])
_P_DATA = 0x04
#: The other PDU types (PS3.8 9.3.1); pynetdicom refuses any other type itself.
_CONTROL_PDUS = (0x01, 0x02, 0x03, 0x05, 0x06, 0x07)
#: PDV headers and a command set on top of the data set's own bytes.
_SLACK = 64 * 1024
#: Largest single read: pynetdicom reads 4 KiB at a time.
_CHUNK = 1024 * 1024
#: The largest P-DATA PDU the node accepts, announced as its Maximum Length Received
#: (PS3.8 D.1): pynetdicom reads each PDU whole before handing on its fragments.
MAX_PDU = 4 * 1024 * 1024
#: Largest PDU other than P-DATA (an A-ASSOCIATE-RQ with every storage class and transfer
#: syntax and a user identity token is some tens of kilobytes).
MAX_CONTROL_PDU = 1024 * 1024


class ConnectionRefused(OSError):
    """A read the guard refused (deadline passed, data set too large); pynetdicom treats it
    as a broken connection.

    The guard has logged why; the connection's thread is marked so that pynetdicom's own
    lines about the same broken read are left out (see ``dicom_node.service.logs``).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        threading.current_thread()._dicom_node_refused = True  # type: ignore[attr-defined]


class GuardedReader:
    """``AssociationSocket.recv`` with deadlines and a P-DATA size limit (see module)."""

    def __init__(
        self,
        assoc: Association,
        assoc_socket: AssociationSocket,
        sock: socket.socket,
        limits: LimitSettings,
        address: str,
        opened: float,
        free_bytes: Callable[[], int] | None = None,
    ) -> None:
        self.assoc = assoc
        self.assoc_socket = assoc_socket
        self.sock = sock
        self.address = address
        self.network_timeout = limits.network_timeout
        self.association_deadline = opened + limits.association_deadline_seconds
        self.association_seconds = limits.association_deadline_seconds
        self.message_seconds = limits.message_deadline_seconds
        self.max_bytes = limits.max_instance_bytes
        self.min_free_mb = limits.min_free_disk_mb
        self.free_bytes = free_bytes
        self._body: int | None = None  # the length of the PDU body read next
        self._pdu_type = 0
        self._message_bytes = 0  # P-DATA fragment bytes of the message under way
        self._message_started: float | None = None
        self._was_established = False  # after a release the association is not, either

    @property
    def receiving(self) -> bool:
        """Whether part of a command set or data set has arrived and the rest is awaited."""
        return self._message_bytes > 0

    # -- what pynetdicom calls -------------------------------------------------------------
    def __call__(self, nr_bytes: int) -> bytearray:
        if self._body is not None and nr_bytes == self._body:
            self._body = None
            data = self._read(nr_bytes, self._deadline())
            if self._pdu_type == _P_DATA and len(data) == nr_bytes:
                self._count_fragments(data)
            elif len(data) == nr_bytes:
                self._message_started = None  # a PDU of its own is a message of its own
            return data
        self._body = None
        self._was_established = self._was_established or self.assoc.is_established
        if self._was_established and self._message_started is None:
            self._message_started = time.monotonic()
        data = self._read(nr_bytes, self._deadline())
        if nr_bytes == 6 and len(data) == 6:
            self._pdu_type, _, length = struct.unpack(">BBL", data)
            self._body = length
            if self._pdu_type == _P_DATA and self._message_bytes + length > self.max_bytes + _SLACK:
                self._refuse_size(self._message_bytes + length)
            if self._pdu_type == _P_DATA and length > MAX_PDU + _SLACK:
                self._refuse_size(length, "the Maximum Length Received announced", MAX_PDU)
            if self._pdu_type in _CONTROL_PDUS and length > MAX_CONTROL_PDU:
                self._refuse_size(length, "limits: an association control PDU", MAX_CONTROL_PDU)
            if self._pdu_type == _P_DATA and self._message_bytes + length > SPILL_ABOVE:
                self._check_disk(length)
        return data

    # -- the checks ------------------------------------------------------------------------
    def _deadline(self) -> float:
        if not self._was_established:
            return self.association_deadline
        started = self._message_started or time.monotonic()
        return started + self.message_seconds

    def _count_fragments(self, body: bytes | bytearray) -> None:
        """Add the PDVs of a P-DATA-TF body to the message under way (PS3.8 9.3.5)."""
        offset = 0
        while offset + 6 <= len(body):
            length = int.from_bytes(body[offset : offset + 4], "big")
            header = body[offset + 5]
            self._message_bytes += max(length - 2, 0)
            if self._message_bytes > self.max_bytes + _SLACK:
                self._refuse_size(self._message_bytes)
            if header & 0x02:  # the last fragment of a command set or data set
                self._message_bytes = 0
                self._message_started = None
            offset += 4 + length

    def _refuse_size(
        self, total: int, what: str = "limits.max_instance_bytes", limit: int | None = None
    ) -> None:
        limit = self.max_bytes if limit is None else limit
        log.warning(
            "connection from %s aborted: a message of more than %d bytes (%s %d) was "
            "arriving; read no further",
            self.address,
            total,
            what,
            limit,
        )
        self._abort()
        raise ConnectionRefused(f"message exceeds {what} ({limit})")

    def _check_disk(self, length: int) -> None:
        """Refuse a PDU of a spilled data set that would leave less than the watermark."""
        if self.free_bytes is None:
            return
        if self.free_bytes() - length >= self.min_free_mb * 1024 * 1024:
            return
        log.warning(
            "connection from %s aborted: a data set was being written to the spool with "
            "free disk space below the %d MB watermark (limits.min_free_disk_mb); read no "
            "further",
            self.address,
            self.min_free_mb,
        )
        self._abort()
        raise ConnectionRefused("free disk space below limits.min_free_disk_mb")

    def _deadline_passed(self) -> ConnectionRefused:
        if self._was_established:
            what = f"a message not complete within message_deadline_seconds ({self.message_seconds:g} s)"
            self._abort()
        else:
            what = (
                "association not established within association_deadline_seconds "
                f"({self.association_seconds:g} s)"
            )
        log.warning("connection from %s closed: %s", self.address, what)
        return ConnectionRefused(what)

    def _abort(self) -> None:
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(A_ABORT_PROVIDER)
        except OSError:
            pass
        finally:
            self.sock.settimeout(self.network_timeout)

    # -- reading ---------------------------------------------------------------------------
    def _read(self, nr_bytes: int, deadline: float) -> bytearray:
        """Up to ``nr_bytes`` (fewer if the peer closes), by ``deadline``.

        The buffer grows as bytes arrive: a header may declare a length the peer never
        sends, and memory is not reserved for it.
        """
        buf = bytearray()
        while len(buf) < nr_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._deadline_passed()
            self.sock.settimeout(min(self.network_timeout, left))
            try:
                chunk = self.sock.recv(min(nr_bytes - len(buf), _CHUNK))
            except TimeoutError:
                if deadline - time.monotonic() <= 0:
                    raise self._deadline_passed() from None
                raise  # network_timeout: silence, as pynetdicom handles it
            finally:
                self.sock.settimeout(self.network_timeout)
            if not chunk:
                break
            buf += chunk
        return buf


def handshake_within(sock: ssl.SSLSocket, seconds: float) -> None:
    """The TLS handshake, done within ``seconds`` in all (a per-read timeout lets a peer
    trickling its ClientHello hold the connection indefinitely)."""
    deadline = time.monotonic() + seconds
    timeout = sock.gettimeout()
    sock.setblocking(False)
    wait: tuple[list[ssl.SSLSocket], list[ssl.SSLSocket]]
    try:
        while True:
            try:
                sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                wait = ([sock], [])
            except ssl.SSLWantWriteError:
                wait = ([], [sock])
            left = deadline - time.monotonic()
            if left <= 0 or not any(select.select(*wait, [], left)):
                raise TimeoutError(f"TLS handshake not complete within {seconds:g} s")
    finally:
        sock.settimeout(timeout)


def peer_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer's address as an IP address (``None`` when it is none): an IPv4 peer seen on a
    dual-stack socket (``::ffff:10.0.0.1``) is its IPv4 address; a zone index is dropped."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def allowed_networks(hosts: list[str]) -> list[IPNetwork]:
    """Parse ``[node] allowed_hosts``: IP addresses or networks in CIDR notation.

    Raises :class:`~dicom_node.config.ConfigError` naming the first entry that is neither.
    """
    networks = []
    for i, entry in enumerate(hosts):
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"node.allowed_hosts[{i}]: {entry!r} is not an IP address or network"
            ) from None
    return networks


def address_allowed(address: str, networks: list[IPNetwork]) -> bool:
    """Whether a peer's ``address`` lies in one of ``networks`` (all, when there are none).

    An IPv4 peer seen on a dual-stack socket (``::ffff:10.0.0.1``) matches IPv4 entries.
    """
    if not networks:
        return True
    ip = peer_ip(address)
    if ip is None:
        return False
    return any(ip in net for net in networks if net.version == ip.version)


def _address_key(address: str) -> str:
    """One key per peer address; an IPv4 peer on a dual-stack socket counts as IPv4."""
    ip = peer_ip(address)
    return address if ip is None else str(ip)


class AddressLimiter:
    """Counts each source address's connections from accept until their thread ends."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._open: dict[str, set[Association]] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self._refused: dict[str, tuple[float, int]] = {}  # last log line, refusals since

    def admit(self, assoc: Association, address: str) -> bool:
        """Count ``assoc`` for ``address``, or return ``False`` when it holds its limit."""
        key = _address_key(address)
        with self._lock:
            held = self._open.setdefault(key, set())
            for other in [a for a in held if a.ident is not None and not a.is_alive()]:
                held.discard(other)
            if self.limit and len(held) >= self.limit:
                self._log_refusal(key, len(held))
                return False
            held.add(assoc)
            return True

    def forget(self, assoc: Association) -> None:
        """Stop counting ``assoc`` (its connection closed)."""
        with self._lock:
            for held in self._open.values():
                held.discard(assoc)

    def pending(self) -> int:
        """Connections counted that are not (or no longer) associated and still alive."""
        with self._lock:
            return sum(
                1
                for held in self._open.values()
                for a in held
                if not a.is_established and (a.ident is None or a.is_alive())
            )

    def _log_refusal(self, key: str, held: int) -> None:
        """One line per address and second, however fast it floods."""
        now = self._clock()
        last, since = self._refused.get(key, (float("-inf"), 0))
        if now - last < 1.0:
            self._refused[key] = (last, since + 1)
            return
        more = f" ({since} more refused since the last line)" if since else ""
        log.warning(
            "association rejected (transient, local limit exceeded): %s already holds %d "
            "connection(s), limits.max_associations_per_address%s",
            key,
            held,
            more,
        )
        self._refused[key] = (now, 0)


class AssociationSlots:
    """The node's association slots: taken at the request, given back at the end.

    ``acquire`` is called when an A-ASSOCIATE-RQ has arrived (``EVT_REQUESTED``), before
    negotiation; ``release`` when the association ends, is refused or its connection
    closes (each is safe to call more than once). ``touch`` marks work (a C-STORE), and
    :meth:`idle` names the associations that did none for ``idle_seconds``.
    """

    def __init__(
        self, total: int, reserved: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.total = total
        self.reserved = min(reserved, max(total - 1, 0))
        self._clock = clock
        self._held: dict[Association, tuple[str, float]] = {}  # address key, last work
        self._busy: dict[Association, int] = {}
        self._lock = threading.Lock()

    def acquire(self, assoc: Association, address: str) -> str:
        """Take a slot for ``assoc``; ``""``, or why not (the log line's reason)."""
        key = _address_key(address)
        with self._lock:
            for other in [a for a in self._held if a.ident is not None and not a.is_alive()]:
                del self._held[other]
            if assoc in self._held:
                return ""
            free = self.total - len(self._held)
            mine = sum(1 for k, _ in self._held.values() if k == key)
            if free <= 0:
                return f"all {self.total} association slots are held (limits.max_associations)"
            if mine and free <= self.reserved:
                return (
                    f"{key} holds {mine} association(s) and the {free} free slot(s) are kept "
                    "for other addresses (limits.reserved_associations)"
                )
            self._held[assoc] = (key, self._clock())
            return ""

    def release(self, assoc: Association) -> None:
        with self._lock:
            self._held.pop(assoc, None)
            self._busy.pop(assoc, None)

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def touch(self, assoc: Association, busy: bool) -> None:
        """Work on ``assoc`` begins (``busy``) or ends: its idle time starts again."""
        with self._lock:
            if assoc not in self._held:
                return
            key, _ = self._held[assoc]
            self._held[assoc] = (key, self._clock())
            count = self._busy.get(assoc, 0) + (1 if busy else -1)
            if count > 0:
                self._busy[assoc] = count
            else:
                self._busy.pop(assoc, None)

    def idle(self, idle_seconds: float) -> list[Association]:
        """Established associations with no work for ``idle_seconds`` and nothing arriving,
        while slots are short (no more free than the reserved ones): an idle association
        gives its slot back when another peer may need it, and only then, so that a
        modality pausing in the middle of a series keeps its association on a quiet node."""
        now = self._clock()
        with self._lock:
            if self.total - len(self._held) > self.reserved:
                return []
            candidates = [
                a
                for a, (_, last) in self._held.items()
                if now - last > idle_seconds and a not in self._busy and a.is_established
            ]
        return [a for a in candidates if not _receiving(a)]


def _receiving(assoc: Association) -> bool:
    assoc_socket = assoc.dul.socket
    reader = getattr(assoc_socket, "recv", None) if assoc_socket is not None else None
    return isinstance(reader, GuardedReader) and reader.receiving


class IdleReaper:
    """A thread that aborts the associations :meth:`AssociationSlots.idle` names."""

    def __init__(self, slots: AssociationSlots, idle_seconds: float) -> None:
        self.slots = slots
        self.idle_seconds = idle_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dicom-node-idle", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        tick = min(1.0, self.idle_seconds / 4)
        while not self._stop.wait(tick):
            for assoc in self.slots.idle(self.idle_seconds):
                req = assoc.requestor
                log.warning(
                    "association aborted: %r from %s stored nothing for %.0f s "
                    "(limits.idle_timeout_seconds)",
                    req.ae_title,
                    req.address,
                    self.idle_seconds,
                )
                self.slots.release(assoc)
                try:
                    assoc.abort()
                except Exception as exc:  # an association ending by itself meanwhile
                    log.debug("abort of an idle association: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


def reject_unread(assoc_socket: AssociationSocket, sock: socket.socket) -> None:
    """Answer a connection over its address's limit with an A-ASSOCIATE-RJ, unread.

    The A-ASSOCIATE-RJ goes out before the peer's request is read. Then, as the upper
    layer's state machine has it (PS3.8 9.2, Sta13), the node waits for the peer to close
    the connection, for up to a second, draining what it sent (closing with unread data
    would reset the connection, and the peer could lose the rejection), and closes the
    socket: the association ends before it starts. Closing its own side first would make
    the peer's end of the connection arrive with the rejection, and pynetdicom as a
    requestor may then take the association for aborted rather than rejected.
    """
    try:
        sock.settimeout(1.0)
        sock.sendall(A_ASSOCIATE_RJ_LIMIT)
        deadline = time.monotonic() + 1.0
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                break
    except OSError:
        pass
    assoc_socket.close()
    # pynetdicom starts the association's thread after this, and it would wait out
    # acse_timeout for a request that cannot come; with none left it ends at once.
    assoc_socket.assoc.acse_timeout = 0


def install(
    assoc: Association,
    limits: LimitSettings,
    address: str,
    free_bytes: Callable[[], int] | None = None,
) -> None:
    """Guard the reads of a new association's connection (before its threads start).

    ``free_bytes`` tells the free space of the file system large data sets are written to
    as they arrive (the spool's)."""
    assoc_socket = assoc.dul.socket
    sock = assoc_socket.socket if assoc_socket is not None else None
    if assoc_socket is None or sock is None:
        return
    assoc_socket.recv = GuardedReader(  # type: ignore[method-assign]
        assoc, assoc_socket, sock, limits, address, time.monotonic(), free_bytes
    )
