"""Storage commitment reports a PACS sends the node (PS3.4 J.3.3): read, recorded, answered.

A destination asked to commit to the node's results (:mod:`dicom_node.export.commitment`)
answers with an N-EVENT-REPORT: on the association that asked, when it answers at once, or
on a new association it opens to the node (Orthanc always does the latter). On such an
association the PACS proposes the Storage Commitment Push Model SOP Class with itself, the
requestor, in the SCP role (SCP/SCU Role Selection, PS3.7 D.3.3.4): the node's AE accepts
that role for it (:func:`add_report_context`) and, as the SCU, only receives reports.

:func:`report_handler` is the ``EVT_N_EVENT_REPORT`` handler: it reads the report
(:func:`read_report`), has it recorded (the job database, in one transaction:
:meth:`~dicom_node.state.commitments.CommitmentRepository.record_report`) and only then
answers 0x0000; a report that cannot be recorded is answered 0x0110 (Processing Failure),
so the PACS knows it was not taken and the node asks again later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import
    StorageCommitmentPushModel,
)

from dicom_node.state.commitments import CommitmentReport, Failure, Reference

__all__ = [
    "EVENT_COMPLETE_FAILURES",
    "EVENT_SUCCESSFUL",
    "REPORT_TRANSFER_SYNTAXES",
    "STORAGE_COMMITMENT",
    "ReportError",
    "add_report_context",
    "read_report",
    "report_handler",
]

log = logging.getLogger("dicom_node.intake.commitment_reports")

STORAGE_COMMITMENT = StorageCommitmentPushModel
#: Event Type IDs of the report (PS3.4 J.3.3.1.1).
EVENT_SUCCESSFUL = 1
EVENT_COMPLETE_FAILURES = 2
#: Transfer syntaxes a report is taken in (the two every DICOM peer speaks).
REPORT_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

#: N-EVENT-REPORT statuses the handler answers with (PS3.7 C).
_SUCCESS = 0x0000
_PROCESSING_FAILURE = 0x0110
_NO_SUCH_EVENT_TYPE = 0x0113
_NO_SUCH_SOP_CLASS = 0x0118
_MISSING_ATTRIBUTE = 0x0120


class ReportError(ValueError):
    """An N-EVENT-REPORT that is not a Storage Commitment report; ``status`` is the
    N-EVENT-REPORT failure status the node answers it with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _references(seq: Iterable[Dataset]) -> list[tuple[Reference, Dataset]]:
    out = []
    for item in seq:
        uid = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if uid:
            out.append((Reference(str(item.get("ReferencedSOPClassUID", "") or ""), uid), item))
    return out


def read_report(
    event_type: int, info: Dataset | None, reporter: str = "", same_association: bool = False
) -> CommitmentReport:
    """Read a Storage Commitment N-EVENT-REPORT's Event Type ID and Event Information.

    Raises :class:`ReportError` (with the status to answer) when it is not one: another
    event type, or no Transaction UID.
    """
    if event_type not in (EVENT_SUCCESSFUL, EVENT_COMPLETE_FAILURES):
        raise ReportError(
            f"event type {event_type} is not a storage commitment report", _NO_SUCH_EVENT_TYPE
        )
    if info is None or not str(info.get("TransactionUID", "") or ""):
        raise ReportError(
            "the storage commitment report has no Transaction UID", _MISSING_ATTRIBUTE
        )
    committed = tuple(ref for ref, _ in _references(info.get("ReferencedSOPSequence") or []))
    failed = tuple(
        Failure(ref, int(item.get("FailureReason", _PROCESSING_FAILURE) or _PROCESSING_FAILURE))
        for ref, item in _references(info.get("FailedSOPSequence") or [])
    )
    return CommitmentReport(
        transaction_uid=str(info.TransactionUID),
        committed=committed,
        failed=failed,
        retrieve_ae_title=str(info.get("RetrieveAETitle", "") or ""),
        reporter=reporter,
        same_association=same_association,
    )


def add_report_context(ae: AE) -> None:
    """Let ``ae`` accept reports on associations a PACS opens.

    The PACS proposes the Storage Commitment Push Model with itself in the SCP role; the
    node accepts that role for it and refuses it the SCU role (the node only receives
    reports here). A PACS proposing no role selection gets the default roles and is served
    the same way.
    """
    ae.add_supported_context(
        STORAGE_COMMITMENT, list(REPORT_TRANSFER_SYNTAXES), scu_role=False, scp_role=True
    )


def report_handler(
    record: Callable[[CommitmentReport], Any],
) -> Callable[[evt.Event], tuple[int, Dataset | None]]:
    """An ``EVT_N_EVENT_REPORT`` handler that reads each report and has ``record`` keep it,
    answering 0x0000 only once ``record`` returned.

    ``record`` returns ``None`` for a transaction it does not know (logged, and answered
    0x0000: there is nothing to ask again); if it raises, the answer is 0x0110. A report
    that is not a Storage Commitment report is answered with the failure status PS3.7
    gives for it.
    """

    def handle(event: evt.Event) -> tuple[int, Dataset | None]:
        request = event.request
        assoc = event.assoc
        # the PACS: the requestor of a new association, the acceptor of the node's own
        peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
        reporter = peer.ae_title.strip()
        if str(request.AffectedSOPClassUID) != STORAGE_COMMITMENT:
            log.warning(
                "N-EVENT-REPORT of %s from %s refused", request.AffectedSOPClassUID, reporter
            )
            return _NO_SUCH_SOP_CLASS, None
        try:
            report = read_report(
                int(event.event_type or 0),
                event.event_information,
                reporter=reporter,
                same_association=assoc.is_requestor,
            )
        except ReportError as exc:
            log.warning("storage commitment report from %s refused: %s", reporter, exc)
            return exc.status, None
        except Exception as exc:  # noqa: BLE001 - a data set that does not decode
            log.warning("storage commitment report from %s does not decode: %s", reporter, exc)
            return _PROCESSING_FAILURE, None
        try:
            known = record(report)
        except Exception:
            log.exception("storage commitment report %s not recorded", report.transaction_uid)
            return _PROCESSING_FAILURE, None
        if known is None:
            log.warning(
                "storage commitment report from %s for transaction %s, which this node did "
                "not request: ignored",
                reporter,
                report.transaction_uid,
            )
        elif report.failed:
            log.warning("%s", report.describe())
        else:
            log.info("%s", report.describe())
        return _SUCCESS, None

    return handle
