"""Transports: how outbox items reach a destination, and the one registry of them.

A destination's ``type`` names its transport (:data:`TRANSPORTS`): ``"dicom"`` sends with
C-STORE (:mod:`.dimse`), ``"dicomweb"`` with STOW-RS (:mod:`.dicomweb`). A transport module
holds the settings its destinations take (a subclass of
:class:`~dicom_node.config.Destination`, which the configuration reads through
:func:`destination_settings`) and a :class:`Transport`; adding one is that module and one
entry in :data:`TRANSPORTS`. Every transport sits behind the one outbox: it takes
:class:`Outgoing` items and gives one :class:`Outcome` per item, and the sender
(:mod:`.sender`) keeps the retries, the exactly-once bookkeeping and the journal.

The label-map fallback. With ``[results] seg_type = "labelmap"`` the node writes, at result
time, both a Label Map SEG and a binary SEG of the same label map (and an SR naming each):
a destination that refuses the Label Map Segmentation class (in association negotiation,
or with a store status saying the SOP class is not taken) gets the binary SEG instead.
Both forms are encoded while the label map is in memory, rather than the label map SEG
being converted at export, because then the export stays a transport (no pixel decoding,
no source headers to read back from the spool), each form is written durably before its
run is "done" (the results-are-a-unit rule), and the SR a destination gets names the SEG
that destination has. :func:`deliver` is that rule, for every transport.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydicom.uid import UID
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

__all__ = [
    "TRANSPORTS",
    "LABEL_MAP_SEG",
    "Transport",
    "destination_settings",
    "transport_names",
    "register_transport",
    "transport_for",
    "deliver",
    "OK_STATUSES",
    "Outcome",
    "Outgoing",
    "SegChoice",
    "refuses_sop_class",
    "sop_class_name",
    "status_meaning",
]

log = logging.getLogger("dicom_node.export.sender")

#: Label Map Segmentation Storage (PS3.4 B.5, added in 2024): unknown to DCMTK 3.6.7, and
#: so to pydicom's UID names and to Orthanc 1.10.
LABEL_MAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"

#: Statuses a Storage SCP uses for success or success-with-warning (PS3.4 B.2.3).
OK_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}

_NAMES = {LABEL_MAP_SEG: "Label Map Segmentation Storage"}


def status_meaning(status: int) -> str:
    """A Storage SCP's DIMSE status, or a STOW-RS Failure Reason, in words (PS3.4 B.2.3,
    PS3.7 C; PS3.18 uses the same codes)."""
    known = STORAGE_SERVICE_CLASS_STATUS.get(status)
    if known is not None:
        return known[1]
    for mask, prefix, meaning in (
        (0xFF00, 0xA700, "Refused: Out of Resources"),
        (0xFF00, 0xA900, "Error: Data Set Does Not Match SOP Class"),
        (0xF000, 0xC000, "Error: Cannot Understand"),
        (0xF000, 0xB000, "Warning"),
    ):
        if status & mask == prefix:
            return meaning
    return "Failure" if status & 0xF000 in (0xA000, 0xC000) else "unknown status"


def refuses_sop_class(status: int) -> bool:
    """Whether a failure status says the SOP class itself is not taken: 0x0122 (SOP Class
    Not Supported) or 0xA9xx (Data Set Does Not Match SOP Class, what a PACS whose IOD
    tables predate the class answers). Such a refusal of a Label Map SEG makes the binary
    SEG go instead."""
    return status == 0x0122 or status & 0xFF00 == 0xA900


def sop_class_name(uid: str) -> str:
    name = _NAMES.get(str(uid)) or UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


@dataclass(frozen=True)
class Outgoing:
    """One outbox item as a transport sends it.

    ``alt_path`` is the binary form of a SEG (or the SR naming that binary SEG), where the
    destination may refuse the label map. ``choice``: "auto" (a SEG: offer the label map,
    fall back when refused), "follow" (an SR: the form the destination's SEG took in this
    attempt), "primary" or "alt" (the form its SEG already took in an earlier attempt).
    """

    key: int
    path: Path
    alt_path: Path | None = None
    choice: str = "auto"


@dataclass(frozen=True)
class Outcome:
    """What a destination said of one item: acknowledged or not, and in its words."""

    ok: bool
    #: The DIMSE status or STOW-RS Failure Reason, when the peer gave one.
    status: int | None = None
    #: Why it was not acknowledged, as the peer stated it (empty when ``ok``).
    error: str = ""
    #: The binary form (``alt_path``) was the one sent.
    alternative: bool = False


class SegChoice:
    """Whether one destination takes the Label Map SEG, as learned during an attempt.

    ``refuses`` starts from what the exporter learned from earlier store statuses (a
    refusal in negotiation is learned again, for free, at every association); a transport
    sets it when the destination refuses the class, and ``by_status`` when it was a store
    status that said so (worth remembering: each such try costs a whole send).
    """

    def __init__(self, refuses: bool = False) -> None:
        self.refuses = refuses
        self.by_status = False

    def use_alternative(self, item: Outgoing) -> bool:
        """Whether ``item`` goes in its binary form now."""
        if item.alt_path is None:
            return False
        if item.choice in ("primary", "alt"):
            return item.choice == "alt"
        return self.refuses

    def refused(self, by_status: bool) -> None:
        self.refuses = True
        self.by_status = self.by_status or by_status


def deliver(
    item: Outgoing,
    choice: SegChoice,
    store: Callable[[Path], Outcome],
    sop_class: Callable[[], str],
    destination: str,
    can_send_again: Callable[[], bool] = lambda: True,
) -> Outcome:
    """Send ``item`` with ``store`` in the form ``choice`` gives it; a Label Map SEG the
    destination refuses for its SOP class (``sop_class()`` of the item's primary file) is
    sent again at once as its binary SEG, and ``choice`` remembers the refusal. The rule is
    the same for C-STORE and STOW-RS; only how a file is stored differs."""
    alternative = choice.use_alternative(item)
    outcome = store(item.alt_path if alternative and item.alt_path else item.path)
    if (
        not outcome.ok
        and not alternative
        and item.alt_path is not None
        and item.choice == "auto"
        and outcome.status is not None
        and refuses_sop_class(outcome.status)
        and sop_class() == LABEL_MAP_SEG
        and can_send_again()
    ):
        log.info(
            "%s refused the Label Map SEG (%s): sending the binary SEG", destination, outcome.error
        )
        choice.refused(by_status=True)
        alternative = True
        outcome = store(item.alt_path)
    return Outcome(outcome.ok, outcome.status, outcome.error, alternative)


#: Called the moment a destination acknowledges an item, before the next is sent.
OnAck = Callable[[Outgoing, Outcome], None]


class Transport(Protocol):
    """Sends outbox items to one destination of its type.

    Built once per destination when the node starts, with the node's settings and the
    destination's (``cls(settings, destination)``): what cannot work (unreadable
    credentials, a bad certificate) raises :class:`~dicom_node.config.ConfigError` then.
    """

    def send(self, items: list[Outgoing], choice: SegChoice, on_ack: OnAck) -> dict[int, Outcome]:
        """Send ``items`` in order; one :class:`Outcome` per item key (an item left out was
        not attempted). Calls ``on_ack`` for each acknowledgement as it arrives. Failures
        of the peer are outcomes, never exceptions."""
        ...


#: Transports by destination ``type``: a class, or where to import it ("module:Class").
#: The class's ``settings`` attribute is the :class:`~dicom_node.config.Destination`
#: subclass its destinations are read as, its ``protocol`` what it speaks, in a word.
TRANSPORTS: dict[str, Any] = {
    "dicom": "dicom_node.export.dimse:DimseTransport",
    "dicomweb": "dicom_node.export.dicomweb:StowTransport",
}


def register_transport(kind: str, transport: Any) -> None:
    """Make destinations with ``type = kind`` go through ``transport`` (a class with a
    ``settings`` attribute, or "module:Class")."""
    TRANSPORTS[kind] = transport


def _transport_class(kind: str) -> Any:
    found = TRANSPORTS.get(kind)
    if isinstance(found, str):
        module, _, name = found.partition(":")
        found = getattr(importlib.import_module(module), name)
        TRANSPORTS[kind] = found
    return found


def transport_names() -> dict[str, str]:
    """Each destination type with the protocol its transport speaks ("C-STORE")."""
    return {kind: _transport_class(kind).protocol for kind in TRANSPORTS}


def destination_settings(kind: str) -> type | None:
    """The settings class of destinations of type ``kind``; ``None`` for an unknown type."""
    cls = _transport_class(kind)
    return None if cls is None else cls.settings


def transport_for(settings: Any, destination: Any) -> Transport:
    """The transport that sends to ``destination`` (a :class:`~dicom_node.config.Destination`
    read by :func:`destination_settings`, so its type is registered)."""
    return _transport_class(destination.type)(settings, destination)
