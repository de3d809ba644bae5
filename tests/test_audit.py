"""The audit trail: every message the node builds is valid against the DICOM Audit Message
Schema (PS3.15 A.5.1, vendored in ``tests/data/audit``), is written to the audit file, and
reaches a real Debian ``rsyslog`` over TLS (RFC 5425, gtls driver, client certificates
checked) and over UDP (RFC 5426), also when the collector comes up only after the messages
were logged. Patient names stay out of the node's own log.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import lxml.etree as lxml_etree  # a dev dependency: Relax NG validation
import pytest

from dicom_node.audit import (
    SYSLOG_MSGID,
    SYSLOG_PRI,
    Action,
    AssociationLedger,
    AuditLogger,
    AuditMessage,
    AuditSettings,
    AuditTrail,
    EventID,
    Outcome,
    Participant,
    PatientRef,
    Role,
    StudyRef,
)
from tests.peers import free_port

SCHEMA = Path(__file__).parent / "data" / "audit" / "audit-message.rng"
PATIENT = PatientRef("PID-4711", "Doe^Jane")
STUDY = StudyRef("1.2.826.0.1.3680043.9.7433.1.1", {"1.2.840.10008.5.1.4.1.1.2": 120})
RESULTS = StudyRef(
    "1.2.826.0.1.3680043.9.7433.1.1",
    {"1.2.840.10008.5.1.4.1.1.66.4": 1, "1.2.840.10008.5.1.4.1.1.88.34": 1},
)
RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"


@pytest.fixture(scope="module")
def schema():
    return lxml_etree.RelaxNG(lxml_etree.parse(str(SCHEMA)))


def _validate(schema, xml: bytes) -> None:
    doc = lxml_etree.fromstring(xml)
    assert schema.validate(doc), f"{schema.error_log}\n{xml.decode()}"


class _Collect:
    """An AuditLogger stand-in that keeps what the hooks log."""

    def __init__(self) -> None:
        self.messages: list[AuditMessage] = []

    def log(self, message: AuditMessage) -> None:
        self.messages.append(message)

    def close(self, timeout: float = 0.0) -> None:
        pass


def _every_hook(trail: AuditTrail) -> None:
    """One call of each hook the node has, as the node makes them."""
    trail.on_start()
    ledger = AssociationLedger(trail)
    ds = {
        "PatientID": PATIENT.patient_id,
        "PatientName": PATIENT.name,
        "StudyInstanceUID": STUDY.study_uid,
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
    }
    for _ in range(3):
        ledger.stored("assoc-1", ds)
    ledger.ended("assoc-1", "CT_SCANNER", "10.1.2.3", aborted=False)
    trail.on_export("PACS", "10.1.2.9", PATIENT, RESULTS, begin=True)
    trail.on_export("PACS", "10.1.2.9", PATIENT, RESULTS)
    trail.on_export(
        "PACS", "10.1.2.9", PATIENT, RESULTS, Outcome.MINOR_FAILURE, "association rejected"
    )
    trail.on_association_refused("INTRUDER", "10.9.9.9", "calling AE title not recognised")
    trail.on_association_refused(None, "10.9.9.8", "TLS handshake: certificate unknown")
    trail.on_login("radiologist", "10.1.2.50", accepted=True)
    trail.on_login("mallory", "10.1.2.66", accepted=False, reason="wrong password")
    trail.on_access("radiologist", "10.1.2.50", "/jobs/1.2.3", [RESULTS], PATIENT)
    trail.on_access("radiologist", "10.1.2.50", "/dicom-web/studies")
    trail.on_stop()


def test_every_message_is_valid_against_the_ps3_15_schema(schema):
    sink = _Collect()
    trail = AuditTrail(sink, "DICOM_NODE", "10.1.2.1")  # type: ignore[arg-type]
    _every_hook(trail)
    events = [m.event_id for m in sink.messages]
    assert events == [
        EventID.APPLICATION_ACTIVITY,
        EventID.INSTANCES_TRANSFERRED,
        EventID.BEGIN_TRANSFERRING,
        EventID.INSTANCES_TRANSFERRED,
        EventID.INSTANCES_TRANSFERRED,
        EventID.SECURITY_ALERT,
        EventID.SECURITY_ALERT,
        EventID.USER_AUTHENTICATION,
        EventID.USER_AUTHENTICATION,
        EventID.INSTANCES_ACCESSED,
        EventID.INSTANCES_ACCESSED,
        EventID.APPLICATION_ACTIVITY,
    ]
    for message in sink.messages:
        _validate(schema, message.to_xml())
    received, _, exported = sink.messages[1], sink.messages[2], sink.messages[3]
    # A.5.3.4: the receiver stores (C), the exporter reads (R); source and destination roles
    assert received.action is Action.CREATE and exported.action is Action.READ
    doc = lxml_etree.fromstring(received.to_xml())
    roles = {
        p.get("UserID"): p.find("RoleIDCode").get("csd-code")
        for p in doc.findall("ActiveParticipant")
    }
    assert roles == {"CT_SCANNER": Role.SOURCE.value, "DICOM_NODE": Role.DESTINATION.value}
    sop = doc.find("ParticipantObjectIdentification/ParticipantObjectDescription/SOPClass")
    assert sop.get("NumberOfInstances") == "3"
    patient = doc.find("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']")
    assert patient.get("ParticipantObjectID") == PATIENT.patient_id
    refused = lxml_etree.fromstring(sink.messages[5].to_xml())
    assert refused.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert refused.findtext("EventIdentification/EventOutcomeDescription") == (
        "calling AE title not recognised"
    )


def test_the_schema_refuses_a_message_it_should(schema):
    """The vendored schema is a check that can fail: a transfer without its mandatory
    EventDateTime, and a coded value without its meaning, are refused."""
    message = AuditTrail(None, "DICOM_NODE")
    sink = _Collect()
    message.logger = sink  # type: ignore[assignment]
    message.on_start()
    good = sink.messages[0].to_xml()
    _validate(schema, good)
    for broken in (
        re.sub(rb' EventDateTime="[^"]*"', b"", good),
        re.sub(rb' originalText="[^"]*"', b"", good, count=1),
        good.replace(b'UserIsRequestor="false"', b'UserIsRequestor="no"'),
    ):
        assert not schema.validate(lxml_etree.fromstring(broken))


def test_control_characters_cannot_break_a_message_or_its_line(schema, tmp_path):
    trail = AuditTrail(
        AuditLogger(AuditSettings(enabled=True), tmp_path / "audit.log"), "DICOM_NODE"
    )
    trail.on_association_refused("EVIL\r\nAE", "10.0.0.1", "reason\nwith <xml/> & \x00 bytes")
    trail.close()
    lines = (tmp_path / "audit.log").read_bytes().splitlines()
    assert len(lines) == 1
    _validate(schema, lines[0])


# -- rsyslog ------------------------------------------------------------------------------
def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _certificates(d: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    ca_key, ca = d / "ca.key", d / "ca.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out",
             str(ca), "-days", "2", "-subj", "/CN=audit test CA")  # fmt: skip
    out = {"ca": ca}
    for name in ("server", "client"):
        key, csr, cert, ext = (d / f"{name}.{s}" for s in ("key", "csr", "pem", "ext"))
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                 "-subj", f"/CN={name}")  # fmt: skip
        ext.write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            f"extendedKeyUsage={'serverAuth' if name == 'server' else 'clientAuth'}\n"
        )
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
                 "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
        out[f"{name}_key"], out[f"{name}_cert"] = key, cert
    return out


class Rsyslog:
    """A Debian rsyslogd in the foreground: TLS (gtls, client certificates required) and
    UDP inputs on free loopback ports, every message written raw, one per line."""

    def __init__(self, work: Path, certs: dict[str, Path], tls_port: int, udp_port: int) -> None:
        self.work = work
        self.received = work / "received.log"
        self.tls_port, self.udp_port = tls_port, udp_port
        work.mkdir(parents=True, exist_ok=True)
        (work / "spool").mkdir(exist_ok=True)
        self.conf = work / "rsyslog.conf"
        self.conf.write_text(
            f"""
global(maxMessageSize="64k" workDirectory="{work / "spool"}"
       defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="{certs["ca"]}"
       defaultNetstreamDriverCertFile="{certs["server_cert"]}"
       defaultNetstreamDriverKeyFile="{certs["server_key"]}")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1"
       streamDriver.authMode="x509/certvalid")
input(type="imtcp" port="{tls_port}" address="127.0.0.1")
module(load="imudp")
input(type="imudp" port="{udp_port}" address="127.0.0.1")
template(name="raw" type="string" string="%rawmsg%\\n")
*.* action(type="omfile" file="{self.received}" template="raw")
"""
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> Rsyslog:
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.work / "rsyslogd.pid")],
            stdout=subprocess.DEVNULL,
            stderr=open(self.work / "rsyslogd.err", "wb"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.work / "rsyslogd.err").read_text()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.tls_port)) == 0:
                    return self
            time.sleep(0.05)
        raise AssertionError("rsyslogd did not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def lines(self) -> list[bytes]:
        try:
            return [x for x in self.received.read_bytes().split(b"\n") if x]
        except FileNotFoundError:
            return []

    def wait_for(self, count: int, timeout: float = 30.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(lines := self.lines()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return lines


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    return _certificates(tmp_path_factory.mktemp("audit-certs"))


@pytest.fixture
def rsyslog(tmp_path, certs) -> Iterator[Rsyslog]:
    if not Path(RSYSLOGD).exists():
        pytest.fail("rsyslogd is not installed (make install installs rsyslog rsyslog-gnutls)")
    server = Rsyslog(tmp_path / "rsyslog", certs, free_port(), free_port()).start()
    yield server
    server.stop()


_FRAME = re.compile(
    rb"^<(\d+)>1 (\S+) (\S+) (\S+) (\S+) (\S+) - \xef\xbb\xbf(<AuditMessage>.*</AuditMessage>)$"
)


def _audit_xml(schema, line: bytes) -> bytes:
    match = _FRAME.match(line)
    assert match, line[:200]
    pri, _stamp, _host, app, _pid, msgid, xml = match.groups()
    assert int(pri) == SYSLOG_PRI and app == b"dicom-node" and msgid == SYSLOG_MSGID.encode()
    _validate(schema, xml)
    return xml


def _tls_settings(certs: dict[str, Path], port: int, **kw) -> AuditSettings:
    return AuditSettings(
        enabled=True,
        syslog_host="127.0.0.1",
        syslog_port=port,
        transport="tls",
        ca_certificates=certs["ca"],
        certificate=certs["client_cert"],
        private_key=certs["client_key"],
        **kw,
    )


def test_rsyslog_receives_every_message_over_tls(schema, rsyslog, certs, tmp_path, caplog):
    audit_file = tmp_path / "node" / "logs" / "audit.log"
    trail = AuditTrail(
        AuditLogger(_tls_settings(certs, rsyslog.tls_port), audit_file), "DICOM_NODE"
    )
    with caplog.at_level(logging.DEBUG):
        _every_hook(trail)
        assert trail.logger is not None and trail.logger.flush(30)
        trail.close()
    lines = rsyslog.wait_for(12)
    assert len(lines) == 12, (rsyslog.work / "rsyslogd.err").read_text()
    received = [_audit_xml(schema, line) for line in lines]
    written = audit_file.read_bytes().splitlines()
    assert received == written  # the file and the collector have the same messages, in order
    for xml in written:
        _validate(schema, xml)
    assert PATIENT.name.encode() in b"".join(written)  # the audit trail names the patient...
    assert (
        PATIENT.name not in caplog.text and PATIENT.patient_id not in caplog.text
    )  # ...the log not


def test_rsyslog_receives_over_udp(schema, rsyslog, tmp_path):
    settings = AuditSettings(
        enabled=True, syslog_host="127.0.0.1", syslog_port=rsyslog.udp_port, transport="udp"
    )
    trail = AuditTrail(AuditLogger(settings, None), "DICOM_NODE")
    trail.on_login("radiologist", "10.1.2.50", accepted=True)
    trail.on_association_refused("INTRUDER", "10.9.9.9", "local limit exceeded")
    trail.close()
    lines = rsyslog.wait_for(2)
    assert [lxml_etree.fromstring(_audit_xml(schema, x)).find("EventIdentification/EventID")
            .get("csd-code") for x in lines] == ["110114", "110113"]  # fmt: skip


def test_collector_down_never_blocks_and_gets_the_backlog_later(schema, certs, tmp_path):
    """With nothing listening, logging returns at once and the file has every message; the
    collector, once it listens, receives them all, in order."""
    port, udp = free_port(), free_port()
    audit_file = tmp_path / "audit.log"
    logger = AuditLogger(_tls_settings(certs, port), audit_file)
    trail = AuditTrail(logger, "DICOM_NODE")
    for k in range(20):
        trail.on_association_refused("PEER", "10.0.0.1", f"attempt {k}")
    deadline = time.monotonic() + 20
    while len(audit_file.read_bytes().splitlines()) < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(audit_file.read_bytes().splitlines()) == 20
    assert logger.sent == 0
    server = Rsyslog(tmp_path / "late", certs, port, udp).start()
    try:
        lines = server.wait_for(20, timeout=45)
        descriptions = [
            lxml_etree.fromstring(_audit_xml(schema, x)).findtext(
                "EventIdentification/EventOutcomeDescription"
            )
            for x in lines
        ]
        assert descriptions == [f"attempt {k}" for k in range(20)]
    finally:
        trail.close()
        server.stop()


def test_a_full_backlog_drops_the_oldest_and_says_so(certs, tmp_path, caplog):
    logger = AuditLogger(_tls_settings(certs, free_port(), backlog=5), tmp_path / "audit.log")
    trail = AuditTrail(logger, "DICOM_NODE")
    with caplog.at_level(logging.WARNING, logger="dicom_node.audit"):
        for k in range(12):
            trail.on_login("u", "10.0.0.1", accepted=False, reason=f"try {k}")
        assert logger._sender is not None
        deadline = time.monotonic() + 20
        while "dropped for the syslog collector" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
        trail.close(timeout=0.2)
    assert "7 message(s) dropped" in caplog.text
    assert len((tmp_path / "audit.log").read_bytes().splitlines()) == 12


def test_participant_application_entity_names_the_ae_title():
    p = Participant.application_entity(" CT1 ", "10.0.0.1", Role.SOURCE, True)
    assert (p.user_id, p.alternative_user_id) == ("CT1", "AETITLES=CT1")


# -- the SCP's hooks ------------------------------------------------------------------------
def test_the_scp_audits_a_push_and_a_refused_association(schema, tmp_path, caplog):
    """Through the node's real C-STORE SCP: a push of three slices gives one DICOM
    Instances Transferred (C) naming the study, its 3 CT instances and the patient; an
    association to another called AE title gives a Security Alert; all schema-valid, and
    the patient's name is in the audit file only."""
    import numpy as np
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    from dicom_node.config import settings_from_dict
    from dicom_node.jobs import JobStore
    from dicom_node.scp import StorageSCP
    from dicom_node.spool import Spool
    from dicom_node.synthetic import SeriesAttributes, ct_slice

    port = free_port()
    settings = settings_from_dict(
        {
            "node": {
                "ae_title": "DICOM_NODE",
                "host": "127.0.0.1",
                "port": port,
                "data_dir": str(tmp_path),
            },
            "limits": {"min_free_disk_mb": 1},
        }
    )
    audit_file = tmp_path / "audit.log"
    trail = AuditTrail(AuditLogger(AuditSettings(enabled=True), audit_file), "DICOM_NODE")
    scp = StorageSCP(
        settings, Spool(tmp_path / "spool"), JobStore(tmp_path / "j.sqlite"), audit=trail
    )
    attrs = SeriesAttributes(patient_name=PATIENT.name, patient_id=PATIENT.patient_id)
    slices = [
        ct_slice(
            np.zeros((8, 8), np.int16), (0, 0, k), (1, 0, 0, 0, 1, 0), (1, 1), 1.0, k + 1, attrs
        )  # fmt: skip
        for k in range(3)
    ]
    with caplog.at_level(logging.DEBUG):
        scp.start()
        try:
            ae = AE(ae_title="CT_SCANNER")
            ae.add_requested_context(CTImageStorage)
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
            assert assoc.is_established
            assert [assoc.send_c_store(ds).Status for ds in slices] == [0, 0, 0]
            assoc.release()
            refused = ae.associate("127.0.0.1", port, ae_title="NOT_THE_NODE")
            assert refused.is_rejected
            deadline = time.monotonic() + 20
            while len(audit_file.read_bytes().splitlines()) < 2:
                assert time.monotonic() < deadline, audit_file.read_bytes()
                time.sleep(0.05)
        finally:
            scp.stop()
            trail.close()
    messages = [lxml_etree.fromstring(x) for x in audit_file.read_bytes().splitlines()]
    for doc in messages:
        assert schema.validate(doc), schema.error_log
    by_event = {d.find("EventIdentification/EventID").get("csd-code"): d for d in messages}
    assert set(by_event) == {"110104", "110113"}
    transfer = by_event["110104"]
    assert transfer.find("EventIdentification").get("EventActionCode") == "C"
    study = transfer.find("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='3']")
    assert study.get("ParticipantObjectID") == attrs.study_instance_uid
    assert study.find("ParticipantObjectDescription/SOPClass").get("NumberOfInstances") == "3"
    sender = transfer.find("ActiveParticipant[@UserIsRequestor='true']")
    assert sender.get("UserID") == "CT_SCANNER"
    assert sender.get("NetworkAccessPointID") == "127.0.0.1"
    alert = by_event["110113"]
    assert "Called AE title not recognised" in alert.findtext(
        "EventIdentification/EventOutcomeDescription"
    )
    assert PATIENT.name not in caplog.text and PATIENT.patient_id not in caplog.text


def test_a_flood_of_refusals_is_one_message_a_second():
    sink = _Collect()
    trail = AuditTrail(sink, "DICOM_NODE")  # type: ignore[arg-type]
    for _ in range(50):
        trail.on_association_refused(None, "10.6.6.6", "limits.max_associations_per_address")
    trail.on_association_refused(None, "10.6.6.7", "limits.max_associations_per_address")
    assert len(sink.messages) == 2
    trail._refusals[("10.6.6.6", "limits.max_associations_per_address")] = (-10.0, 49)
    trail.on_association_refused(None, "10.6.6.6", "limits.max_associations_per_address")
    assert sink.messages[-1].description.endswith("(49 more refused since the last message)")
