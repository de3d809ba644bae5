"""Everything the node changes inside pynetdicom, in one place, checked against one version.

pynetdicom has no setting for where a received data set is written, for how its threads
poll, or for its per-PDU logging handlers, and each costs ingest: the node replaces what
it must here, and nowhere else (:mod:`dicom_node.intake.connections` guards the socket reads
the same way, against the same version).

* :func:`receive_to_files`: received C-STORE data sets go into an
  :class:`~dicom_node.intake.received.IncomingDataSet` under the spool instead of a temporary
  file, and their File Meta Information is written from
  :func:`~dicom_node.intake.received.part10_header` instead of through pydicom (about 0.3 ms of
  each C-STORE).
* :func:`tune_association`: an association answers without polling delays
  (:class:`PromptDIMSE` replaces ``Association.dimse``; the DUL thread's sleep between
  loops ends as soon as the peer sends or a response is queued, :func:`_dul_sleep`),
  encodes a C-STORE response's command set directly (:func:`store_response_command`) and
  sends it from the association's own thread (:meth:`PromptDIMSE._send_now`),
  acknowledges promptly (``TCP_QUICKACK``) and does not format log lines its logger
  discards.
* :func:`discard_partial`: the file of a data set cut short is removed.

pynetdicom's DUL and association modules see a ``time`` of this module's
(:data:`_DUL_CLOCK`, :data:`_REACTOR_CLOCK`): the loop sleeps of a tuned association end
when there is work, every other sleep is pynetdicom's.

The module names and private attributes used here were read in pynetdicom
:data:`~dicom_node.common.associations.TESTED_PYNETDICOM`; ``pyproject.toml`` pins the
3.0 series, and ``tests/unit/intake/test_pynetdicom_tuning.py`` fails on any other version
until they are read again in the new one. Outside the 3.0 series the replacements of
internals are left out (:data:`~dicom_node.common.associations.TUNES_INTERNALS`): the node
then behaves the same, only slower.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
import types
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynetdicom
import pynetdicom.association
import pynetdicom.dul
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import _config, dimse_messages, evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE, DimsePrimitiveType, DimseServiceType
from pynetdicom.dsutils import create_file_meta
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA

from dicom_node.common.associations import TUNES_INTERNALS
from dicom_node.intake.received import IncomingDataSet, part10_header

#: pynetdicom's default DUL loop delay, seconds.
IDLE_LOOP_DELAY = 0.001
#: DUL loop delay while the peer is sending messages.
BUSY_LOOP_DELAY = 0.0003
#: How long after its last message an association counts as busy, seconds.
BUSY_PERIOD = 0.5
#: Longest wait of the association reactor for a message before it checks for a release,
#: an abort or the network timeout (pynetdicom checks every 1 ms).
REACTOR_WAIT = 0.005
#: Longest sleep of a DUL thread that wakes when the peer sends or a PDU is queued for it
#: (:func:`_dul_sleep`): it loops then only for its timers.
WAKEABLE_LOOP_DELAY = 0.005
#: Whether a DUL thread can be woken here (Linux: an eventfd beside the socket).
WAKES_DUL = TUNES_INTERNALS and hasattr(os, "eventfd")

#: pynetdicom's own notification handlers, bound to every association by default. They
#: describe each PDU and DIMSE message for pynetdicom's INFO and DEBUG log lines.
_PYNETDICOM_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


def _never() -> bool:
    return False


_incoming_dir: Path | None = None
#: Whether a data set held in memory is also written through to its file as it arrives.
_write_through: Callable[[], bool] = _never
#: How many storage SCPs of this process receive to files (:func:`receive_to_files`).
_receivers = 0
#: What :func:`receive_to_files` replaces, as pynetdicom had it.
_PYNETDICOM_FILE_HANDLING = (
    dimse_messages.NamedTemporaryFile,
    dimse_messages.create_file_meta,
    dimse_messages.write_file_meta_info,
    _config.STORE_RECV_CHUNKED_DATASET,
)


# -- where received data sets are written -----------------------------------------------
def _incoming_file(*args: object, **kwargs: object) -> IncomingDataSet | Any:
    """pynetdicom's ``NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")`` for a
    received data set: an :class:`IncomingDataSet` under the spool."""
    if _incoming_dir is None:
        return tempfile.NamedTemporaryFile(*args, **kwargs)  # type: ignore[call-overload]
    return IncomingDataSet(_incoming_dir, write_through=_write_through())


class _PlainMeta(tuple):
    """The File Meta Information pynetdicom asks for: (SOP class, SOP instance, syntax)."""


def _create_file_meta(
    *, sop_class_uid: UID, sop_instance_uid: UID, transfer_syntax: UID, **other: Any
) -> Any:
    """pynetdicom's ``create_file_meta`` for a received data set, left unbuilt: building
    and writing the group through pydicom costs some 0.3 ms of each C-STORE (see
    :func:`part10_header`), a tenth of the time ingest takes here."""
    if other:
        return create_file_meta(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax=transfer_syntax,
            **other,
        )
    return _PlainMeta((sop_class_uid, sop_instance_uid, transfer_syntax))


def _write_file_meta_info(fp: Any, file_meta: Any, *args: Any, **kwargs: Any) -> None:
    """pydicom's ``write_file_meta_info``, or the same bytes from :func:`part10_header`."""
    if isinstance(file_meta, _PlainMeta):
        try:
            fp.write(part10_header(*(str(v or "") for v in file_meta))[132:])
            return
        except UnicodeEncodeError:  # not a UID at all: let pydicom write what it can
            file_meta = create_file_meta(
                sop_class_uid=file_meta[0],
                sop_instance_uid=file_meta[1],
                transfer_syntax=file_meta[2],
            )
    write_file_meta_info(fp, file_meta, *args, **kwargs)


def receive_to_files(incoming: Path, write_through: Callable[[], bool] | None = None) -> None:
    """Have pynetdicom write received C-STORE data sets to files in ``incoming``.

    A process-wide pynetdicom setting (it receives C-STORE as an SCP only here; sending is
    unaffected). Memory then no longer grows with the size of an instance: pynetdicom
    would otherwise join its fragments in memory, and the node copy them once more.
    ``write_through``, asked as each data set begins, says whether one held in memory is
    also written through to its file as it arrives (see
    :class:`~dicom_node.intake.received.IncomingDataSet`).
    """
    global _incoming_dir, _receivers, _write_through
    _incoming_dir = incoming
    if write_through is not None:
        _write_through = write_through
    _receivers += 1
    # a replacement of pynetdicom's tempfile.NamedTemporaryFile, whose overloads it does not copy
    dimse_messages.NamedTemporaryFile = _incoming_file  # type: ignore[assignment]
    if TUNES_INTERNALS:
        dimse_messages.create_file_meta = _create_file_meta
        dimse_messages.write_file_meta_info = _write_file_meta_info
    _config.STORE_RECV_CHUNKED_DATASET = True


def stop_receiving_to_files() -> None:
    """Undo one :func:`receive_to_files`; the last one gives pynetdicom its own file
    handling and setting back, so that nothing in the process writes under a spool whose
    node has stopped."""
    global _incoming_dir, _receivers, _write_through
    _receivers = max(0, _receivers - 1)
    if _receivers:
        return
    _incoming_dir = None
    _write_through = _never
    dimse_messages.NamedTemporaryFile = _PYNETDICOM_FILE_HANDLING[0]
    dimse_messages.create_file_meta = _PYNETDICOM_FILE_HANDLING[1]
    dimse_messages.write_file_meta_info = _PYNETDICOM_FILE_HANDLING[2]
    _config.STORE_RECV_CHUNKED_DATASET = _PYNETDICOM_FILE_HANDLING[3]


def discard_partial(assoc: Association) -> None:
    """Remove the file of a data set whose association ended before it was complete.

    pynetdicom leaves it behind (it deletes the file only after the C-STORE handler ran).
    """
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is None:
        return
    try:
        partial.close()
        os.unlink(partial.name)
    except OSError:
        pass


# -- how a C-STORE response is encoded ---------------------------------------------------
def _uid_element(element: int, uid: str) -> bytes:
    """A group 0000 UI element, Implicit VR Little Endian, padded with NUL to even length."""
    raw = uid.encode("ascii")
    if len(raw) % 2:
        raw += b"\x00"
    return struct.pack("<HHI", 0x0000, element, len(raw)) + raw


def _us_element(element: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, element, 2, value)


def store_response_command(
    sop_class: str, message_id: int, status: int, sop_instance: str
) -> bytes:
    """The command set of a C-STORE-RSP without Offending Element or Error Comment (PS3.7
    9.3.1.2), Implicit VR Little Endian as PS3.7 6.3.1 requires.

    Byte for byte what pynetdicom encodes for the same response (tested), which builds a
    pydicom data set of every element the message may hold and writes it: some 0.5 ms of
    each C-STORE, on the way to the answer.
    """
    body = b"".join(
        (
            _uid_element(0x0002, sop_class),  # Affected SOP Class UID
            _us_element(0x0100, 0x8001),  # Command Field: C-STORE-RSP
            _us_element(0x0120, message_id),  # Message ID Being Responded To
            _us_element(0x0800, 0x0101),  # Command Data Set Type: no data set
            _us_element(0x0900, status),
            _uid_element(0x1000, sop_instance),  # Affected SOP Instance UID
        )
    )
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def response_pdu(context_id: int, command: bytes) -> bytes:
    """The P-DATA-TF PDU (PS3.8 9.3.5) of a command set sent whole: one presentation data
    value, its message control header "command, last fragment" (0x03)."""
    pdv = struct.pack(">IB", len(command) + 2, context_id) + b"\x03" + command
    return struct.pack(">BxI", 0x04, len(pdv)) + pdv


# -- how an association polls ----------------------------------------------------------
class PromptDIMSE(DIMSEServiceProvider):
    """A DIMSE provider with which an association answers without polling delays.

    pynetdicom serves an association with two polling threads. The acceptor reactor sleeps
    1 ms, then asks ``get_msg(block=False)`` whether a message is complete; the DUL sleeps
    ``_run_loop_delay`` (1 ms) after each loop that found nothing to do, also before it
    sends a queued response or reads the peer's next request. With a peer that sends the
    next instance only once it has the response, those waits were over a millisecond of
    each C-STORE.

    Here the reactor's poll waits on the message queue, up to :data:`REACTOR_WAIT`, so a
    message is served as soon as it is complete and an idle reactor wakes less often than
    before. A DUL that can be woken (:func:`_dul_sleep`, Linux) sleeps until the peer sends
    or a PDU is queued for it. Elsewhere, while messages arrive the DUL loops every
    :data:`BUSY_LOOP_DELAY`; after :data:`BUSY_PERIOD` without one it is back at
    pynetdicom's 1 ms, so an idle open association costs no more CPU than before. Releases
    and aborts are seen at most one wait later.
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._last_message = 0.0
        #: Whether the DUL polls (its sleep cannot be woken, :data:`WAKES_DUL`).
        self._polls = not WAKES_DUL

    def receive_primitive(self, primitive: P_DATA) -> None:
        """pynetdicom's, and on a message it cannot decode (a presentation context never
        negotiated...), the data set file it had begun is removed: pynetdicom then shuts the
        association down without an event the node would see."""
        try:
            super().receive_primitive(primitive)
        except Exception:
            discard_partial(self.assoc)
            raise

    def send_msg(self, primitive: DimsePrimitiveType, context_id: int) -> None:
        """pynetdicom's, but a plain C-STORE response (no Error Comment, no Offending
        Element, no handler bound to ``EVT_DIMSE_SENT``) is encoded by
        :func:`store_response_command` as pynetdicom would send it: one P-DATA with the
        command set as its last fragment. It goes on the socket from this thread
        (:meth:`_send_now`), or where it cannot, to the DUL."""
        if (
            isinstance(primitive, C_STORE)
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status is not None
            and primitive.AffectedSOPClassUID
            and primitive.AffectedSOPInstanceUID
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            command = store_response_command(
                str(primitive.AffectedSOPClassUID),
                int(primitive.MessageIDBeingRespondedTo),
                int(primitive.Status),
                str(primitive.AffectedSOPInstanceUID),
            )
            if not self.maximum_pdu_size or len(command) + 6 <= self.maximum_pdu_size:
                if self._send_now(context_id, command):
                    return
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)

    def _send_now(self, context_id: int, command: bytes) -> bool:
        """Send a response's P-DATA-TF on the socket from the association's thread, as the
        DUL would: whether it was sent (or the connection found closed).

        Handing a response to the DUL costs each C-STORE a wake-up of the DUL thread and a
        turn of the interpreter between the threads before the peer has its answer (about
        a tenth of ingest). It is sent here only where the DUL would send it at once and
        nothing else: the association established (Sta6, where sending P-DATA leaves the
        state as it is), nothing queued for the DUL to send before it, and no handler
        bound to the events the DUL's send triggers but the node's own
        (:func:`_quick_ack`, which this does too), on a plain TCP connection (a TLS one is
        the DUL's alone: OpenSSL's connection may not be written by one thread while
        another reads it). A closed connection is reported to the DUL as its own send would
        (Evt17).
        """
        dul = self.dul
        assoc_socket = dul.socket
        sock = assoc_socket.socket if assoc_socket is not None else None
        if (
            sock is None
            or assoc_socket is None
            # OpenSSL's connection may not be written by one thread while another reads it
            or isinstance(sock, ssl.SSLSocket)
            or dul.state_machine.current_state != "Sta6"
            or not dul.to_provider_queue.empty()
            or self.assoc.get_handlers(evt.EVT_DATA_SENT)
            or any(h is not _quick_ack for h in _bound(self.assoc, evt.EVT_PDU_SENT))
        ):
            return False
        try:
            sock.sendall(response_pdu(context_id, command))
        except OSError:
            assoc_socket.event_queue.put("Evt17")  # the transport connection closed
            return True
        _quick_ack_socket(sock)
        return True

    def get_msg(self, block: bool = False) -> tuple[None, None] | tuple[int, DimseServiceType]:
        if block:  # the requestor's wait for a response: pynetdicom's own
            return super().get_msg(block=True)
        try:
            item = self.msg_queue.get(timeout=REACTOR_WAIT)
        except queue.Empty:
            if self._polls and time.monotonic() - self._last_message > BUSY_PERIOD:
                self.dul._run_loop_delay = IDLE_LOOP_DELAY
            return None, None
        self._last_message = time.monotonic()
        if self._polls:
            self.dul._run_loop_delay = BUSY_LOOP_DELAY
        return item


def _dul_sleep(delay: float) -> None:
    """The sleep of pynetdicom's DUL loop, ended early by work.

    pynetdicom's DUL thread sleeps ``_run_loop_delay`` after every loop that found nothing
    to do, then looks at its socket and its queue again: some three thousand loops a
    second, each taking the interpreter from the C-STORE being served, and up to a sleep's
    delay before a queued response goes out or the peer's next request is read. A DUL
    tuned here (:func:`_wake_on_work`) waits instead in ``select`` on its socket and on an
    eventfd that :meth:`send_pdu` and :meth:`kill_dul` signal, for up to ``delay``; any
    other thread sleeps as before.
    """
    dul = threading.current_thread()
    wake = getattr(dul, "_dicom_node_wake", None)
    assoc_socket = getattr(dul, "socket", None)
    sock = getattr(assoc_socket, "socket", None)
    if wake is None or sock is None:
        time.sleep(delay)
        return
    try:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes select cannot see
        ready, _, _ = select.select([sock, wake], [], [], delay)
    except (OSError, ValueError):  # closed meanwhile: the loop finds out
        return
    if wake in ready:
        try:
            os.eventfd_read(wake)
        except OSError:  # read by another wake-up, or closed
            pass


#: pynetdicom's DUL module sees this as ``time``: its loop's sleep is :func:`_dul_sleep`.
_DUL_CLOCK = types.SimpleNamespace(**{**vars(time), "sleep": _dul_sleep})

#: The sleep at the top of pynetdicom's acceptor reactor loop (``Association._run_reactor``).
_REACTOR_LOOP_SLEEP = 0.001


def _reactor_sleep(delay: float) -> None:
    """The sleeps of pynetdicom's association module, less the reactor loop's own.

    pynetdicom's acceptor reactor sleeps 1 ms at the top of every loop, also right after
    it answered a request, before it looks for the next one. A tuned association's reactor
    waits for the next message in :meth:`PromptDIMSE.get_msg` instead, so that sleep only
    delayed it (up to 2 ms under load); every other sleep is kept.
    """
    if delay == _REACTOR_LOOP_SLEEP:
        assoc = threading.current_thread()
        if isinstance(getattr(assoc, "dimse", None), PromptDIMSE):
            return
    time.sleep(delay)


#: pynetdicom's association module sees this as ``time``.
_REACTOR_CLOCK = types.SimpleNamespace(**{**vars(time), "sleep": _reactor_sleep})


def _wake_on_work(dul: DULServiceProvider) -> None:
    """Let a DUL thread's sleep end when a PDU is queued for it or it is told to stop."""
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    weakref.finalize(dul, os.close, wake)
    send_pdu, kill_dul = dul.send_pdu, dul.kill_dul

    def signal() -> None:
        try:
            os.eventfd_write(wake, 1)
        except OSError:  # closed with its association
            pass

    def send_and_wake(primitive: Any) -> None:
        send_pdu(primitive)
        signal()

    def kill_and_wake() -> None:
        kill_dul()
        signal()

    dul.send_pdu = send_and_wake  # type: ignore[method-assign]
    dul.kill_dul = kill_and_wake  # type: ignore[method-assign]
    dul._dicom_node_wake = wake  # type: ignore[attr-defined]
    dul._run_loop_delay = WAKEABLE_LOOP_DELAY
    # a namespace standing in for the DUL module's ``time`` module
    pynetdicom.dul.time = _DUL_CLOCK  # type: ignore[assignment]


def _quick_ack(event: evt.Event) -> None:
    """After each PDU the node sends, acknowledge the peer's next data without delay.

    Once the node answers requests, Linux takes the connection for interactive and delays
    ACKs, hoping to send them with data, by up to 40 ms. A sender using Nagle's algorithm
    (DCMTK's ``storescu`` does) writes the 6-byte header of its next PDU and holds the
    rest until that header is acknowledged: once the DUL read headers promptly
    (:class:`PromptDIMSE`), a few C-STOREs in a hundred stalled for those 40 ms.
    ``TCP_QUICKACK`` leaves the interactive mode; sending the next PDU enters it again,
    hence once per PDU sent.
    """
    assoc_socket = event.assoc.dul.socket
    sock = assoc_socket.socket if assoc_socket is not None else None
    if sock is not None:
        _quick_ack_socket(sock)


def _quick_ack_socket(sock: socket.socket) -> None:
    """``TCP_QUICKACK`` on ``sock`` (:func:`_quick_ack`), where the platform has it."""
    if not hasattr(socket, "TCP_QUICKACK"):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    except OSError:  # closed meanwhile: nothing left to acknowledge
        pass


def _bound(assoc: Association, event: evt.NotificationEvent) -> list[Any]:
    """The handlers bound to a notification ``event`` of ``assoc`` (pynetdicom lists each
    with its arguments)."""
    return [h[0] if isinstance(h, tuple) else h for h in assoc.get_handlers(event)]


def tune_association(assoc: Association) -> None:
    """Make a new association answer C-STOREs without pynetdicom's polling delays.

    Called from the ``EVT_CONN_OPEN`` handler, before the association's threads start.
    Also unbinds pynetdicom's logging handlers while its logger discards what they
    format (the node logs pynetdicom at WARNING): on the DUL thread they cost about
    0.2 ms per C-STORE, before the request is handed to the reactor.
    """
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        for event, handler in _PYNETDICOM_LOG_HANDLERS:
            assoc.unbind(event, handler)
    if hasattr(socket, "TCP_QUICKACK"):  # Linux
        assoc.bind(evt.EVT_PDU_SENT, _quick_ack)
    if TUNES_INTERNALS:
        # The reactor looks its provider up on each loop; nothing has used it yet.
        assoc.dimse = PromptDIMSE(assoc)
        # a namespace standing in for the association module's ``time`` module
        pynetdicom.association.time = _REACTOR_CLOCK  # type: ignore[assignment]
    if WAKES_DUL:
        _wake_on_work(assoc.dul)
