"""The node's DICOM application entity: C-ECHO and C-STORE SCP.

Behaviour hangs on small pynetdicom event handlers, and this module holds what pynetdicom
calls: the application entity, who may connect, the bookkeeping of open associations, and
the C-STORE handler, which hands the data set to :mod:`dicom_node.intake.storage` (validate,
write durably, record) and answers with its status; every refusal is a DIMSE status from
PS3.4 Annex B (:mod:`dicom_node.intake.checks`) with one log line saying why. This module
does no pixel math and knows nothing of models. It remembers which series each open
association stored and, at a normal release (``EVT_RELEASED``), emits that set
(:class:`~dicom_node.intake.events.AssociationReleased`) for completion to decide what is
complete (:mod:`dicom_node.series.completion`); each C-STORE's outcome is emitted too.
Where a destination asks for storage commitment the AE also takes the PACS's reports
(:mod:`dicom_node.intake.commitment_reports`), and an association the node opens to retrieve
with C-GET binds the same C-STORE and release handlers (:meth:`StorageSCP.retrieve_handlers`).

Who may talk to the node is decided before any data set is read: DICOM TLS with optional
client certificates (:mod:`dicom_node.common.tls`), the source address, the calling and called AE
titles, and the association slots, each refused with the A-ASSOCIATE-RJ reason of PS3.8 9.3.4,
and the connections one source address may hold. The node counts its association slots
itself (:class:`~dicom_node.intake.connections.AssociationSlots`): one is taken when a
request arrives, so a connection that says nothing holds none, and an association that
stores nothing for ``idle_timeout_seconds`` gives its slot back. Every connection is bounded
in time and size as its bytes arrive (:mod:`dicom_node.intake.connections`): a trickling
peer is cut off after ``association_deadline_seconds`` or ``message_deadline_seconds``, and
a data set growing past ``max_instance_bytes`` aborts its association before the rest is
read. Each refusal is emitted
(:class:`~dicom_node.intake.events.AssociationRefused`) for the audit trail, as is each
association's end (:class:`~dicom_node.intake.events.AssociationEnded`). Each
association is tuned to answer without pynetdicom's polling delays
(:mod:`dicom_node.intake.pynetdicom_tuning`). Patient names and IDs reach the log only with
``[node] log_patient_identifiers``.

Why one module of this size (~400 lines): it is every handler pynetdicom calls on the
node's application entity; the work each hands on lives elsewhere (storage, validation,
connections, tuning).
"""

from __future__ import annotations

import logging
import sqlite3
import ssl
import threading
from typing import cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association, ServiceUser
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ASSOCIATE, A_RELEASE
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.common.tls import peer_certificate_subject, server_ssl_context
from dicom_node.config import Settings
from dicom_node.intake import connections
from dicom_node.intake.checks import (
    CT_SOP_CLASSES,
    OUT_OF_RESOURCES,
    SUCCESS,
    StoreRefused,
    check_sop_class,
)
from dicom_node.intake.commitment_reports import add_report_context, report_handler
from dicom_node.intake.events import (
    AssociationEnded,
    AssociationRefused,
    AssociationReleased,
    Events,
)
from dicom_node.intake.pynetdicom_tuning import (
    discard_partial,
    receive_to_files,
    stop_receiving_to_files,
    tune_association,
)
from dicom_node.intake.received import SPILL_ABOVE, Received
from dicom_node.intake.spool import Spool
from dicom_node.intake.storage import InstanceStorage, StoreOutcome
from dicom_node.intake.transport_log import quiet_transport_log
from dicom_node.state import JobDatabase

__all__ = ["TRANSFER_SYNTAXES", "StorageSCP", "StoreOutcome"]

log = logging.getLogger("dicom_node.intake.scp")

#: Transfer syntaxes whose pixel data pydicom (with pylibjpeg, its plugins and pyjpegls)
#: decodes here. pynetdicom accepts, per context, the first of these the peer proposed, so
#: compressed syntaxes come first: the node then stores exactly the bytes the modality
#: encoded, and a sender that offers its file's own syntax never has to transcode.
TRANSFER_SYNTAXES = [
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
    HTJ2K,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,  # after the plain ones: inflating costs CPU for nothing
    ExplicitVRBigEndian,
]

# A-ASSOCIATE-RJ (PS3.8 9.3.4) for a source address: permanent, service user, no reason.
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
REASON_NO_REASON = 0x01

#: Connections the kernel queues for the node to accept.
LISTEN_BACKLOG = 128
#: A-ASSOCIATE-RJ reason of a full node (PS3.8 9.3.4): transient, service-provider
#: (presentation related), local limit exceeded.
REJECTED_TRANSIENT = 0x02
SOURCE_PROVIDER_PRESENTATION = 0x03
REASON_LOCAL_LIMIT = 0x02
#: Longest wait, at a peer's release request, for the rows of what it stored to be
#: committed (:meth:`StorageSCP._release_requested`).
RELEASE_SETTLE_SECONDS = 0.5
#: Acceptor threads pynetdicom may count beyond the node's own limits: refused connections
#: whose threads are ending.
_THREAD_SLACK = 64


def _primitive(user: ServiceUser) -> A_ASSOCIATE:
    """The A-ASSOCIATE primitive of ``user``: the request of the requestor, the answer of the
    acceptor. pynetdicom sets each before the events whose handlers read it (``EVT_REQUESTED``,
    ``EVT_REJECTED``), and leaves it optional in its annotations for the moments before."""
    primitive = user.primitive
    assert primitive is not None, "read before pynetdicom set it"
    return primitive


class StorageSCP:
    """The C-ECHO and C-STORE SCP: access control, association bookkeeping, answers.

    Each received instance goes to :class:`~dicom_node.intake.storage.InstanceStorage`, which
    validates, writes durably and records it; a refusal becomes the response's status.

    Parameters
    ----------
    settings:
        The node's typed settings (AE title, limits, access control).
    spool, jobs:
        Where instances are written and recorded.
    events:
        Where each C-STORE's :class:`StoreOutcome` and each normal release
        (:class:`~dicom_node.intake.events.AssociationReleased`) are emitted.
    """

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        jobs: JobDatabase,
        events: Events | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.jobs = jobs
        self.events = events or Events()
        # The instances each open association has stored, by series (duplicates included: a
        # sender re-sending a whole series after a crash completes it by its release).
        self._carried: dict[Association, dict[str, set[str]]] = {}
        self._carried_lock = threading.Lock()
        self.storage = InstanceStorage(settings, spool, jobs)
        self._server: ThreadedAssociationServer | None = None
        # Parsed (and TLS files loaded) here, so a bad [node]/[tls] value stops the node at
        # start-up with one sentence instead of at the first peer.
        self._networks = connections.allowed_networks(settings.node.allowed_hosts)
        limits = settings.limits
        self._per_address = connections.AddressLimiter(limits.max_associations_per_address)
        self._slots = connections.AssociationSlots(
            limits.max_associations, limits.reserved_associations
        )
        self._reaper = connections.IdleReaper(self._slots, limits.idle_timeout_seconds)
        self._ssl_context = server_ssl_context(settings.tls) if settings.tls.enabled else None
        #: Storage commitment reports, recorded before the PACS is answered.
        self.handle_report = report_handler(jobs.commitments.record_report)
        self.ae = self._make_ae()
        quiet_transport_log()

    # -- application entity -----------------------------------------------------------
    def _make_ae(self) -> AE:
        node, limits = self.settings.node, self.settings.limits
        ae = AE(ae_title=node.ae_title)
        # pynetdicom rejects beyond these itself, with the PS3.8 reasons: calling AE title
        # not recognised (1, 1, 3) and called AE title not recognised (1, 1, 7). Association
        # slots are counted by the node (handle_requested): pynetdicom counts every live
        # acceptor thread, those of connections that never asked and of refused ones too,
        # so its own limit is only a bound on threads here.
        ae.maximum_associations = (
            limits.max_associations + limits.max_pending_connections + _THREAD_SLACK
        )
        ae.require_calling_aet = [a.strip() for a in node.allowed_calling_aes]
        ae.require_called_aet = node.require_called_ae
        ae.acse_timeout = limits.acse_timeout
        ae.dimse_timeout = limits.dimse_timeout
        ae.network_timeout = limits.network_timeout
        # Large enough for a 1024x1024 slice in one PDU, small enough that a peer never
        # makes the node read hundreds of megabytes at once (it reads a PDU whole); a
        # peer sending larger ones is aborted (:mod:`dicom_node.intake.connections`).
        ae.maximum_pdu_size = connections.MAX_PDU
        ae.add_supported_context(Verification)
        for uid in CT_SOP_CLASSES:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        if node.unsupported_sop_class == "fail":
            for cx in StoragePresentationContexts:
                # each of pynetdicom's storage contexts names its SOP class
                assert cx.abstract_syntax is not None
                if cx.abstract_syntax not in CT_SOP_CLASSES:
                    ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        if any(d.asks_commitment() for d in self.settings.destinations):
            add_report_context(ae)  # reports on associations a PACS opens
        return ae

    def handlers(self) -> list[tuple]:
        return [
            (evt.EVT_CONN_OPEN, self.handle_connection),
            (evt.EVT_CONN_CLOSE, self._connection_closed),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_ACCEPTED, self._log_assoc, ["accepted"]),
            (evt.EVT_RELEASED, self._log_assoc, ["released"]),
            (evt.EVT_ABORTED, self._log_assoc, ["aborted"]),
            (evt.EVT_RELEASED, self.handle_released),
            (evt.EVT_ACSE_RECV, self._release_requested),
            (evt.EVT_ABORTED, self._aborted),
            (evt.EVT_REJECTED, self._log_rejected),
            (evt.EVT_REJECTED, self._release_slot),
            (evt.EVT_N_EVENT_REPORT, self.handle_report),
        ]

    def retrieve_handlers(self) -> list[tuple]:
        """The handlers an association the node opens to retrieve with C-GET binds: its
        C-STORE sub-operations are stored and answered as pushed instances, and its release
        completes what it carried as a pushing association's release does."""
        return [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_RELEASED, self.handle_released),
            (evt.EVT_ABORTED, self._aborted),
        ]

    def open_series(self) -> set[str]:
        """Series that an open association has stored instances of: more may follow.

        An association that ended without a release or an abort (its connection dropped)
        is forgotten here, once its thread has ended. Not on ``EVT_CONN_CLOSE``: that
        comes from the transport's thread and may precede ``EVT_RELEASED``, which the
        association's own thread triggers after the peer, answered, has hung up.
        """
        with self._carried_lock:
            for assoc in [a for a in self._carried if not a.is_alive()]:
                del self._carried[assoc]
            return {series for carried in self._carried.values() for series in carried}

    @property
    def tls(self) -> bool:
        """Whether the SCP speaks DICOM TLS (and only TLS) on its port."""
        return self._ssl_context is not None

    def _room_to_write_through(self) -> bool:
        """Whether a data set may be written to the disk as it arrives, before the C-STORE's
        own checks (see :class:`~dicom_node.intake.received.IncomingDataSet`).

        Only for an association alone: its sender waits for each answer, and the answer
        no longer waits for the whole slice to reach the disk (one association +21%
        here). With several at once the interpreter is what they wait for, and the
        writes and hand-overs to the disk as each fragment arrives are a dozen more
        releases and re-takings of it per instance (four associations 5 to 15% slower,
        in two measures). And only
        while a whole data set held in memory would still leave the disk above the
        free-space watermark, the check the C-STORE makes once it is in.
        """
        if self._slots.held() > 1:
            return False
        watermark = self.settings.limits.min_free_disk_mb * 1024 * 1024
        try:
            return self.spool.free_bytes() - SPILL_ABOVE >= watermark
        except OSError:
            return False

    def start(self) -> None:
        """Start serving on the configured address, in background threads."""
        node = self.settings.node
        receive_to_files(self.spool.incoming, write_through=self._room_to_write_through)
        # pynetdicom annotates start_server's result as optional: it is None only with block=True
        self._server = cast(
            ThreadedAssociationServer,
            self.ae.start_server(
                (node.host, node.port),
                block=False,
                evt_handlers=self.handlers(),
                ssl_context=self._ssl_context,
            ),
        )
        # socketserver listens with a backlog of 5: in a burst of connections the 6th and
        # later wait for the peer's SYN retry (1 s, then 3 s), however fast they would be
        # refused or served. Listening again only raises the backlog (Linux, BSD).
        assert self._server.socket is not None  # pynetdicom sets it to None once closed
        self._server.socket.listen(LISTEN_BACKLOG)
        self._reaper.start()
        log.info(
            "listening as %s on %s:%d%s",
            node.ae_title,
            node.host,
            self.port,
            " (DICOM TLS)" if self.tls else "",
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def stop(self) -> None:
        self._reaper.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()
        self.storage.close()
        stop_receiving_to_files()

    # -- handlers ---------------------------------------------------------------------
    def _log_assoc(self, event: evt.Event, what: str) -> None:
        req = event.assoc.requestor
        log.info("association %s: %s from %s:%s", what, req.ae_title, req.address, req.port)

    def _log_rejected(self, event: evt.Event) -> None:
        req, rj = event.assoc.requestor, _primitive(event.assoc.acceptor)
        self._refused(event.assoc, f"{rj.reason_str} ({rj.result_str}, {rj.source_str})")
        request = _primitive(req)
        log.warning(
            "association rejected (%s, %s): %s; %r calling %r from %s",
            rj.result_str,
            rj.source_str,
            rj.reason_str,
            request.calling_ae_title,
            request.called_ae_title,
            req.address,
        )

    def handle_connection(self, event: evt.Event) -> None:
        """Bound a new connection: per address, in time and in size; complete its TLS
        handshake.

        A source address holding ``max_associations_per_address`` connections already is
        answered with an A-ASSOCIATE-RJ (transient, local limit exceeded) before anything
        it sent is read. Otherwise the connection's reads get the deadlines and the P-DATA
        size limit of :mod:`dicom_node.intake.connections`, each read also bounded by
        ``network_timeout`` (pynetdicom leaves accepted sockets blocking without one), and
        the association is tuned to answer without polling delays (:func:`~dicom_node.intake.pynetdicom_tuning.tune_association`).

        On a TLS port the handshake is done here, in the connection's own thread (see
        :mod:`dicom_node.common.tls`), within ``association_deadline_seconds``, so that a peer
        without a valid certificate, or one speaking plain DICOM to the TLS port, is refused
        with one log line before any DICOM is read.
        """
        assoc_socket = event.assoc.dul.socket
        if assoc_socket is None or assoc_socket.socket is None:
            return
        sock = assoc_socket.socket
        limits = self.settings.limits
        address = str(event.address[0])  # type: ignore[attr-defined]  # set for EVT_CONN_OPEN
        if not self._per_address.admit(event.assoc, address):
            self.events.emit(
                AssociationRefused(address, None, "limits.max_associations_per_address")
            )
            connections.reject_unread(assoc_socket, sock)
            return
        if self._per_address.pending() > limits.max_pending_connections:
            log.warning(
                "association rejected (transient, local limit exceeded): %d connections "
                "not yet associated (limits.max_pending_connections); %s refused",
                limits.max_pending_connections,
                address,
            )
            self._per_address.forget(event.assoc)
            self.events.emit(AssociationRefused(address, None, "limits.max_pending_connections"))
            connections.reject_unread(assoc_socket, sock)
            return
        sock.settimeout(limits.network_timeout)
        tune_association(event.assoc)
        connections.install(event.assoc, limits, address, self.spool.free_bytes)
        if not isinstance(sock, ssl.SSLSocket):
            return
        try:
            connections.handshake_within(sock, limits.association_deadline_seconds)
        except (ssl.SSLError, OSError) as exc:
            if isinstance(exc, ssl.SSLEOFError):  # a port probe: connected, said nothing
                log.info("connection from %s closed before TLS began", address)
            else:
                reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
                log.warning("TLS connection from %s refused: %s", address, reason)
                self.events.emit(AssociationRefused(address, None, f"TLS: {reason}"))
            # Closing queues "transport closed" for the DUL: the association ends before
            # it starts, without pynetdicom reading from the broken socket, nor waiting
            # acse_timeout for a request.
            assoc_socket.close()
            event.assoc.acse_timeout = 0

    def _connection_closed(self, event: evt.Event) -> None:
        self._per_address.forget(event.assoc)
        self._slots.release(event.assoc)
        discard_partial(event.assoc)

    def _release_slot(self, event: evt.Event) -> None:
        self._slots.release(event.assoc)

    def handle_requested(self, event: evt.Event) -> None:
        """Access control on the source address, before negotiation.

        The calling and called AE titles are checked by pynetdicom during negotiation
        (see :meth:`_make_ae`). PS3.8 has no rejection reason for a source address, so an
        address that is not allowed gets a permanent rejection with no reason given.
        """
        assoc = event.assoc
        address = assoc.requestor.address
        request = _primitive(assoc.requestor)
        subject = peer_certificate_subject(assoc.dul.socket.socket if assoc.dul.socket else None)
        if subject is not None:
            log.info("TLS peer %s presents certificate %r", address, subject)
        if not assoc.requestor.requested_contexts:
            # PS3.8 9.3.2: a request holds one or more presentation contexts; one without
            # any could only hold a slot until the network timeout.
            log.warning(
                "association rejected: no presentation context requested (%r calling %r from %s)",
                request.calling_ae_title,
                request.called_ae_title,
                address,
            )
            assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_NO_REASON)
            assoc.kill()
            self._refused(assoc, "no presentation context requested")
            return
        if not connections.address_allowed(address, self._networks):
            log.warning(
                "association rejected: source address %s is not in node.allowed_hosts "
                "(%r calling %r)",
                address,
                request.calling_ae_title,
                request.called_ae_title,
            )
            # As pynetdicom does for its own rejections: send, then stop the association's
            # threads once the A-ASSOCIATE-RJ is out.
            assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_NO_REASON)
            assoc.kill()
            self._refused(assoc, "source address not in node.allowed_hosts")
            return
        refusal = self._slots.acquire(assoc, address)
        if refusal:
            log.warning(
                "association rejected (transient, local limit exceeded): %s; %r calling %r from %s",
                refusal,
                request.calling_ae_title,
                request.called_ae_title,
                address,
            )
            assoc.acse.send_reject(
                REJECTED_TRANSIENT, SOURCE_PROVIDER_PRESENTATION, REASON_LOCAL_LIMIT
            )
            assoc.kill()
            self._refused(assoc, refusal)

    def _refused(self, assoc: Association, reason: str) -> None:
        calling = str(_primitive(assoc.requestor).calling_ae_title).strip()
        self.events.emit(AssociationRefused(assoc.requestor.address, calling, reason))

    def _release_requested(self, event: evt.Event) -> None:
        """The peer asks to release: the rows of what it stored are committed before it is
        answered (they are written behind, a few instances at a time), so that a sender
        that has its release response finds its instances in the job database. A database
        locked meanwhile delays the answer by :data:`RELEASE_SETTLE_SECONDS` at most."""
        primitive = getattr(event, "primitive", None)
        if isinstance(primitive, A_RELEASE) and primitive.result is None:
            self.jobs.instances.settle(RELEASE_SETTLE_SECONDS)

    def handle_released(self, event: evt.Event) -> None:
        """A normal release: emit the series this association stored.

        pynetdicom triggers ``EVT_RELEASED`` on the association's thread after its last
        C-STORE was answered and after the A-RELEASE-RP went out, so the peer never waits
        for what the node does with it. The association is forgotten first: a series it
        carried is then no longer "open" when the node looks.
        """
        series = self._forget_association(event)
        if series:
            self.events.emit(
                AssociationReleased(
                    carried={uid: frozenset(sops) for uid, sops in series.items()},
                    still_open=frozenset(self.open_series()),
                )
            )
        self._ended(event, aborted=False)

    def _aborted(self, event: evt.Event) -> None:
        self._forget_association(event)
        self._ended(event, aborted=True)

    def _ended(self, event: evt.Event, aborted: bool) -> None:
        # the peer: the requestor, or for a C-GET the node opened, the PACS it asked
        peer = event.assoc.acceptor if event.assoc.is_requestor else event.assoc.requestor
        self.events.emit(AssociationEnded(id(event.assoc), peer.ae_title, peer.address, aborted))

    def _forget_association(self, event: evt.Event) -> dict[str, set[str]]:
        """Drop the bookkeeping of an association that ended (aborts: nothing more)."""
        discard_partial(event.assoc)  # an abort mid-transfer leaves a partial data set
        self._slots.release(event.assoc)
        with self._carried_lock:
            return self._carried.pop(event.assoc, {})

    def handle_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def handle_store(self, event: evt.Event) -> int | tuple[int, Dataset]:
        """Validate, write durably, record, answer."""
        self._slots.touch(event.assoc, busy=True)
        try:
            return self._answer_store(event)
        finally:
            self._slots.touch(event.assoc, busy=False)

    def _answer_store(self, event: evt.Event) -> int | tuple[int, Dataset]:
        try:
            outcome = self._store(event)
        except StoreRefused as exc:
            outcome = StoreOutcome(status=exc.status, reason=exc.reason)
            log.warning(
                "C-STORE refused (0x%04X) from %s: %s",
                exc.status,
                event.assoc.requestor.ae_title,
                exc.reason,
            )
        except OSError as exc:  # the disk said no: nothing was acknowledged
            outcome = StoreOutcome(status=OUT_OF_RESOURCES, reason=f"cannot write: {exc}")
            log.error("C-STORE refused (0xA700): cannot write the instance: %s", exc)
        except sqlite3.Error as exc:  # the database said no (locked, full, read-only)
            outcome = StoreOutcome(status=OUT_OF_RESOURCES, reason=f"cannot record: {exc}")
            log.error("C-STORE refused (0xA700): cannot record the instance: %s", exc)
        if outcome.status == SUCCESS and outcome.series_uid:
            with self._carried_lock:
                carried = self._carried.setdefault(event.assoc, {})
                carried.setdefault(outcome.series_uid, set()).add(outcome.sop_uid)
        outcome.association = id(event.assoc)  # the key of its AssociationEnded
        self.events.emit(outcome)
        # subscribers are done with it: its pixel data may go
        outcome.dataset = outcome.subject = None
        if outcome.status != SUCCESS and outcome.reason:
            status = Dataset()
            status.Status = outcome.status
            status.ErrorComment = outcome.reason[:64]
            return status  # type: ignore[return-value]
        return outcome.status

    def _store(self, event: evt.Event) -> StoreOutcome:
        context = event.context
        check_sop_class(context.abstract_syntax)
        return self.storage.store(
            Received.from_event(event),
            context.abstract_syntax,
            context.transfer_syntax,
            # pynetdicom annotates Event.request as any request; an EVT_C_STORE's is a C_STORE
            affected_uid=str(cast(C_STORE, event.request).AffectedSOPInstanceUID or ""),
            # the peer's: the acceptor where the node retrieves with C-GET
            calling_ae=(
                event.assoc.acceptor if event.assoc.is_requestor else event.assoc.requestor
            ).ae_title.strip(),
        )
