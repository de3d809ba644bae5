"""What intake tells the stages after it.

Each C-STORE's outcome (:class:`~dicom_node.intake.storage.StoreOutcome`, which the
streaming assembler, the metrics and the audit trail take) and each normal association
release (:class:`AssociationReleased`, which completion takes). For the audit trail also:
each association's end, released or aborted (:class:`AssociationEnded`), and each
connection or association the node refused (:class:`AssociationRefused`). C-STORE handlers
run before the peer is answered, the others after.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from dicom_node.common.events import Events
from dicom_node.intake.storage import StoreOutcome

__all__ = [
    "AssociationEnded",
    "AssociationRefused",
    "AssociationReleased",
    "Events",
    "StoreOutcome",
]


@dataclass(frozen=True)
class AssociationReleased:
    """An association was released normally (an abort never is).

    ``carried`` holds the SOP Instance UIDs it stored, by Series Instance UID (duplicates
    included: a sender re-sending a whole series after a crash completes it by its release);
    ``still_open`` the series that other associations, still open, have stored instances
    of: more of those may follow.
    """

    carried: Mapping[str, frozenset[str]]
    still_open: frozenset[str]


@dataclass(frozen=True)
class AssociationEnded:
    """An association ended, released or aborted (by either side, or its connection lost).

    ``association`` is the key its instances' :class:`StoreOutcome` carried
    (``StoreOutcome.association``); ``calling_ae`` and ``address`` name the peer.
    """

    association: int
    calling_ae: str
    address: str
    aborted: bool


@dataclass(frozen=True)
class AssociationRefused:
    """A connection or association the node refused, and why.

    ``calling_ae`` is ``None`` where the refusal came before the peer's request was read
    (a connection over a limit, a failed TLS handshake).
    """

    address: str
    calling_ae: str | None
    reason: str
