"""The audit trail: DICOM audit messages (PS3.15 A.5) to a local file and a syslog collector.

Hospitals keep, under IHE ATNA, a record of who sent which study, who fetched or viewed
which results, and which connections were refused and why. This module builds those
records as the DICOM Audit Message Schema (PS3.15 A.5.1) has them, one typed builder per
message of PS3.15 A.5.3 the node can report:

* :func:`application_activity` (A.5.3.1, 110100): the node started or stopped;
* :func:`begin_transferring` (A.5.3.3, 110102) and :func:`instances_transferred`
  (A.5.3.4, 110104): a study received (action C), exported or fetched (action R);
* :func:`instances_accessed` (A.5.3.5, 110103): results read on a status page or the viewer;
* :func:`security_alert` (A.5.3.11, 110113): an association refused, a TLS handshake failed;
* :func:`user_authentication` (A.5.3.13, 110114): a status-page login, accepted or refused.

:class:`AuditLogger` writes each message to a local file, one message per line, and sends
it to a syslog collector as an RFC 5424 message (facility authpriv, severity notice,
MSGID ``IHE+RFC-3881``, as IHE ITI TF-2 3.20 has it) over UDP (RFC 5426) or TLS (RFC 5425,
octet-counting framing). The caller never waits: :meth:`AuditLogger.log` puts the message
on a bounded queue and returns; one thread writes the file, another sends. While the
collector is down or slow, messages wait in a bounded backlog (``backlog`` messages, the
oldest dropped first and counted in one log line) and go out, in order, once it answers
again; the local file has every message either way. Only a queue full of messages the file
writer has not yet written (the disk stalled) drops a message unwritten, again counted.

Audit messages name the patient, as PS3.15 requires (a study's Patient participant object):
they go to the audit file and the collector only, never to the node's own log.

The hook points the node calls (start/stop, an association's end, a refused association,
an export, a status-page login, a page or viewer access) are the ``on_*`` methods of
:class:`AuditTrail`, which knows the node's own identity and fills the participants in.
"""

from __future__ import annotations

import collections
import datetime as _dt
import enum
import ipaddress
import logging
import os
import queue
import socket
import ssl
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.config import AuditSettings, Destination

if TYPE_CHECKING:
    from dicom_node.export.sender import ExportStarted, ResultSent
    from dicom_node.intake.events import AssociationEnded, AssociationRefused, StoreOutcome

log = logging.getLogger("dicom_node.service.audit")

__all__ = [
    "LOGIN_INTERVAL_SECONDS",
    "Action",
    "AssociationLedger",
    "AuditLogger",
    "AuditMessage",
    "AuditTrail",
    "Code",
    "Outcome",
    "Participant",
    "ParticipantObject",
    "PatientRef",
    "StudyRef",
    "application_activity",
    "begin_transferring",
    "instances_accessed",
    "instances_transferred",
    "read_subject",
    "security_alert",
    "syslog_frame",
    "user_authentication",
]


# -- codes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Code:
    """A coded value of the audit schema (``csd-code``, ``codeSystemName``, ``originalText``)."""

    value: str
    scheme: str
    meaning: str


def _dcm(value: str, meaning: str) -> Code:
    return Code(value, "DCM", meaning)


class EventID:
    """DCID 400 "Audit Event ID" (PS3.16), the events this node reports."""

    APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
    BEGIN_TRANSFERRING = _dcm("110102", "Begin Transferring DICOM Instances")
    INSTANCES_ACCESSED = _dcm("110103", "DICOM Instances Accessed")
    INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
    SECURITY_ALERT = _dcm("110113", "Security Alert")
    USER_AUTHENTICATION = _dcm("110114", "User Authentication")


class EventType:
    """DCID 401 "Audit Event Type Code" (PS3.16), those used here."""

    APPLICATION_START = _dcm("110120", "Application Start")
    APPLICATION_STOP = _dcm("110121", "Application Stop")
    LOGIN = _dcm("110122", "Login")
    LOGOUT = _dcm("110123", "Logout")
    NODE_AUTHENTICATION = _dcm("110126", "Node Authentication")
    USE_OF_RESTRICTED_FUNCTION = _dcm("110132", "Use of Restricted Function")


class Role:
    """DCID 402 "Audit Active Participant Role ID Code" (PS3.16)."""

    APPLICATION = _dcm("110150", "Application")
    APPLICATION_LAUNCHER = _dcm("110151", "Application Launcher")
    DESTINATION = _dcm("110152", "Destination Role ID")
    SOURCE = _dcm("110153", "Source Role ID")


class ObjectIDType:
    """DCID 404 "Audit Participant Object ID Type Code" and RFC 3881's, those used here."""

    STUDY_INSTANCE_UID = _dcm("110180", "Study Instance UID")
    NODE_ID = _dcm("110182", "Node ID")
    PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
    URI = Code("12", "RFC-3881", "URI")


class Action(enum.StrEnum):
    """EventActionCode."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class Outcome(enum.IntEnum):
    """EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


# -- the message ---------------------------------------------------------------------------
def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a process or person taking part in the event.

    For a DICOM application entity ``user_id`` is its AE title and ``alternative_user_id``
    reads ``AETITLES=<title>`` (PS3.15 A.5.2.2); ``address`` is its IP address or host name.
    """

    user_id: str
    requestor: bool
    roles: tuple[Code, ...] = ()
    alternative_user_id: str | None = None
    user_name: str | None = None
    address: str | None = None

    @classmethod
    def application_entity(
        cls, ae_title: str, address: str | None, role: Code | None, requestor: bool
    ) -> Participant:
        title = ae_title.strip() or "(none)"
        return cls(
            user_id=title,
            requestor=requestor,
            roles=(role,) if role else (),
            alternative_user_id=f"AETITLES={title}",
            address=address,
        )


@dataclass(frozen=True)
class PatientRef:
    """The patient of a study: Patient ID and, when known, the name (PS3.15 A.5.3)."""

    patient_id: str
    name: str = ""


@dataclass(frozen=True)
class StudyRef:
    """A study and, per SOP Class UID, the instances of it the event concerned."""

    study_uid: str
    instances: Mapping[str, int] = field(default_factory=dict)
    accession: str = ""


@dataclass(frozen=True)
class ParticipantObject:
    """A ParticipantObjectIdentification: a study, a patient, a node, a user account."""

    object_id: str
    id_type: Code
    type_code: int
    role: int
    name: str
    life_cycle: int | None = None
    study: StudyRef | None = None  # a ParticipantObjectDescription of SOP classes
    details: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def of_study(cls, study: StudyRef, life_cycle: int | None = None) -> ParticipantObject:
        # ParticipantObjectName is required where there is no query (A.5.3.3 and after:
        # MC); a study has no name of its own, so it is named by its UID.
        return cls(
            study.study_uid,
            ObjectIDType.STUDY_INSTANCE_UID,
            type_code=2,
            role=3,
            name=study.study_uid,
            life_cycle=life_cycle,
            study=study,
        )

    @classmethod
    def of_patient(cls, patient: PatientRef) -> ParticipantObject:
        return cls(
            patient.patient_id or "(none)",
            ObjectIDType.PATIENT_NUMBER,
            type_code=1,
            role=1,
            name=patient.name or patient.patient_id or "(none)",
        )

    @classmethod
    def of_node(cls, address: str, name: str) -> ParticipantObject:
        """A network node, the subject of a security alert (A.5.3.11)."""
        return cls(address or "(unknown)", ObjectIDType.NODE_ID, 2, 13, name or address)

    @classmethod
    def of_uri(cls, uri: str, role: int = 13) -> ParticipantObject:
        """A web resource (a page, the viewer's API)."""
        return cls(uri, ObjectIDType.URI, 2, role, uri)


@dataclass(frozen=True)
class AuditSource:
    """AuditSourceIdentification: who reports (AuditSourceTypeCode 4: application server)."""

    source_id: str
    site_id: str = ""
    type_code: str = "4"


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _clean(text: str) -> str:
    """Text without control characters (one message per line; XML 1.0 forbids most)."""
    return "".join(c if c >= " " and c != "\x7f" else " " for c in text)


@dataclass(frozen=True)
class AuditMessage:
    """One DICOM audit message (PS3.15 A.5.1); :meth:`to_xml` writes it."""

    event_id: Code
    action: Action
    outcome: Outcome
    participants: tuple[Participant, ...]
    source: AuditSource
    objects: tuple[ParticipantObject, ...] = ()
    event_types: tuple[Code, ...] = ()
    description: str = ""
    time: _dt.datetime = field(default_factory=_now)

    def to_xml(self) -> bytes:
        """The message as UTF-8 XML on one line, without an XML declaration."""
        root = ET.Element("AuditMessage")
        event = ET.SubElement(
            root,
            "EventIdentification",
            {
                "EventActionCode": self.action.value,
                "EventDateTime": self.time.astimezone(_dt.UTC).isoformat(timespec="milliseconds"),
                "EventOutcomeIndicator": str(int(self.outcome)),
            },
        )
        _code(event, "EventID", self.event_id)
        for code in self.event_types:
            _code(event, "EventTypeCode", code)
        if self.description:
            ET.SubElement(event, "EventOutcomeDescription").text = _clean(self.description)
        for p in self.participants:
            attrs = {"UserID": _clean(p.user_id) or "(none)"}
            if p.alternative_user_id:
                attrs["AlternativeUserID"] = _clean(p.alternative_user_id)
            if p.user_name:
                attrs["UserName"] = _clean(p.user_name)
            attrs["UserIsRequestor"] = "true" if p.requestor else "false"
            if p.address:
                attrs["NetworkAccessPointID"] = _clean(p.address)
                attrs["NetworkAccessPointTypeCode"] = "2" if _is_ip(p.address) else "1"
            element = ET.SubElement(root, "ActiveParticipant", attrs)
            for role in p.roles:
                _code(element, "RoleIDCode", role)
        source_attrs = {"AuditSourceID": _clean(self.source.source_id)}
        if self.source.site_id:
            source_attrs["AuditEnterpriseSiteID"] = _clean(self.source.site_id)
        source = ET.SubElement(root, "AuditSourceIdentification", source_attrs)
        ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": self.source.type_code})
        for obj in self.objects:
            attrs = {
                "ParticipantObjectID": _clean(obj.object_id),
                "ParticipantObjectTypeCode": str(obj.type_code),
                "ParticipantObjectTypeCodeRole": str(obj.role),
            }
            if obj.life_cycle is not None:
                attrs["ParticipantObjectDataLifeCycle"] = str(obj.life_cycle)
            element = ET.SubElement(root, "ParticipantObjectIdentification", attrs)
            _code(element, "ParticipantObjectIDTypeCode", obj.id_type)
            ET.SubElement(element, "ParticipantObjectName").text = _clean(obj.name) or "(none)"
            for kind, value in obj.details:
                ET.SubElement(
                    element,
                    "ParticipantObjectDetail",
                    {"type": kind, "value": _b64(value)},
                )
            if obj.study is not None and obj.study.instances:
                description = ET.SubElement(element, "ParticipantObjectDescription")
                if obj.study.accession:
                    ET.SubElement(description, "Accession", {"Number": _clean(obj.study.accession)})
                for sop_class, count in sorted(obj.study.instances.items()):
                    ET.SubElement(
                        description,
                        "SOPClass",
                        {"UID": sop_class, "NumberOfInstances": str(int(count))},
                    )
        return ET.tostring(root, encoding="utf-8", xml_declaration=False)


def _code(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(
        parent,
        tag,
        {"csd-code": code.value, "codeSystemName": code.scheme, "originalText": code.meaning},
    )


def _b64(value: bytes) -> str:
    import base64

    return base64.b64encode(value).decode("ascii")


# -- builders (PS3.15 A.5.3) ---------------------------------------------------------------
def application_activity(
    source: AuditSource,
    application: Participant,
    started: bool,
    launcher: Participant | None = None,
    outcome: Outcome = Outcome.SUCCESS,
    description: str = "",
) -> AuditMessage:
    """A.5.3.1: the node started or stopped (EventActionCode E)."""
    app = Participant(
        application.user_id,
        application.requestor,
        (Role.APPLICATION,),
        application.alternative_user_id,
        application.user_name,
        application.address,
    )
    participants = (app,) if launcher is None else (app, launcher)
    return AuditMessage(
        EventID.APPLICATION_ACTIVITY,
        Action.EXECUTE,
        outcome,
        participants,
        source,
        event_types=(EventType.APPLICATION_START if started else EventType.APPLICATION_STOP,),
        description=description,
    )


def _transfer_objects(
    studies: Sequence[StudyRef], patient: PatientRef, life_cycle: int | None
) -> tuple[ParticipantObject, ...]:
    if not studies:
        raise ValueError("a transfer message names at least one study")
    return (
        *(ParticipantObject.of_study(s, life_cycle) for s in studies),
        ParticipantObject.of_patient(patient),
    )


def begin_transferring(
    source: AuditSource,
    sender: Participant,
    receiver: Participant,
    studies: Sequence[StudyRef],
    patient: PatientRef,
    outcome: Outcome = Outcome.SUCCESS,
    description: str = "",
) -> AuditMessage:
    """A.5.3.3: a transfer of one patient's instances begins (EventActionCode E)."""
    return AuditMessage(
        EventID.BEGIN_TRANSFERRING,
        Action.EXECUTE,
        outcome,
        (_with_role(sender, Role.SOURCE), _with_role(receiver, Role.DESTINATION)),
        source,
        _transfer_objects(studies, patient, None),
        description=description,
    )


def instances_transferred(
    source: AuditSource,
    sender: Participant,
    receiver: Participant,
    studies: Sequence[StudyRef],
    patient: PatientRef,
    action: Action,
    outcome: Outcome = Outcome.SUCCESS,
    description: str = "",
) -> AuditMessage:
    """A.5.3.4: instances of one patient were transferred.

    ``action``: C for instances the node received and stored, R for instances it sent
    (an export, or results fetched from it), U where it replaced instances it held.
    """
    life_cycle = {Action.CREATE: 2, Action.READ: 10}.get(action)
    return AuditMessage(
        EventID.INSTANCES_TRANSFERRED,
        action,
        outcome,
        (_with_role(sender, Role.SOURCE), _with_role(receiver, Role.DESTINATION)),
        source,
        _transfer_objects(studies, patient, life_cycle),
        description=description,
    )


def instances_accessed(
    source: AuditSource,
    accessor: Participant,
    studies: Sequence[StudyRef],
    patient: PatientRef | None,
    action: Action = Action.READ,
    outcome: Outcome = Outcome.SUCCESS,
    description: str = "",
) -> AuditMessage:
    """A.5.3.5: a user read (or changed) instances the node holds: a job page, the viewer."""
    objects: tuple[ParticipantObject, ...] = tuple(
        ParticipantObject.of_study(s, 6) for s in studies
    )
    if patient is not None:
        objects += (ParticipantObject.of_patient(patient),)
    return AuditMessage(
        EventID.INSTANCES_ACCESSED,
        action,
        outcome,
        (accessor,),
        source,
        objects,
        description=description,
    )


def security_alert(
    source: AuditSource,
    reporter: Participant,
    performer: Participant | None,
    subject: ParticipantObject,
    event_type: Code = EventType.NODE_AUTHENTICATION,
    outcome: Outcome = Outcome.MINOR_FAILURE,
    description: str = "",
) -> AuditMessage:
    """A.5.3.11: a security-relevant event: an association refused, a handshake failed.

    ``reporter`` is the node (not the requestor); ``performer`` is who attempted it (the
    requestor), where known; ``subject`` what it was attempted on. The outcome is that of
    the attempt: 4 (minor failure) for an attempt the node refused.
    """
    participants = (reporter,) if performer is None else (reporter, performer)
    return AuditMessage(
        EventID.SECURITY_ALERT,
        Action.EXECUTE,
        outcome,
        participants,
        source,
        (subject,),
        event_types=(event_type,),
        description=description,
    )


def user_authentication(
    source: AuditSource,
    user: Participant,
    authenticator: Participant,
    login: bool = True,
    outcome: Outcome = Outcome.SUCCESS,
    description: str = "",
) -> AuditMessage:
    """A.5.3.13: a user logged in (or out), or was refused (outcome 4)."""
    return AuditMessage(
        EventID.USER_AUTHENTICATION,
        Action.EXECUTE,
        outcome,
        (user, authenticator),
        source,
        event_types=(EventType.LOGIN if login else EventType.LOGOUT,),
        description=description,
    )


def _with_role(p: Participant, role: Code) -> Participant:
    return Participant(
        p.user_id, p.requestor, (role,), p.alternative_user_id, p.user_name, p.address
    )


# -- syslog ----------------------------------------------------------------------------------
#: PRI of an audit message: facility 10 (security/authorization), severity 5 (notice).
SYSLOG_PRI = 10 * 8 + 5
#: MSGID of an ATNA audit message (IHE ITI TF-2 3.20.6.1).
SYSLOG_MSGID = "IHE+RFC-3881"
_BOM = b"\xef\xbb\xbf"


def _header_field(value: str, limit: int) -> str:
    """A syslog header field: printable US-ASCII, no space, at most ``limit`` long, or ``-``."""
    cleaned = "".join(c for c in value if "!" <= c <= "~")[:limit]
    return cleaned or "-"


def syslog_frame(
    message: AuditMessage, app_name: str, hostname: str | None = None, procid: int | None = None
) -> bytes:
    """The RFC 5424 SYSLOG-MSG carrying ``message`` (no transport framing).

    ``<85>1 TIMESTAMP HOSTNAME APP-NAME PROCID IHE+RFC-3881 - BOM<AuditMessage .../>``
    """
    stamp = message.time.astimezone(_dt.UTC).isoformat(timespec="microseconds")
    stamp = stamp.replace("+00:00", "Z")
    header = " ".join(
        (
            f"<{SYSLOG_PRI}>1",
            stamp,
            _header_field(hostname or socket.gethostname(), 255),
            _header_field(app_name, 48),
            _header_field(str(os.getpid() if procid is None else procid), 128),
            SYSLOG_MSGID,
            "-",
        )
    )
    return header.encode("ascii") + b" " + _BOM + message.to_xml()


def _client_context(settings: AuditSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(
        cafile=str(settings.ca_certificates) if settings.ca_certificates else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.certificate is not None:
        context.load_cert_chain(
            str(settings.certificate),
            str(settings.private_key) if settings.private_key else None,
        )
    return context


class _Sender:
    """Sends syslog frames to the collector from a thread of its own, with a backlog.

    Over TLS the connection is kept and opened again after a failure, waiting a second,
    then twice as long each time up to a minute, so a collector that is down costs one
    connection attempt per wait. Over UDP a datagram that cannot be sent is dropped (UDP
    gives no acknowledgement to wait for anyway).
    """

    def __init__(self, settings: AuditSettings) -> None:
        self.settings = settings
        self._backlog: collections.deque[bytes] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._stop = threading.Event()  # interrupts a wait between connection attempts
        self._dropped = 0
        self._sock: socket.socket | None = None
        self._context = _client_context(settings) if settings.transport == "tls" else None
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="dicom-node-audit-send", daemon=True)
        self._thread.start()

    def put(self, frame: bytes) -> None:
        with self._cond:
            if len(self._backlog) >= max(self.settings.backlog, 1):
                self._backlog.popleft()
                self._dropped += 1
            self._backlog.append(frame)
            self._cond.notify()

    def _report_dropped(self, dropped: int) -> None:
        log.warning(
            "audit: %d message(s) dropped for the syslog collector %s:%d (not answering; "
            "the backlog holds %d); they are in the audit file",
            dropped,
            self.settings.syslog_host,
            self.settings.syslog_port,
            self.settings.backlog,
        )

    def _run(self) -> None:
        wait = 1.0
        while True:
            with self._cond:
                while not self._backlog and not self._closing:
                    self._cond.wait()
                if not self._backlog:
                    return  # closing, everything sent
                frame = self._backlog[0]
                dropped, self._dropped = self._dropped, 0
            if dropped:
                self._report_dropped(dropped)
            try:
                self._send(frame)
            except OSError as exc:
                self._disconnect()
                if self.settings.transport == "udp":
                    self._pop(frame)  # a datagram is not retried
                    continue
                log.warning(
                    "audit: syslog collector %s:%d: %s; retrying in %.0f s",
                    self.settings.syslog_host,
                    self.settings.syslog_port,
                    exc,
                    wait,
                )
                if self._stop.wait(wait):
                    return
                wait = min(wait * 2, 60.0)
                continue
            wait = 1.0
            self._pop(frame)
            self.sent += 1

    def _pop(self, frame: bytes) -> None:
        with self._cond:
            if self._backlog and self._backlog[0] is frame:
                self._backlog.popleft()
            self._cond.notify_all()

    def _send(self, frame: bytes) -> None:
        host, port = self.settings.syslog_host, self.settings.syslog_port
        if self.settings.transport == "udp":
            if self._sock is None:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                self._sock = socket.socket(family, socket.SOCK_DGRAM)
            self._sock.sendto(frame, (host, port))
            return
        if self._sock is None:
            raw = socket.create_connection((host, port), timeout=10)
            assert self._context is not None
            try:
                self._sock = self._context.wrap_socket(raw, server_hostname=host)
            except (OSError, ssl.SSLError):
                raw.close()
                raise
        # RFC 5425 4.3: octet counting, MSG-LEN SP SYSLOG-MSG.
        self._sock.sendall(str(len(frame)).encode("ascii") + b" " + frame)

    def _disconnect(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def flush(self, timeout: float) -> bool:
        """Wait until the backlog is sent, up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._backlog:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def close(self, timeout: float = 5.0) -> None:
        self.flush(timeout)
        self._stop.set()
        with self._cond:
            self._closing = True
            left = len(self._backlog)
            self._backlog.clear()
            dropped, self._dropped = self._dropped, 0
            self._cond.notify_all()
        if dropped:
            self._report_dropped(dropped)
        if left:
            log.warning(
                "audit: %d message(s) not delivered to the syslog collector at stop; they "
                "are in the audit file",
                left,
            )
        self._thread.join(timeout)
        self._disconnect()


class AuditLogger:
    """Writes audit messages to ``path`` (one per line) and sends them to the collector.

    :meth:`log` never blocks: the message is queued (``queue_size`` at most) for the writer
    thread, which appends it to the file (flushed per message) and hands it to the sender.
    """

    def __init__(self, settings: AuditSettings, path: Path | None, queue_size: int = 10000) -> None:
        self.settings = settings
        self.path = path
        self._queue: queue.Queue[AuditMessage | None] = queue.Queue(maxsize=queue_size)
        self._unwritten = 0
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._file = os.fdopen(fd, "ab")
        self._sender = _Sender(settings) if settings.syslog_host else None
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(
            target=self._run, name="dicom-node-audit-write", daemon=True
        )
        self._thread.start()

    def log(self, message: AuditMessage) -> None:
        """Queue ``message``; never waits (a full queue drops it, counted and logged)."""
        self._idle.clear()
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self._unwritten += 1
            if self._unwritten in (1, 10, 100) or self._unwritten % 1000 == 0:
                log.error(
                    "audit: %d message(s) dropped: the audit writer is not keeping up "
                    "(the disk of %s stalled?)",
                    self._unwritten,
                    self.path,
                )

    def _run(self) -> None:
        while (message := self._queue.get()) is not None:
            frame = syslog_frame(message, self.settings.app_name)
            if self._file is not None:
                try:
                    self._file.write(message.to_xml() + b"\n")
                    self._file.flush()
                except OSError as exc:
                    log.error("audit: cannot write %s: %s", self.path, exc)
            if self._sender is not None:
                self._sender.put(frame)
            if self._queue.empty():
                self._idle.set()
        self._idle.set()

    @property
    def sent(self) -> int:
        """Messages the collector has been handed (sent over UDP, written over TLS)."""
        return self._sender.sent if self._sender is not None else 0

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every message logged so far is written and sent (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        if not self._idle.wait(timeout):
            return False
        if self._sender is None:
            return True
        return self._sender.flush(max(deadline - time.monotonic(), 0.0))

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, try to send the backlog for ``timeout`` seconds, stop."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._sender is not None:
            self._sender.close(timeout)
        if self._file is not None:
            try:
                os.fsync(self._file.fileno())
            except OSError:
                pass
            self._file.close()
            self._file = None


# -- the node's hook points ----------------------------------------------------------------
#: A login, for HTTP authentication (which has no sessions): the first accepted request of
#: a user from an address after this many seconds without one.
LOGIN_INTERVAL_SECONDS = 600.0
#: Refusals (associations, logins) from one address for one reason: at most one message
#: in this many seconds, the next counting the others.
REFUSAL_INTERVAL_SECONDS = 1.0
#: Studies whose patient is remembered from what the node received, for access messages.
_PATIENTS_KEPT = 10000
#: What a result's or instance's header gives an audit message.
_HEADER_TAGS = ["PatientID", "PatientName", "StudyInstanceUID", "SOPClassUID"]


class _RateLimit:
    """At most one event per key in ``interval`` seconds; counts the ones left out."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[tuple[str, ...], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def allow(self, key: tuple[str, ...]) -> tuple[bool, int]:
        """Whether to report now, and how many events since the last report were not."""
        now = time.monotonic()
        with self._lock:
            last, since = self._last.get(key, (float("-inf"), 0))
            if now - last < self.interval:
                self._last[key] = (last, since + 1)
                return False, since + 1
            self._last[key] = (now, 0)
            if len(self._last) > 10000:  # forget keys not heard of for a while
                keep = max(60.0, self.interval)
                self._last = {k: v for k, v in self._last.items() if now - v[0] < keep}
            return True, since


def read_subject(path: Path) -> tuple[PatientRef, StudyRef] | None:
    """The patient and study (with the instance's SOP class) of a DICOM file's header, or
    ``None`` when it cannot be read."""
    import pydicom  # only where messages are made

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (OSError, ValueError) as exc:
        log.warning("audit: cannot read the header of %s: %s", path, exc)
        return None
    patient = PatientRef(str(ds.get("PatientID", "") or ""), str(ds.get("PatientName", "") or ""))
    sop_class = str(ds.get("SOPClassUID", "") or "")
    study = StudyRef(str(ds.get("StudyInstanceUID", "") or ""), {sop_class: 1} if sop_class else {})
    return patient, study


class AuditTrail:
    """The node's audit hooks: each ``on_*`` builds the message and logs it, never waiting.

    ``ae_title`` and ``address`` identify the node as a participant; ``logger`` is ``None``
    when auditing is off, and every hook then does nothing (nor reads anything).
    ``study_evidence``, when given, names a file of a study the node holds (for the patient
    of an access message when the study was not received since the start).
    """

    def __init__(
        self,
        logger: AuditLogger | None,
        ae_title: str,
        address: str | None = None,
        site_id: str = "",
        study_evidence: Callable[[str], Path | None] | None = None,
    ) -> None:
        self.logger = logger
        self.ae_title = ae_title
        self.address = address or socket.gethostname()
        self.source = AuditSource(f"{ae_title}@{socket.gethostname()}", site_id)
        self.study_evidence = study_evidence
        self._refusals = _RateLimit(REFUSAL_INTERVAL_SECONDS)
        self._logins = _RateLimit(LOGIN_INTERVAL_SECONDS)
        self._patients: collections.OrderedDict[str, PatientRef] = collections.OrderedDict()
        self._patients_lock = threading.Lock()

    @classmethod
    def from_settings(
        cls,
        settings: AuditSettings,
        data_dir: Path,
        ae_title: str,
        address: str | None = None,
        study_evidence: Callable[[str], Path | None] | None = None,
    ) -> AuditTrail:
        """The trail ``[audit]`` asks for: its file relative to ``data_dir`` unless
        absolute; with ``enabled = false`` a trail whose hooks do nothing."""
        if not settings.enabled:
            return cls(None, ae_title, address)
        path = settings.file if settings.file.is_absolute() else data_dir / settings.file
        logger = AuditLogger(settings, path)
        return cls(logger, ae_title, address, settings.site_id, study_evidence)

    @property
    def enabled(self) -> bool:
        return self.logger is not None

    def _node(self, role: Code | None, requestor: bool) -> Participant:
        return Participant.application_entity(self.ae_title, self.address, role, requestor)

    def _log(self, message: AuditMessage) -> None:
        if self.logger is not None:
            self.logger.log(message)

    def remember_patient(self, study_uid: str, patient: PatientRef) -> None:
        """The patient of a study the node received (for later access messages)."""
        with self._patients_lock:
            self._patients[study_uid] = patient
            self._patients.move_to_end(study_uid)
            while len(self._patients) > _PATIENTS_KEPT:
                self._patients.popitem(last=False)

    def _patient_of(self, study_uid: str, evidence: Path | None) -> PatientRef | None:
        with self._patients_lock:
            known = self._patients.get(study_uid)
        if known is not None:
            return known
        if evidence is None and self.study_evidence is not None and study_uid:
            evidence = self.study_evidence(study_uid)
        subject = read_subject(evidence) if evidence is not None else None
        if subject is None:
            return None
        self.remember_patient(study_uid, subject[0])
        return subject[0]

    # start and stop
    def on_start(self) -> None:
        """The node is listening (call once, after the SCP started)."""
        self._log(application_activity(self.source, self._node(None, False), started=True))

    def on_stop(self) -> None:
        """The node is stopping (call first in its stop), then :meth:`close`."""
        self._log(application_activity(self.source, self._node(None, False), started=False))

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued and give the collector up to ``timeout`` seconds."""
        if self.logger is not None:
            self.logger.close(timeout)

    # DICOM
    def on_received(
        self,
        calling_ae: str,
        address: str,
        studies: Iterable[tuple[PatientRef, StudyRef]],
        outcome: Outcome = Outcome.SUCCESS,
        description: str = "",
    ) -> None:
        """An association that stored instances ended: one message per patient (A.5.3.4
        allows one patient per message), action C. ``outcome`` 4 for an aborted one."""
        sender = Participant.application_entity(calling_ae, address, None, True)
        for patient, group in _by_patient(studies).items():
            for study in group:
                self.remember_patient(study.study_uid, patient)
            self._log(
                instances_transferred(
                    self.source,
                    sender,
                    self._node(None, False),
                    group,
                    patient,
                    Action.CREATE,
                    outcome,
                    description,
                )
            )

    def on_export(
        self,
        destination_ae: str,
        destination_address: str,
        patient: PatientRef,
        study: StudyRef,
        outcome: Outcome = Outcome.SUCCESS,
        description: str = "",
        begin: bool = False,
    ) -> None:
        """Results sent to a destination (``begin``: the transfer starts; A.5.3.3)."""
        receiver = Participant.application_entity(destination_ae, destination_address, None, False)
        node = self._node(None, True)
        if begin:
            self._log(begin_transferring(self.source, node, receiver, [study], patient))
            return
        self._log(
            instances_transferred(
                self.source, node, receiver, [study], patient, Action.READ, outcome, description
            )
        )

    def on_export_started(self, started: ExportStarted) -> None:
        """Subscribed to the exporter's :class:`~dicom_node.export.sender.ExportStarted`:
        a Begin Transferring per patient and study of the batch."""
        if self.logger is None:
            return
        peer, address = _destination_peer(started.destination)
        grouped: dict[tuple[PatientRef, str], dict[str, int]] = {}
        for path in started.paths:
            subject = read_subject(path)
            if subject is None:
                continue
            patient, study = subject
            counts = grouped.setdefault((patient, study.study_uid), {})
            for sop_class, n in study.instances.items():
                counts[sop_class] = counts.get(sop_class, 0) + n
        for (patient, study_uid), counts in grouped.items():
            self.on_export(peer, address, patient, StudyRef(study_uid, counts), begin=True)

    def on_result_sent(self, sent: ResultSent) -> None:
        """Subscribed to the exporter's :class:`~dicom_node.export.sender.ResultSent`: a
        DICOM Instances Transferred (R) per result acknowledged, or given up on."""
        if self.logger is None:
            return
        subject = read_subject(sent.path)
        if subject is None:
            return
        peer, address = _destination_peer(sent.destination)
        outcome = Outcome.MINOR_FAILURE if sent.error else Outcome.SUCCESS
        self.on_export(peer, address, subject[0], subject[1], outcome, sent.error)

    def on_association_refused(self, calling_ae: str | None, address: str, reason: str) -> None:
        """A connection or association the node refused (address, AE title, limit, TLS).

        At most one message per address and reason a second, however fast a host floods;
        the next one says how many refusals it stands for.
        """
        if self.logger is None:
            return
        report, since = self._refusals.allow(("association", address, reason))
        if not report:
            return
        if since:
            reason = f"{reason} ({since} more refused since the last message)"
        performer = (
            Participant.application_entity(calling_ae, address, None, True)
            if calling_ae is not None
            else Participant(address or "(unknown)", True, address=address or None)
        )
        self._log(
            security_alert(
                self.source,
                self._node(None, False),
                performer,
                ParticipantObject.of_node(address, calling_ae or address),
                description=reason,
            )
        )

    def on_refused(self, refused: AssociationRefused) -> None:
        """Subscribed to intake's :class:`~dicom_node.intake.events.AssociationRefused`."""
        self.on_association_refused(refused.calling_ae, refused.address, refused.reason)

    def on_restricted_request(self, address: str, uri: str, reason: str) -> None:
        """A web request for something the node does not serve to it (a path outside the
        viewer's DICOMweb resources, another origin): Use of Restricted Function."""
        if self.logger is None:
            return
        report, since = self._refusals.allow(("restricted", address, reason))
        if not report:
            return
        if since:
            reason = f"{reason} ({since} more refused since the last message)"
        self._log(
            security_alert(
                self.source,
                self._node(None, False),
                Participant(address or "(unknown)", True, address=address or None),
                ParticipantObject.of_uri(uri[:1024] or "/"),
                event_type=EventType.USE_OF_RESTRICTED_FUNCTION,
                description=reason,
            )
        )

    # HTTP
    def on_login(self, user: str, address: str, accepted: bool, reason: str = "") -> None:
        """A request to the status pages with credentials, accepted or refused.

        Accepted: a User Authentication (Login) the first time a user comes from an
        address in :data:`LOGIN_INTERVAL_SECONDS`. Refused: a User Authentication that
        failed (outcome 4) and a Security Alert (Use of Restricted Function), at most one
        of each a second per address, the next counting the others.
        """
        if self.logger is None:
            return
        if accepted:
            if not self._logins.allow(("login", user, address))[0]:
                return
        else:
            report, since = self._refusals.allow(("login", address))
            if not report:
                return
            if since:
                reason = f"{reason} ({since} more refused since the last message)"
        self._log(
            user_authentication(
                self.source,
                Participant(user or "(anonymous)", True, address=address or None),
                self._node(None, False),
                login=True,
                outcome=Outcome.SUCCESS if accepted else Outcome.MINOR_FAILURE,
                description=reason,
            )
        )
        if not accepted:
            self._log(
                security_alert(
                    self.source,
                    self._node(None, False),
                    Participant(user or "(anonymous)", True, address=address or None),
                    ParticipantObject.of_uri("status pages"),
                    event_type=EventType.USE_OF_RESTRICTED_FUNCTION,
                    description=reason or "credentials refused",
                )
            )

    def on_access(
        self,
        user: str,
        address: str,
        uri: str,
        study_uid: str = "",
        evidence: Path | None = None,
    ) -> None:
        """A status page, preview or viewer request that shows a study's data: DICOM
        Instances Accessed, naming the study and its patient (from what the node received,
        or the header of ``evidence``, a file of the study)."""
        if self.logger is None:
            return
        accessor = Participant(user or "(anonymous)", True, address=address or None)
        if study_uid:
            patient = self._patient_of(study_uid, evidence)
            self._log(instances_accessed(self.source, accessor, [StudyRef(study_uid)], patient))
            return
        self._log(
            AuditMessage(
                EventID.INSTANCES_ACCESSED,
                Action.READ,
                Outcome.SUCCESS,
                (accessor,),
                self.source,
                (ParticipantObject.of_uri(uri),),
            )
        )

    def on_fetched(self, user: str, address: str, path: Path) -> None:
        """A result file a user downloaded: DICOM Instances Transferred (R), the node the
        source, the user the destination."""
        if self.logger is None:
            return
        subject = read_subject(path)
        if subject is None:
            return
        patient, study = subject
        self._log(
            instances_transferred(
                self.source,
                self._node(None, False),
                Participant(user or "(anonymous)", True, address=address or None),
                [study],
                patient,
                Action.READ,
            )
        )


def _destination_peer(destination: Destination) -> tuple[str, str]:
    """A destination as an audit participant: its AE title or URL, and its host."""
    ae_title = str(getattr(destination, "ae_title", "") or "")
    url = str(getattr(destination, "url", "") or "")
    host = str(getattr(destination, "host", "") or "")
    if not host and url:
        host = urllib.parse.urlsplit(url).hostname or ""
    return ae_title or url or destination.name, host


def _by_patient(
    studies: Iterable[tuple[PatientRef, StudyRef]],
) -> dict[PatientRef, list[StudyRef]]:
    grouped: dict[PatientRef, list[StudyRef]] = {}
    for patient, study in studies:
        grouped.setdefault(patient, []).append(study)
    return grouped


class AssociationLedger:
    """What each open association stored, by patient and study, for its audit message.

    Subscribed to intake's events: each stored instance's
    :class:`~dicom_node.intake.storage.StoreOutcome` (new or a duplicate, in memory or
    spilled) is counted under its association, and the association's end
    (:class:`~dicom_node.intake.events.AssociationEnded`) hands the studies to
    :meth:`AuditTrail.on_received`. Only identifiers and counts are kept.
    """

    def __init__(self, trail: AuditTrail) -> None:
        self.trail = trail
        self._open: dict[int, dict[tuple[PatientRef, str], dict[str, int]]] = {}
        self._lock = threading.Lock()

    def on_stored(self, outcome: StoreOutcome) -> None:
        if outcome.status != 0 or not outcome.study_uid:
            return
        patient = PatientRef(*outcome.patient())
        with self._lock:
            studies = self._open.setdefault(outcome.association, {})
            counts = studies.setdefault((patient, outcome.study_uid), {})
            counts[outcome.sop_class] = counts.get(outcome.sop_class, 0) + 1

    def on_ended(self, ended: AssociationEnded) -> None:
        with self._lock:
            carried = self._open.pop(ended.association, None)
        if not carried:
            return
        self.trail.on_received(
            ended.calling_ae,
            ended.address,
            [(p, StudyRef(s, counts)) for (p, s), counts in carried.items()],
            Outcome.MINOR_FAILURE if ended.aborted else Outcome.SUCCESS,
            "association aborted" if ended.aborted else "",
        )
