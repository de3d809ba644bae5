"""The audit trail against a real collector: a Debian ``rsyslog`` over TLS (RFC 5425, gtls,
client certificates checked) and over UDP (RFC 5426), also when the collector comes up only
after the messages were logged; and a whole node, whose push, export, refused association
and status-page logins each reach rsyslog as a schema-valid message while the node's own
log names no patient."""

from __future__ import annotations

import base64
import logging
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import lxml.etree as lxml_etree  # a dev dependency: Relax NG validation
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.config import AuditSettings, settings_from_dict
from dicom_node.inference import BACKENDS
from dicom_node.node import Node
from dicom_node.service.audit import SYSLOG_MSGID, SYSLOG_PRI, AuditLogger, AuditTrail
from dicom_node.state import OutboxState, SeriesState
from dicom_node_testing import threshold
from dicom_node_testing.phantom import make_phantom
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.checks import assert_audit_valid, audit_schema
from tests.peers import (
    SPLEEN_BUNDLE,
    Rsyslog,
    audit_certificates,
    free_port,
    storescu,
    wait_for,
    wait_port,
)
from tests.unit.service.test_audit import every_hook

pytestmark = pytest.mark.cost(8)

PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-4711"


@pytest.fixture(scope="module")
def schema():
    return audit_schema()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    return audit_certificates(tmp_path_factory.mktemp("audit-certs"))


@pytest.fixture
def rsyslog(tmp_path, certs) -> Iterator[Rsyslog]:
    server = Rsyslog(tmp_path / "rsyslog", certs, free_port(), free_port()).start()
    yield server
    server.stop()


_FRAME = re.compile(
    rb"^<(\d+)>1 (\S+) (\S+) (\S+) (\S+) (\S+) - \xef\xbb\xbf(<AuditMessage>.*</AuditMessage>)$"
)


def _audit_xml(schema, line: bytes) -> bytes:
    """The audit message of one RFC 5424 line, its header checked, the message validated."""
    match = _FRAME.match(line)
    assert match, line[:200]
    pri, _stamp, _host, app, _pid, msgid, xml = match.groups()
    assert int(pri) == SYSLOG_PRI and app == b"dicom-node" and msgid == SYSLOG_MSGID.encode()
    assert_audit_valid(schema, xml)
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


def _event(xml: bytes) -> tuple[str, str, str]:
    """(Event ID code, action, outcome) of a message."""
    event = lxml_etree.fromstring(xml).find("EventIdentification")
    return (
        event.find("EventID").get("csd-code"),
        event.get("EventActionCode"),
        event.get("EventOutcomeIndicator"),
    )


def test_rsyslog_receives_every_message_over_tls(schema, rsyslog, certs, tmp_path, caplog):
    audit_file = tmp_path / "node" / "logs" / "audit.log"
    trail = AuditTrail(
        AuditLogger(_tls_settings(certs, rsyslog.tls_port), audit_file), "DICOM_NODE"
    )
    evidence = write_ct_series(
        threshold_free_ct(), tmp_path / "ct", attrs=SeriesAttributes(patient_name=PATIENT_NAME)
    )[0]
    with caplog.at_level(logging.DEBUG):
        every_hook(trail, evidence)
        assert trail.logger is not None and trail.logger.flush(30)
        trail.close()
    written = audit_file.read_bytes().splitlines()
    lines = rsyslog.wait_for(len(written))
    assert len(lines) == len(written) == 15, (rsyslog.work / "rsyslogd.err").read_text()
    # the file and the collector have the same messages, in order, each valid
    assert [_audit_xml(schema, line) for line in lines] == written
    assert PATIENT_NAME.encode() in b"".join(written)  # the audit trail names the patient...
    assert PATIENT_NAME not in caplog.text  # ...the log not


def threshold_free_ct():
    import numpy as np

    return np.zeros((1, 8, 8), np.int16)


def test_rsyslog_receives_over_udp(schema, rsyslog):
    settings = AuditSettings(
        enabled=True, syslog_host="127.0.0.1", syslog_port=rsyslog.udp_port, transport="udp"
    )
    trail = AuditTrail(AuditLogger(settings, None), "DICOM_NODE")
    trail.on_login("radiologist", "10.1.2.50", accepted=True)
    trail.on_association_refused("INTRUDER", "10.9.9.9", "local limit exceeded")
    trail.close()
    lines = rsyslog.wait_for(2)
    assert [_event(_audit_xml(schema, x))[0] for x in lines] == ["110114", "110113"]


def test_collector_down_never_blocks_and_gets_the_backlog_later(schema, certs, tmp_path):
    """With nothing listening, logging returns at once and the file has every message; the
    collector, once it listens, receives them all, in order."""
    port, udp = free_port(), free_port()
    audit_file = tmp_path / "audit.log"
    logger = AuditLogger(_tls_settings(certs, port), audit_file)
    trail = AuditTrail(logger, "DICOM_NODE")
    t0 = time.perf_counter()
    for k in range(20):
        trail.on_association_refused("PEER", "10.0.0.1", f"attempt {k}")
    assert time.perf_counter() - t0 < 1.0  # queued, never waiting for the collector
    wait_for(lambda: len(audit_file.read_bytes().splitlines()) == 20, 20, "the audit file")
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
    with caplog.at_level(logging.WARNING, logger="dicom_node.service.audit"):
        for k in range(12):
            trail.on_association_refused("PEER", f"10.0.0.{k}", "refused")
        wait_for(lambda: "dropped for the syslog collector" in caplog.text, 20, "the warning")
        trail.close(timeout=0.2)
    # the sender tells what was dropped since it last looked: in one warning or several
    dropped = re.findall(r"(\d+) message\(s\) dropped for the syslog collector", caplog.text)
    assert sum(map(int, dropped)) == 7, caplog.text
    assert len((tmp_path / "audit.log").read_bytes().splitlines()) == 12


# -- a whole node ---------------------------------------------------------------------------
@pytest.fixture
def pacs(tmp_path) -> Iterator[tuple[int, Path]]:
    """DCMTK's storescp as the destination results are exported to."""
    port, out = free_port(), tmp_path / "pacs"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "-aet", "PACS", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, 20, proc)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)


def _get(url: str, user: str, password: str) -> int:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_node_audits_a_push_an_export_a_refusal_and_logins(
    schema, rsyslog, certs, pacs, tmp_path, monkeypatch, caplog
):
    """A node with ``[audit]`` to rsyslog over TLS: a push (with one instance sent twice),
    the export of its results to storescp, an association to another AE title, and a
    status-page login, refused then accepted, each reach rsyslog as a schema-valid message,
    and the node's own log names neither the patient nor the ID."""
    monkeypatch.setitem(BACKENDS, "threshold", threshold.create_backends)
    secret = tmp_path / "status.secret"
    secret.write_text("radiologist:s3cret\n")
    secret.chmod(0o600)
    pacs_port, received = pacs
    settings = settings_from_dict(
        {
            "node": {
                "data_dir": str(tmp_path / "var"),
                "host": "127.0.0.1",
                "port": free_port(),
                "settle_seconds": 60,
            },
            "limits": {"min_free_disk_mb": 1},
            "inference": {"backend": "threshold"},
            "models": [{"name": "spleen", "bundle": str(SPLEEN_BUNDLE)}],
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}
            ],
            "status": {
                "enabled": True,
                "port": 0,
                "auth": "basic",
                "credentials_file": str(secret),
            },
            "audit": {
                "enabled": True,
                "syslog_host": "127.0.0.1",
                "syslog_port": rsyslog.tls_port,
                "ca_certificates": str(certs["ca"]),
                "certificate": str(certs["client_cert"]),
                "private_key": str(certs["client_key"]),
            },
        }
    )
    phantom = make_phantom(shape=(8, 32, 32), spacing=(5.0, 7.0, 7.0), seed=3)
    attrs = SeriesAttributes(patient_name=PATIENT_NAME, patient_id=PATIENT_ID)
    paths = write_ct_series(phantom.hu, tmp_path / "ct", spacing=phantom.spacing, attrs=attrs)
    uid = attrs.series_instance_uid
    caplog.set_level(logging.INFO)
    node = Node(settings)
    node.start()
    try:
        port = settings.node.port
        assert storescu(port, tmp_path / "ct").returncode == 0  # released: complete
        wait_for(lambda: node.jobs.series.get(uid).state == SeriesState.DONE, 60, "done")
        assert storescu(port, paths[0], "DICOM_NODE", "RESENDER").returncode == 0  # a duplicate
        wait_for(
            lambda: [i.state for i in node.jobs.outbox.items(uid)] == [OutboxState.SENT] * 3,
            30,
            "the results acknowledged by storescp",
        )
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(Verification)
        assert ae.associate("127.0.0.1", port, ae_title="NOT_THE_NODE").is_rejected
        page = f"{node.status.url}/jobs/{uid}"
        assert _get(page, "radiologist", "wrong") == 401
        assert _get(page, "radiologist", "s3cret") == 200
    finally:
        node.stop()
    assert len(list(received.iterdir())) == 3
    written = (settings.data_dir / "logs" / "audit.log").read_bytes().splitlines()
    messages = [_audit_xml(schema, line) for line in rsyslog.wait_for(len(written))]
    assert messages == written  # every message reached rsyslog, in order
    events = [_event(xml) for xml in messages]
    assert events[0] == ("110100", "E", "0") and events[-1] == ("110100", "E", "0")
    for expected in (
        ("110104", "C", "0"),  # the push
        ("110102", "E", "0"),  # the export begins...
        ("110104", "R", "0"),  # ...and each result is acknowledged
        ("110113", "E", "4"),  # the association refused
        ("110114", "E", "4"),  # the login refused...
        ("110114", "E", "0"),  # ...and accepted
        ("110103", "R", "0"),  # the job page shown
    ):
        assert expected in events, (expected, events)
    assert events.count(("110104", "R", "0")) == 3
    assert len(events) == 13  # and nothing else: start, 2 pushes, 1 + 3 export, 4, page, stop
    push, again = [
        lxml_etree.fromstring(x)
        for x, e in zip(messages, events, strict=True)
        if e[:2] == ("110104", "C")
    ]
    # the instance sent again is an instance transferred, though stored once
    resent = again.find("ParticipantObjectIdentification/ParticipantObjectDescription/SOPClass")
    assert resent.get("NumberOfInstances") == "1"
    assert again.find("ActiveParticipant[@UserIsRequestor='true']").get("UserID") == "RESENDER"
    study = push.find("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='3']")
    assert study.get("ParticipantObjectID") == attrs.study_instance_uid
    count = study.find("ParticipantObjectDescription/SOPClass").get("NumberOfInstances")
    assert int(count) == len(paths)
    patient = push.find("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']")
    assert patient.get("ParticipantObjectID") == PATIENT_ID
    sender = push.find("ActiveParticipant[@UserIsRequestor='true']")
    assert (sender.get("UserID"), sender.get("NetworkAccessPointID")) == ("STORESCU", "127.0.0.1")
    # the audit trail names the patient; the node's own log does not
    assert PATIENT_NAME.encode() in b"".join(messages)
    assert caplog.text and PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text
    assert "Doe" not in caplog.text
