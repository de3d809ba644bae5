"""Query/Retrieve SCU: find, move and get studies and series from a source (``[[sources]]``).

A source is a PACS the node may fetch from: to segment a study that is already there (on
request, from the command line or the status service), and to top up a series the timer
completed with fewer instances than the PACS holds. :class:`SourceClient` speaks the Study
Root Query/Retrieve Information Model (PS3.4 Annex C) as an SCU, through pynetdicom's own
SOP classes, presentation contexts and role selection:

* C-FIND at STUDY, SERIES and IMAGE level: is the study there, which series does it hold,
  which instances (and so how many) does a series hold;
* C-MOVE of a study, a series or some of its instances to an AE title the PACS knows (the
  node's own): the PACS opens associations of its own to the node's C-STORE SCP;
* C-GET of the same, the instances coming back as C-STORE sub-operations on the same
  association, each handed to the caller's ``EVT_C_STORE`` handler (the node passes the one
  its SCP uses, so a fetched instance is stored exactly as a pushed one).

Every failure is a :class:`SourceError` whose message is one sentence the user can act on:
the source cannot be reached (and why: refused, no answer, unknown host), it rejected the
association (and which AE title to fix), it refuses a Q/R service to this node, it does not
know the move destination, the study or series is not there, or the retrieve was partial
(how many failed, and which).

Orthanc answers a C-MOVE to an AE title missing from its ``DicomModalities`` with 0xC000
(Unable to Process), not with 0xA801 (Move Destination Unknown) as DCMTK's ``dcmqrscp``
does: a move refused with a 0xCxxx status before any sub-operation is checked against a
C-FIND, and reported as an unknown destination when the PACS does hold what was asked for.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import (
    QR_FIND_SERVICE_CLASS_STATUS,
    QR_GET_SERVICE_CLASS_STATUS,
    QR_MOVE_SERVICE_CLASS_STATUS,
)

from dicom_node.common.associations import TUNE_REQUESTED
from dicom_node.common.tls import client_ssl_context
from dicom_node.config import TLSSettings
from dicom_node.sources.settings import SourceSettings

__all__ = [
    "FIND",
    "GET",
    "MOVE",
    "AssociationRejected",
    "InstanceMatch",
    "MoveDestinationUnknown",
    "NotFound",
    "QueryFailed",
    "RetrieveFailed",
    "RetrieveIncomplete",
    "RetrieveResult",
    "SeriesMatch",
    "ServiceRefused",
    "SourceClient",
    "SourceError",
    "SourceUnreachable",
    "StoreHandler",
    "StudyMatch",
    "iter_series",
    "retrieve_contexts",
]

log = logging.getLogger("dicom_node.sources.qr")

FIND = StudyRootQueryRetrieveInformationModelFind
MOVE = StudyRootQueryRetrieveInformationModelMove
GET = StudyRootQueryRetrieveInformationModelGet

#: Success, and Warning (Sub-operations Complete - One or More Failures), of C-MOVE/C-GET.
_SUCCESS, _SUBOPS_FAILED = 0x0000, 0xB000
_PENDING = (0xFF00, 0xFF01)
_CANCEL = 0xFE00
#: Move Destination Unknown (PS3.4 C.4.2.1.5).
_MOVE_DESTINATION_UNKNOWN = 0xA801

#: An ``EVT_C_STORE`` handler: takes pynetdicom's event, returns the C-STORE status (an
#: int, or a Dataset with Status and an Error Comment), as the node's C-STORE SCP does.
StoreHandler = Callable[[evt.Event], "int | Dataset"]


# -- errors ------------------------------------------------------------------------------
class SourceError(RuntimeError):
    """A query or retrieve failed; the message is one sentence the user can act on."""


class SourceUnreachable(SourceError):
    """Nothing that speaks DICOM answered at the source's address."""


class AssociationRejected(SourceError):
    """The source rejected the association (A-ASSOCIATE-RJ); ``reason`` is PS3.8's."""

    def __init__(self, message: str, result: int, source: int, reason: int) -> None:
        super().__init__(message)
        self.result, self.source, self.reason = result, source, reason


class ServiceRefused(SourceError):
    """The source accepted the association but refused the Q/R service's context."""


class NotFound(SourceError):
    """The study, series or instances asked for are not at the source."""


class QueryFailed(SourceError):
    """A C-FIND ended with a failure status (or no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RetrieveFailed(SourceError):
    """A C-MOVE or C-GET ended with a failure status (or no answer)."""

    def __init__(self, message: str, result: RetrieveResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class MoveDestinationUnknown(RetrieveFailed):
    """The source does not know the AE title it was asked to move to."""


class RetrieveIncomplete(RetrieveFailed):
    """Some sub-operations failed: ``result`` says how many and which."""


# -- results -----------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyMatch:
    """A study as the source describes it at STUDY level."""

    study_uid: str
    study_date: str = ""
    study_description: str = ""
    accession_number: str = ""
    modalities: tuple[str, ...] = ()
    series_count: int | None = None
    instance_count: int | None = None


@dataclass(frozen=True)
class SeriesMatch:
    """A series as the source describes it at SERIES level."""

    study_uid: str
    series_uid: str
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part: str = ""
    #: Number of Series Related Instances, where the source returns it.
    instance_count: int | None = None


@dataclass(frozen=True)
class InstanceMatch:
    """An instance as the source lists it at IMAGE level."""

    sop_instance_uid: str
    sop_class_uid: str = ""
    instance_number: int | None = None


@dataclass(frozen=True)
class RetrieveResult:
    """How a C-MOVE or C-GET ended: the source's final status and sub-operation counts.

    ``completed`` is ``None`` where the source gave no count (PS3.4 allows a final
    response without them). ``received`` counts, for a C-GET, the C-STORE sub-operations
    the store handler answered with success or a warning.
    """

    source: str
    status: int
    completed: int | None = None
    failed: int = 0
    warning: int = 0
    failed_sop_instance_uids: tuple[str, ...] = ()
    received: int = 0

    @property
    def meaning(self) -> str:
        return _meaning(QR_MOVE_SERVICE_CLASS_STATUS, self.status)


def _meaning(table: dict[int, tuple[str, str]], status: int) -> str:
    known = table.get(status)
    if known is not None and known[1]:
        return known[1]
    return "Success" if status == _SUCCESS else "unknown status"


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value)


# -- the SCU -----------------------------------------------------------------------------
def retrieve_contexts(
    sop_classes: Sequence[str], transfer_syntaxes: Sequence[str]
) -> list[tuple[str, str]]:
    """The (SOP class, transfer syntax) pairs a C-GET proposes for its C-STORE
    sub-operations: one presentation context each.

    One context per transfer syntax, rather than one context listing them all, because the
    acceptor picks one syntax per context: with every syntax on offer separately the PACS
    can send each instance in the syntax it holds it in (Orthanc looks for exactly that,
    and transcodes only when it finds none), so compressed images arrive as they were
    encoded.
    """
    return [(str(c), str(ts)) for c in sop_classes for ts in transfer_syntaxes]


class SourceClient:
    """Query/Retrieve SCU for one source: each call is one association.

    Parameters
    ----------
    source:
        The PACS to talk to.
    calling_ae:
        This node's AE title (the PACS must know it to answer C-FIND, C-MOVE and C-GET).
    tls:
        The node's ``[tls]`` settings, used when ``source.tls``.
    storage_sop_classes, transfer_syntaxes:
        What a C-GET accepts back (the node passes its SCP's CT SOP classes and the
        transfer syntaxes it decodes); the defaults are those.
    """

    def __init__(
        self,
        source: SourceSettings,
        calling_ae: str,
        tls: TLSSettings | None = None,
        storage_sop_classes: Sequence[str] | None = None,
        transfer_syntaxes: Sequence[str] | None = None,
    ) -> None:
        self.source = source
        self.calling_ae = calling_ae
        self.tls = tls or TLSSettings()
        if storage_sop_classes is None or transfer_syntaxes is None:
            from dicom_node.intake.checks import CT_SOP_CLASSES
            from dicom_node.intake.scp import TRANSFER_SYNTAXES

            storage_sop_classes = storage_sop_classes or CT_SOP_CLASSES
            transfer_syntaxes = transfer_syntaxes or TRANSFER_SYNTAXES
        self.storage_sop_classes = tuple(str(u) for u in storage_sop_classes)
        self.transfer_syntaxes = tuple(str(u) for u in transfer_syntaxes)
        if source.tls:
            client_ssl_context(self.tls)  # a bad certificate path fails here, clearly

    # -- C-FIND ---------------------------------------------------------------------------
    def find_study(self, study_uid: str) -> StudyMatch:
        """The study at STUDY level; raises :class:`NotFound` when the source lacks it."""
        query = _query("STUDY", StudyInstanceUID=study_uid)
        for keyword in (
            "StudyDate",
            "StudyDescription",
            "AccessionNumber",
            "ModalitiesInStudy",
            "NumberOfStudyRelatedSeries",
            "NumberOfStudyRelatedInstances",
        ):
            setattr(query, keyword, None)
        matches = [m for m in self._find(query) if _text(m, "StudyInstanceUID") == study_uid]
        if not matches:
            raise NotFound(f"study {study_uid} is not at {self.source.describe()}")
        m = matches[0]
        modalities = m.get("ModalitiesInStudy") or ()
        return StudyMatch(
            study_uid=study_uid,
            study_date=_text(m, "StudyDate"),
            study_description=_text(m, "StudyDescription"),
            accession_number=_text(m, "AccessionNumber"),
            modalities=tuple(str(v) for v in (modalities if _multi(modalities) else [modalities])),
            series_count=_int(m.get("NumberOfStudyRelatedSeries")),
            instance_count=_int(m.get("NumberOfStudyRelatedInstances")),
        )

    def find_series(self, study_uid: str, series_uid: str = "") -> list[SeriesMatch]:
        """The series of a study (or the one ``series_uid``), in Series Number order.

        Raises :class:`NotFound` when nothing matches: the study (or series) is not there.
        """
        query = _query("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
        for keyword in (
            "Modality",
            "SeriesNumber",
            "SeriesDescription",
            "BodyPartExamined",
            "NumberOfSeriesRelatedInstances",
        ):
            setattr(query, keyword, None)
        out = [
            SeriesMatch(
                study_uid=study_uid,
                series_uid=_text(m, "SeriesInstanceUID"),
                modality=_text(m, "Modality"),
                series_number=_int(m.get("SeriesNumber")),
                series_description=_text(m, "SeriesDescription"),
                body_part=_text(m, "BodyPartExamined"),
                instance_count=_int(m.get("NumberOfSeriesRelatedInstances")),
            )
            for m in self._find(query)
            if _text(m, "SeriesInstanceUID")
            and (not series_uid or _text(m, "SeriesInstanceUID") == series_uid)
        ]
        if not out:
            what = (
                f"series {series_uid} of study {study_uid}" if series_uid else f"study {study_uid}"
            )
            raise NotFound(f"{what} is not at {self.source.describe()}")
        out.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.series_uid))
        return out

    def find_instances(self, study_uid: str, series_uid: str) -> list[InstanceMatch]:
        """The instances of a series at IMAGE level (empty when the source has none)."""
        query = _query(
            "IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, SOPInstanceUID=""
        )
        query.SOPClassUID = None
        query.InstanceNumber = None
        seen: dict[str, InstanceMatch] = {}
        for m in self._find(query):
            uid = _text(m, "SOPInstanceUID")
            if uid and _text(m, "SeriesInstanceUID") in ("", series_uid):
                seen.setdefault(
                    uid,
                    InstanceMatch(uid, _text(m, "SOPClassUID"), _int(m.get("InstanceNumber"))),
                )
        return list(seen.values())

    def count_instances(self, study_uid: str, series_uid: str) -> int:
        """How many instances of the series the source holds, counted at IMAGE level
        (Number of Series Related Instances is optional for a PACS; the list is not)."""
        return len(self.find_instances(study_uid, series_uid))

    def _find(self, query: Dataset) -> list[Dataset]:
        with self._association([(FIND, None)], "C-FIND") as assoc:
            matches: list[Dataset] = []
            status: int | None = None
            since = time.monotonic()
            for answer, identifier in assoc.send_c_find(query, FIND):
                if not answer or "Status" not in answer:
                    break  # no answer in time, or the association ended
                status, since = int(answer.Status), time.monotonic()
                if status in _PENDING:
                    if identifier is not None:
                        matches.append(identifier)
                    continue
                break
        if status is None:
            raise self._no_answer(assoc, "C-FIND", since)
        if status not in (_SUCCESS, 0xB001, _CANCEL):
            raise QueryFailed(
                f"{self.source.describe()} failed the C-FIND with status 0x{status:04X} "
                f"({_meaning(QR_FIND_SERVICE_CLASS_STATUS, status)})",
                status,
            )
        return matches

    # -- C-MOVE and C-GET -------------------------------------------------------------------
    def move(
        self,
        destination_ae: str,
        study_uid: str,
        series_uid: str = "",
        sop_instance_uids: Sequence[str] = (),
    ) -> RetrieveResult:
        """C-MOVE the study (or its series, or some of the series' instances) to
        ``destination_ae`` (the node's own AE title), which the source must know.

        Returns when the source sends its final response (Orthanc and dcmqrscp send the
        instances before it). Raises :class:`MoveDestinationUnknown`,
        :class:`NotFound`, :class:`RetrieveIncomplete` (with the counts) or
        :class:`RetrieveFailed`.
        """
        identifier = _retrieve_identifier(study_uid, series_uid, sop_instance_uids)
        with self._association([(MOVE, None)], "C-MOVE") as assoc:
            responses = assoc.send_c_move(identifier, destination_ae, MOVE)
            result = self._collect(assoc, responses, "C-MOVE")
        return self._judge(result, "C-MOVE", identifier, destination_ae)

    def get(
        self,
        on_store: StoreHandler,
        study_uid: str,
        series_uid: str = "",
        sop_instance_uids: Sequence[str] = (),
        handlers: Sequence[tuple] = (),
    ) -> RetrieveResult:
        """C-GET the study (or its series, or some of the series' instances): each
        instance arrives as a C-STORE sub-operation on this association and goes to
        ``on_store`` (an ``EVT_C_STORE`` handler; its status is the sub-operation's).

        The node's SCP handler may be passed as it is, and ``handlers`` bound to the
        association beside it (the SCP's ``EVT_RELEASED`` and ``EVT_ABORTED`` handlers,
        so that a C-GET ends like an association that pushed the series). Raises as
        :meth:`move` does, but for the move destination.
        """
        identifier = _retrieve_identifier(study_uid, series_uid, sop_instance_uids)
        received = [0]

        def store(event: evt.Event) -> int | Dataset:
            answer = on_store(event)
            status = int(answer.Status) if isinstance(answer, Dataset) else int(answer)
            if status == _SUCCESS or status & 0xF000 == 0xB000:
                received[0] += 1
            return answer

        contexts: list[tuple[str, str | None]] = [(GET, None)]
        contexts += retrieve_contexts(self.storage_sop_classes, self.transfer_syntaxes)
        roles = [build_role(c, scp_role=True) for c in self.storage_sop_classes]
        with self._association(
            contexts, "C-GET", roles=roles, handlers=[(evt.EVT_C_STORE, store), *handlers]
        ) as assoc:
            responses = assoc.send_c_get(identifier, GET)
            result = self._collect(assoc, responses, "C-GET")
        result = dataclasses.replace(result, received=received[0])
        return self._judge(result, "C-GET", identifier, "")

    def retrieve(
        self,
        study_uid: str,
        series_uid: str = "",
        *,
        destination_ae: str,
        on_store: StoreHandler,
        sop_instance_uids: Sequence[str] = (),
        handlers: Sequence[tuple] = (),
    ) -> RetrieveResult:
        """:meth:`move` to ``destination_ae`` or :meth:`get` into ``on_store`` (with
        ``handlers``), as the source's ``retrieve`` setting says."""
        if self.source.retrieve == "get":
            return self.get(on_store, study_uid, series_uid, sop_instance_uids, handlers)
        return self.move(destination_ae, study_uid, series_uid, sop_instance_uids)

    def _collect(
        self, assoc: Association, responses: Iterable[tuple[Dataset, Dataset | None]], op: str
    ) -> RetrieveResult:
        """Read a C-MOVE or C-GET's responses to the last (the final one)."""
        status: int | None = None
        counts: dict[str, int | None] = {}
        failed_uids: tuple[str, ...] = ()
        since = time.monotonic()
        for answer, identifier in responses:
            if not answer or "Status" not in answer:
                break
            status, since = int(answer.Status), time.monotonic()
            for keyword in (
                "NumberOfCompletedSuboperations",
                "NumberOfFailedSuboperations",
                "NumberOfWarningSuboperations",
            ):
                value = _int(answer.get(keyword))
                if value is not None:
                    counts[keyword] = value
            if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
                value = identifier.FailedSOPInstanceUIDList
                failed_uids = tuple(str(v) for v in (value if _multi(value) else [value]) if v)
            if status not in _PENDING:
                break
        if status is None or status in _PENDING:
            raise self._no_answer(assoc, op, since, started=status is not None)
        return RetrieveResult(
            source=self.source.name,
            status=status,
            completed=counts.get("NumberOfCompletedSuboperations"),
            failed=counts.get("NumberOfFailedSuboperations") or 0,
            warning=counts.get("NumberOfWarningSuboperations") or 0,
            failed_sop_instance_uids=failed_uids,
        )

    def _no_answer(
        self, assoc: Association, op: str, since: float, started: bool = False
    ) -> SourceError:
        """Why a request got no (final) answer: time ran out, the association ended in the
        middle, or it ended at once, which is how Orthanc refuses an AE title it does not
        allow to query or retrieve (it accepts the association, then closes the connection
        when the request comes)."""
        src = self.source
        failed = QueryFailed if op == "C-FIND" else RetrieveFailed
        # pynetdicom yields an empty status both when time runs out and when the peer
        # ends the association; the time taken tells them apart.
        if time.monotonic() - since >= src.timeout_seconds:
            return failed(
                f"{src.describe()} sent no {'further ' if started else ''}answer to the {op} "
                f"within {src.timeout_seconds:g} s (timeout_seconds)"
            )
        if started:
            return failed(f"{src.describe()} ended the association in the middle of the {op}")
        return ServiceRefused(
            f"{src.describe()} ended the association without answering the {op} from "
            f"{self.calling_ae!r}: allow that AE title to {_VERBS[op]} there (a PACS does "
            "this to AE titles it does not know)"
        )

    def _judge(
        self, result: RetrieveResult, op: str, identifier: Dataset, destination_ae: str
    ) -> RetrieveResult:
        """The result, or the one error that says what went wrong."""
        what = _what(identifier)
        status = result.status
        table = QR_GET_SERVICE_CLASS_STATUS if op == "C-GET" else QR_MOVE_SERVICE_CLASS_STATUS
        meaning = _meaning(table, status)
        done = (result.completed if result.completed is not None else result.received) + (
            result.warning
        )
        if status == _MOVE_DESTINATION_UNKNOWN:
            raise MoveDestinationUnknown(_unknown_destination(self.source, destination_ae), result)
        if status == _SUCCESS and result.failed == 0:
            if done == 0 and result.completed is not None:
                raise NotFound(f"{what} is not at {self.source.describe()} (nothing to retrieve)")
            return result
        if status == _CANCEL:
            raise RetrieveFailed(f"{self.source.describe()} cancelled the {op} of {what}", result)
        if result.failed or status == _SUBOPS_FAILED:
            total = done + result.failed
            which = (
                f" ({', '.join(result.failed_sop_instance_uids[:3])}"
                + (", ..." if len(result.failed_sop_instance_uids) > 3 else "")
                + ")"
                if result.failed_sop_instance_uids
                else ""
            )
            raise RetrieveIncomplete(
                f"{self.source.describe()} retrieved {what} only in part: {result.failed} of "
                f"{total} instances failed{which}"
                + (
                    f"; {destination_ae!r} refused them or could not be reached (see its log)"
                    if op == "C-MOVE"
                    else "; this node refused them or was offered them in a SOP class or "
                    "transfer syntax it does not accept (see its log)"
                ),
                result,
            )
        if op == "C-MOVE" and status & 0xF000 == 0xC000 and done == 0:
            # Orthanc's answer to a destination missing from its modalities; a C-FIND tells
            # that apart from a study it does not hold.
            self._must_hold(identifier)
            raise MoveDestinationUnknown(
                _unknown_destination(self.source, destination_ae, status, meaning), result
            )
        raise RetrieveFailed(
            f"{self.source.describe()} failed the {op} of {what} with status 0x{status:04X} "
            f"({meaning})",
            result,
        )

    def _must_hold(self, identifier: Dataset) -> None:
        """Raise :class:`NotFound` unless the source holds what ``identifier`` names."""
        study, series = identifier.StudyInstanceUID, identifier.get("SeriesInstanceUID", "")
        if series:
            self.find_series(study, series)
        else:
            self.find_study(study)

    # -- association ------------------------------------------------------------------------
    def _association(
        self,
        contexts: Sequence[tuple[str, str | None]],
        op: str,
        roles: Sequence[Any] = (),
        handlers: Sequence[tuple] = (),
    ) -> _Open:
        """An established association for ``op``, or the :class:`SourceError` saying why
        not; released when the ``with`` block ends."""
        timeout = self.source.timeout_seconds
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = timeout
        for abstract, syntax in contexts:
            if syntax is None:
                ae.add_requested_context(abstract)
            else:
                ae.add_requested_context(abstract, syntax)
        rejections: list[A_ASSOCIATE_RJ] = []

        def keep(event: evt.Event) -> None:
            if isinstance(event.pdu, A_ASSOCIATE_RJ):
                rejections.append(event.pdu)

        tls_args = (client_ssl_context(self.tls), self.source.host) if self.source.tls else None
        assoc = ae.associate(
            self.source.host,
            self.source.port,
            ae_title=self.source.ae_title,
            ext_neg=list(roles) or None,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_PDU_RECV, keep), TUNE_REQUESTED, *handlers],
        )
        service = contexts[0][0]
        if not assoc.is_established:
            raise self._not_established(assoc, rejections, service, op)
        if not any(cx.abstract_syntax == service for cx in assoc.accepted_contexts):
            assoc.release()
            raise _service_refused(self.source, service, op, self.calling_ae)
        return _Open(assoc)

    def _not_established(
        self, assoc: Association, rejections: list[A_ASSOCIATE_RJ], service: str, op: str
    ) -> SourceError:
        src = self.source
        if rejections:
            rj = rejections[0]
            result, source, reason = rj.result or 0, rj.source or 0, rj.reason_diagnostic or 0
            hint = _REJECTION_HINTS.get((source, reason), "")
            hint = hint.format(calling=self.calling_ae, called=src.ae_title, name=src.name)
            return AssociationRejected(
                f"{src.describe()} rejected the association ({rj.result_str}, {rj.source_str}: "
                f"{rj.reason_str}){'; ' + hint if hint else ''}",
                result,
                source,
                reason,
            )
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            return _service_refused(src, service, op, self.calling_ae)
        return SourceUnreachable(_unreachable(src))


class _Open:
    """An established association as a context manager: released (or aborted) at the end."""

    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc

    def __enter__(self) -> Association:
        return self.assoc

    def __exit__(self, *exc: object) -> None:
        if self.assoc.is_established:
            if exc[0] is None:
                self.assoc.release()
            else:
                self.assoc.abort()


#: What to fix for an A-ASSOCIATE-RJ, by (source, reason) (PS3.8 9.3.4).
_REJECTION_HINTS = {
    (1, 3): "add this node's AE title {calling!r} to the PACS's known DICOM modalities",
    (1, 7): "check the AE title of source {name!r} ({called!r}) against the PACS's own",
    (3, 1): "the PACS is busy; try again later",
    (3, 2): "the PACS has too many associations open; try again later",
}


#: What each operation asks of the PACS, in its configuration's words.
_VERBS = {"C-FIND": "query (C-FIND)", "C-MOVE": "retrieve (C-MOVE)", "C-GET": "retrieve (C-GET)"}


def _service_refused(src: SourceSettings, service: str, op: str, calling: str) -> ServiceRefused:
    return ServiceRefused(
        f"{src.describe()} refused {UID(service).name} to {calling!r}: allow that AE title "
        f"to {_VERBS[op]} there (a PACS refuses Q/R to AE titles it does not know)"
    )


def _unknown_destination(
    src: SourceSettings,
    destination_ae: str,
    status: int = _MOVE_DESTINATION_UNKNOWN,
    meaning: str = "",
) -> str:
    said = (
        "answered 0xA801 (Move Destination Unknown)"
        if status == _MOVE_DESTINATION_UNKNOWN
        else f"refused the move of what it holds with 0x{status:04X} ({meaning})"
    )
    return (
        f"{src.describe()} {said}: add {destination_ae!r} with this node's host and port to "
        "its DICOM modalities (the PACS must know where to send the instances)"
    )


def _unreachable(src: SourceSettings) -> str:
    """Why nothing answered: a plain TCP connection, tried again, names the cause."""
    try:
        socket.create_connection((src.host, src.port), timeout=min(src.timeout_seconds, 10)).close()
        why = "it accepted the connection but ended it before answering the association request"
        if not src.tls:
            why += " (does it expect DICOM TLS?)"
    except socket.gaierror:
        why = f"the host name {src.host!r} is not known"
    except ConnectionRefusedError:
        why = f"nothing listens on port {src.port}"
    except TimeoutError:
        why = "no answer (a firewall, or the wrong address)"
    except OSError as exc:
        why = exc.strerror or str(exc)
    return f"{src.describe()} cannot be reached: {why}"


def _multi(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"


def _query(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _retrieve_identifier(
    study_uid: str, series_uid: str, sop_instance_uids: Sequence[str]
) -> Dataset:
    if sop_instance_uids and not series_uid:
        raise ValueError("instances are retrieved by series: give series_uid")
    if sop_instance_uids:
        return _query(
            "IMAGE",
            StudyInstanceUID=study_uid,
            SeriesInstanceUID=series_uid,
            SOPInstanceUID=list(sop_instance_uids),  # type: ignore[arg-type]
        )
    if series_uid:
        return _query("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
    return _query("STUDY", StudyInstanceUID=study_uid)


def _what(identifier: Dataset) -> str:
    level = identifier.QueryRetrieveLevel
    if level == "IMAGE":
        uids = identifier.SOPInstanceUID
        n = len(uids) if _multi(uids) else 1
        return f"{n} instance(s) of series {identifier.SeriesInstanceUID}"
    if level == "SERIES":
        return f"series {identifier.SeriesInstanceUID}"
    return f"study {identifier.StudyInstanceUID}"


def iter_series(
    client: SourceClient, study_uid: str, modality: str = "CT"
) -> Iterator[SeriesMatch]:
    """The study's series of ``modality`` (all with ``""``): what a fetch of the study
    retrieves, series by series, so each becomes one job."""
    for series in client.find_series(study_uid):
        if not modality or series.modality.upper() == modality.upper():
            yield series
