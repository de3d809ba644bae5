"""C-STORE: results to a DICOM destination (``type = "dicom"``), under the outbox's rules.

Each attempt opens an association to the destination (DICOM TLS with the ``[tls]``
certificates where the destination says ``tls``), proposes the SOP class and transfer
syntax of each file exactly as it lies on disk (no transcoding) and stores the files in
order, reporting each acknowledgement as it arrives. A failure is recorded as the peer
stated it: the association rejection with its source and reason, a presentation context
refused for the SOP class, or the DIMSE status and its meaning (PS3.4 B.2.3).
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ

from dicom_node.common.associations import TUNE_REQUESTED
from dicom_node.common.network import is_loopback
from dicom_node.common.tls import client_ssl_context, client_tls_args
from dicom_node.config import (
    ConfigError,
    Destination,
    Settings,
    TLSSettings,
    address,
    at_least,
    check_ae_title,
    positive,
)
from dicom_node.export.transport import (
    OK_STATUSES,
    OnAck,
    Outcome,
    Outgoing,
    SegChoice,
    deliver,
    sop_class_name,
    status_meaning,
)

__all__ = ["DicomDestination", "DimseTransport", "ExportError", "cstore_batch", "send_files"]


@dataclass(frozen=True)
class DicomDestination(Destination):
    """A destination that takes results by C-STORE: ``ae_title``, ``host``, ``port``."""

    type: str = "dicom"
    ae_title: str = ""
    host: str = address("", optional=True)
    port: int = 0
    #: Send over DICOM TLS, with the certificates of the [tls] section.
    tls: bool = False
    #: Associations opened at once to send a series' results, one result each (1: all over
    #: one association, in order).
    max_associations: int = at_least(3, 1)
    #: The node starts this destination itself: an Orthanc on loopback at ``port`` with
    #: ``ae_title``, and the OHIF viewer in front of it ([embedded],
    #: :mod:`dicom_node.service.embedded`).
    embedded: bool = False
    #: Ask the destination, once it acknowledged results, to commit to keeping them
    #: (Storage Commitment Push Model, :mod:`dicom_node.export.commitment`). The PACS
    #: reports on a new association to this node's AE title, host and port.
    storage_commitment: bool = False
    #: Seconds after a commitment request without a report before it is asked again.
    commitment_report_timeout_seconds: float = positive(600.0)
    #: Requests without a report (or refused) for one send before the result is recorded
    #: as failed.
    commitment_requests: int = at_least(3, 1)
    #: Seconds after the PACS reported a result not committed before it is sent again
    #: (within ``attempts`` sends in all).
    commitment_resend_seconds: float = at_least(300.0, 0)

    def check(self, key: str, settings: Settings) -> None:
        super().check(key, settings)
        for name in ("ae_title", "host"):
            if not getattr(self, name):
                raise ConfigError(f"{key}: missing required key {name!r}")
        check_ae_title(self.ae_title, f"{key}.ae_title")
        if not 0 < self.port < 65536:
            raise ConfigError(f"{key}.port: {self.port} is not a TCP port")
        if self.embedded and not is_loopback(self.host):
            raise ConfigError(
                f"{key}.host: an embedded destination listens on loopback (127.0.0.1), "
                f"not {self.host!r}"
            )
        if self.embedded and self.tls:
            raise ConfigError(f"{key}.tls: the embedded Orthanc speaks no TLS")

    def runs_embedded(self) -> bool:
        return self.embedded

    def asks_commitment(self) -> bool:
        return self.storage_commitment


class ExportError(RuntimeError):
    """A destination could not be reached or refused; the message says which and how."""


def _header(path: Path) -> tuple[str, str]:
    """(SOP Class UID, Transfer Syntax UID) of a Part 10 file, read without its pixels."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    return str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)


def _keep_rejection(pdu: Any, answers: list[Any]) -> None:
    """Keep an A-ASSOCIATE-RJ PDU among ``answers`` (every other PDU goes by)."""
    if isinstance(pdu, A_ASSOCIATE_RJ):
        answers.append(pdu)


def cstore_batch(
    destination: DicomDestination,
    items: list[Outgoing],
    calling_ae: str,
    timeout: float = 30.0,
    tls: TLSSettings | None = None,
    choice: SegChoice | None = None,
    on_ack: Callable[[Outgoing, Outcome], None] | None = None,
) -> dict[int, Outcome]:
    """C-STORE ``items`` to ``destination`` in one association; one :class:`Outcome` per
    item key.

    Both forms of a SEG (and of the SR naming it) are proposed: where the association
    refuses the Label Map Segmentation context, or a store of the label map fails with a
    status refusing its SOP class, the binary form goes instead, in the same association
    (``choice`` records it). ``on_ack`` is called the moment a success (or warning)
    arrives, before the next item is sent. Raises :class:`ExportError` saying what the
    peer said when no association could be established.
    """
    choice = choice or SegChoice()
    headers: dict[Path, tuple[str, str]] = {}
    for item in items:
        for path in (item.path, item.alt_path):
            if path is not None and path not in headers:
                headers[path] = _header(path)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class, syntax in dict.fromkeys(headers.values()):
        ae.add_requested_context(sop_class, syntax)
    answers: list[Any] = []
    # The rejection is taken from the PDU as it arrives: a peer that closes the connection
    # right after its A-ASSOCIATE-RJ can have pynetdicom abort the association before the
    # rejection reaches its ACSE (seen with Orthanc on a loaded host), which left only
    # "cannot be reached" to say.
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=client_tls_args(tls or TLSSettings(), destination.host, destination.tls),
        evt_handlers=[
            (evt.EVT_ACSE_RECV, lambda event: answers.append(event.primitive)),
            (evt.EVT_PDU_RECV, lambda event: _keep_rejection(event.pdu, answers)),
            TUNE_REQUESTED,
        ],
    )
    refused = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
    accepted = {
        (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
    }
    if not assoc.is_established:
        rj = next((a for a in answers if isinstance(a, A_ASSOCIATE_RJ)), None)
        if assoc.is_rejected or rj is not None:
            why = f" ({rj.result_str}, {rj.source_str}: {rj.reason_str})" if rj is not None else ""
            raise ExportError(f"{destination.name} rejected the association{why}")
        if refused and not accepted:  # pynetdicom aborts when no context was accepted
            raise ExportError(
                f"{destination.name} refused the presentation context for "
                + ", ".join(sop_class_name(u) for u in sorted(refused))
                + " (the SOP class is not accepted there)"
            )
        if assoc.is_aborted and answers:
            raise ExportError(
                f"{destination.name} aborted the association while it was being negotiated"
            )
        raise ExportError(
            f"{destination.name} ({destination.host}:{destination.port}) cannot be reached"
        )
    if any(
        item.alt_path is not None
        and item.choice == "auto"
        and headers[item.path] not in accepted
        and headers[item.alt_path] in accepted
        for item in items
    ):
        choice.refused(by_status=False)  # negotiation said so: learned again next time

    def sop_class_of(path: Path) -> str:
        return headers[path][0]

    def store(path: Path) -> Outcome:
        sop_class = headers[path][0]
        if headers[path] not in accepted:
            return Outcome(
                False,
                error=f"{destination.name} refused the presentation context for "
                f"{sop_class_name(sop_class)} (the SOP class is not accepted there)",
            )
        try:
            # a path is sent as the bytes on disk: no decoding, no re-encoding
            answer = assoc.send_c_store(path)
        except (ValueError, RuntimeError, OSError) as exc:
            return Outcome(False, error=f"not sent: {exc}")
        if not answer or "Status" not in answer:
            return Outcome(False, error="no response (association lost)")
        status = int(answer.Status)
        if status in OK_STATUSES:
            return Outcome(True, status)
        return Outcome(
            False,
            status,
            f"{destination.name} answered status 0x{status:04X} ({status_meaning(status)})",
        )

    results: dict[int, Outcome] = {}
    try:
        for item in items:
            outcome = deliver(
                item,
                choice,
                store,
                functools.partial(sop_class_of, item.path),
                destination.name,
                lambda: assoc.is_established,
            )
            results[item.key] = outcome
            if outcome.ok and on_ack is not None:
                on_ack(item, outcome)
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def send_files(
    destination: DicomDestination,
    paths: list[Path],
    calling_ae: str,
    timeout: float = 30.0,
    tls: TLSSettings | None = None,
    on_ack: Callable[[Path, int], None] | None = None,
) -> dict[Path, int | str]:
    """C-STORE ``paths`` to ``destination`` in one association (no alternative forms).

    Returns, per path, the DIMSE status (int) or an error sentence (str); ``on_ack`` is
    called with each path and status the moment a success (or warning) arrives. Raises
    :class:`ExportError` when no association could be established.
    """
    items = [Outgoing(key=k, path=Path(p)) for k, p in enumerate(paths)]
    outcomes = cstore_batch(
        destination,
        items,
        calling_ae,
        timeout,
        tls,
        on_ack=None
        if on_ack is None
        else (lambda item, outcome: on_ack(item.path, outcome.status)),  # type: ignore[arg-type]
    )
    out: dict[Path, int | str] = {}
    for item in items:
        outcome = outcomes.get(item.key)
        if outcome is None:
            continue
        out[item.path] = outcome.status if outcome.status is not None else outcome.error
    return out


class DimseTransport:
    """C-STORE to one :class:`DicomDestination`.

    One item an association, up to the destination's ``max_associations`` at once, when no
    item has an alternative form; otherwise over one association, in order, so that an SR
    follows the form its SEG took in it. A series' SEG, RTSTRUCT and SR are stored by the
    PACS one after another over one association; over three, its storage of each overlaps
    the others' (about half the time from the first C-STORE to the last acknowledgement, to
    Orthanc here).
    """

    settings = DicomDestination
    protocol = "C-STORE"

    def __init__(self, settings: Settings, destination: DicomDestination) -> None:
        self.node = settings
        self.destination = destination
        if destination.tls:
            client_ssl_context(settings.tls)  # a bad certificate path fails at start, clearly

    def send(self, items: list[Outgoing], choice: SegChoice, on_ack: OnAck) -> dict[int, Outcome]:
        dest = self.destination

        def one_association(batch: list[Outgoing]) -> dict[int, Outcome]:
            try:
                return cstore_batch(
                    dest,
                    batch,
                    self.node.node.ae_title,
                    self.node.limits.network_timeout,
                    self.node.tls,
                    choice,
                    on_ack,
                )
            except (ExportError, OSError) as exc:
                return {o.key: Outcome(False, error=str(exc)) for o in batch}

        if dest.max_associations == 1 or len(items) == 1 or any(o.alt_path for o in items):
            return one_association(items)
        results: dict[int, Outcome] = {}
        workers = min(len(items), dest.max_associations)
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="cstore") as pool:
            for part in pool.map(one_association, [[o] for o in items]):
                results.update(part)
        return results
