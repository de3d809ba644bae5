"""What intake tells the stages after it.

Two events leave intake: each C-STORE's outcome
(:class:`~dicom_node.intake.storage.StoreOutcome`, which the streaming assembler and the
metrics take) and each normal association release (:class:`AssociationReleased`, which
completion takes). C-STORE handlers run before the peer is answered, release handlers after.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from dicom_node.common.events import Events
from dicom_node.intake.storage import StoreOutcome

__all__ = ["AssociationReleased", "Events", "StoreOutcome"]


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
