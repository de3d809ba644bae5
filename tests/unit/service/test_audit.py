"""The audit trail's messages: every one the node builds is valid against the DICOM Audit
Message Schema (PS3.15 A.5.1, vendored in ``tests/data/audit``), says what PS3.15 A.5.3
asks of its event, and cannot be broken by a peer's text. The collector side (a real
rsyslog over TLS and UDP) is ``tests/system/test_audit.py``."""

from __future__ import annotations

import re
from pathlib import Path

import lxml.etree as lxml_etree  # a dev dependency: Relax NG validation
import numpy as np
import pytest

from dicom_node.config import AuditSettings
from dicom_node.intake.events import AssociationEnded, AssociationRefused, StoreOutcome
from dicom_node.service.audit import (
    Action,
    AssociationLedger,
    AuditLogger,
    AuditMessage,
    AuditTrail,
    EventID,
    Outcome,
    Participant,
    PatientRef,
    Role,
    StudyRef,
)
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.checks import assert_audit_valid, audit_schema

PATIENT = PatientRef("PID-4711", "Doe^Jane")
STUDY_UID = "1.2.826.0.1.3680043.9.7433.1.1"
RESULTS = StudyRef(
    STUDY_UID, {"1.2.840.10008.5.1.4.1.1.66.4": 1, "1.2.840.10008.5.1.4.1.1.88.34": 1}
)
CT = "1.2.840.10008.5.1.4.1.1.2"
#: A study the node holds a file of, not received since its start.
EVIDENCE_STUDY = "1.2.826.0.1.9"


@pytest.fixture(scope="module")
def schema():
    return audit_schema()


class Collect:
    """An AuditLogger stand-in that keeps what the hooks log."""

    def __init__(self) -> None:
        self.messages: list[AuditMessage] = []

    def log(self, message: AuditMessage) -> None:
        self.messages.append(message)

    def close(self, timeout: float = 0.0) -> None:
        pass


def _stored(association: int, sop: str) -> StoreOutcome:
    return StoreOutcome(
        0,
        "1.2.3",
        sop,
        study_uid=STUDY_UID,
        sop_class=CT,
        patient_id=PATIENT.patient_id,
        patient_name=PATIENT.name,
        association=association,
    )


def every_hook(trail: AuditTrail, evidence: Path) -> None:
    """One call of each hook the node has, as the node makes them."""
    trail.on_start()
    ledger = AssociationLedger(trail)
    for k in range(3):  # the third a duplicate: still an instance transferred
        ledger.on_stored(_stored(7, f"1.2.3.{min(k, 1)}"))
    ledger.on_stored(StoreOutcome(0xA900, reason="refused"))  # not a transfer
    ledger.on_ended(AssociationEnded(7, "CT_SCANNER", "10.1.2.3", aborted=False))
    trail.on_export("PACS", "10.1.2.9", PATIENT, RESULTS, begin=True)
    trail.on_export("PACS", "10.1.2.9", PATIENT, RESULTS)
    trail.on_export("PACS", "10.1.2.9", PATIENT, RESULTS, Outcome.MINOR_FAILURE, "rejected")
    trail.on_refused(AssociationRefused("10.9.9.9", "INTRUDER", "calling AE title not recognised"))
    trail.on_refused(AssociationRefused("10.9.9.8", None, "TLS: certificate unknown"))
    trail.on_login("radiologist", "10.1.2.50", accepted=True)
    trail.on_login("mallory", "10.1.2.66", accepted=False, reason="basic credentials refused")
    trail.on_access("radiologist", "10.1.2.50", "/jobs/1.2.3", EVIDENCE_STUDY, evidence)
    trail.on_access("radiologist", "10.1.2.50", "/dicom-web/studies")
    trail.on_fetched("radiologist", "10.1.2.50", evidence)
    trail.on_restricted_request("10.1.2.77", "/dicom-web/..%2ftools", "a dot segment")
    trail.on_stop()


@pytest.fixture(scope="module")
def evidence(tmp_path_factory) -> Path:
    attrs = SeriesAttributes(
        patient_name="Roe^Richard", patient_id="PID-0815", study_instance_uid=EVIDENCE_STUDY
    )
    out = tmp_path_factory.mktemp("ct")
    return write_ct_series(np.zeros((1, 4, 4), np.int16), out, spacing=(1, 1, 1), attrs=attrs)[0]


def test_every_message_is_valid_against_the_ps3_15_schema(schema, evidence):
    sink = Collect()
    trail = AuditTrail(sink, "DICOM_NODE", "10.1.2.1")  # type: ignore[arg-type]
    every_hook(trail, evidence)
    assert [m.event_id for m in sink.messages] == [
        EventID.APPLICATION_ACTIVITY,
        EventID.INSTANCES_TRANSFERRED,
        EventID.BEGIN_TRANSFERRING,
        EventID.INSTANCES_TRANSFERRED,
        EventID.INSTANCES_TRANSFERRED,
        EventID.SECURITY_ALERT,
        EventID.SECURITY_ALERT,
        EventID.USER_AUTHENTICATION,
        EventID.USER_AUTHENTICATION,  # the refused login...
        EventID.SECURITY_ALERT,  # ...is a security alert too
        EventID.INSTANCES_ACCESSED,
        EventID.INSTANCES_ACCESSED,
        EventID.INSTANCES_TRANSFERRED,
        EventID.SECURITY_ALERT,
        EventID.APPLICATION_ACTIVITY,
    ]
    for message in sink.messages:
        assert_audit_valid(schema, message.to_xml())
    received, exported = sink.messages[1], sink.messages[3]
    # A.5.3.4: the receiver stores (C), the exporter reads (R); source and destination roles
    assert received.action is Action.CREATE and exported.action is Action.READ
    doc = lxml_etree.fromstring(received.to_xml())
    roles = {
        p.get("UserID"): p.find("RoleIDCode").get("csd-code")
        for p in doc.findall("ActiveParticipant")
    }
    assert roles == {"CT_SCANNER": Role.SOURCE.value, "DICOM_NODE": Role.DESTINATION.value}
    sop = doc.find("ParticipantObjectIdentification/ParticipantObjectDescription/SOPClass")
    assert (sop.get("UID"), sop.get("NumberOfInstances")) == (CT, "3")
    patient = doc.find("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']")
    assert patient.get("ParticipantObjectID") == PATIENT.patient_id
    refused = lxml_etree.fromstring(sink.messages[5].to_xml())
    assert refused.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert refused.findtext("EventIdentification/EventOutcomeDescription") == (
        "calling AE title not recognised"
    )
    login_failed = lxml_etree.fromstring(sink.messages[8].to_xml())
    assert login_failed.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    # the job page names the study, and its patient from the evidence's header
    accessed = lxml_etree.fromstring(sink.messages[10].to_xml())
    ids = [
        o.get("ParticipantObjectID") for o in accessed.findall("ParticipantObjectIdentification")
    ]
    assert ids == [EVIDENCE_STUDY, "PID-0815"]
    # the result file fetched: the node is the source, the user the destination
    fetched = lxml_etree.fromstring(sink.messages[12].to_xml())
    assert fetched.find("EventIdentification").get("EventActionCode") == "R"
    users = {p.get("UserID"): p.find("RoleIDCode").get("csd-code")
             for p in fetched.findall("ActiveParticipant")}  # fmt: skip
    assert users == {"DICOM_NODE": Role.SOURCE.value, "radiologist": Role.DESTINATION.value}


def test_an_aborted_association_is_a_transfer_that_failed_in_part(schema):
    sink = Collect()
    ledger = AssociationLedger(AuditTrail(sink, "DICOM_NODE"))  # type: ignore[arg-type]
    ledger.on_stored(_stored(1, "1.2.3.1"))
    ledger.on_ended(AssociationEnded(2, "OTHER", "10.0.0.2", aborted=True))  # stored nothing
    ledger.on_ended(AssociationEnded(1, "CT", "10.0.0.1", aborted=True))
    (message,) = sink.messages
    assert (message.outcome, message.description) == (Outcome.MINOR_FAILURE, "association aborted")
    assert_audit_valid(schema, message.to_xml())


def test_the_schema_refuses_a_message_it_should(schema):
    """The vendored schema is a check that can fail: a message without its mandatory
    EventDateTime, a coded value without its meaning, or a boolean spelled otherwise."""
    sink = Collect()
    AuditTrail(sink, "DICOM_NODE").on_start()  # type: ignore[arg-type]
    good = sink.messages[0].to_xml()
    assert_audit_valid(schema, good)
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
    assert_audit_valid(schema, lines[0])


def test_a_flood_of_refusals_is_one_message_a_second():
    sink = Collect()
    trail = AuditTrail(sink, "DICOM_NODE")  # type: ignore[arg-type]
    for _ in range(50):
        trail.on_association_refused(None, "10.6.6.6", "limits.max_associations_per_address")
    trail.on_association_refused(None, "10.6.6.7", "limits.max_associations_per_address")
    for _ in range(30):
        trail.on_login("mallory", "10.6.6.8", accepted=False, reason="refused")
    for _ in range(30):
        trail.on_login("radiologist", "10.1.2.50", accepted=True)
    # one per address and reason; a refused login is two messages; a login is one
    assert len(sink.messages) == 2 + 2 + 1
    key = ("association", "10.6.6.6", "limits.max_associations_per_address")
    trail._refusals._last[key] = (-10.0, 49)
    trail.on_association_refused(None, "10.6.6.6", "limits.max_associations_per_address")
    assert sink.messages[-1].description.endswith("(49 more refused since the last message)")


def test_a_trail_that_is_off_reads_nothing(tmp_path):
    trail = AuditTrail(None, "DICOM_NODE")
    missing = tmp_path / "not-there.dcm"
    trail.on_fetched("u", "10.0.0.1", missing)  # would log a warning if it read
    trail.on_access("u", "10.0.0.1", "/jobs/1", "1.2.3", missing)
    assert not trail.enabled


def test_participant_application_entity_names_the_ae_title():
    p = Participant.application_entity(" CT1 ", "10.0.0.1", Role.SOURCE, True)
    assert (p.user_id, p.alternative_user_id) == ("CT1", "AETITLES=CT1")
