"""Sources: studies fetched from a PACS rather than pushed to the node.

A source (``[[sources]]``, :class:`~.settings.SourceSettings`) is a PACS the node may query
and retrieve from as a Query/Retrieve SCU (:mod:`.qr`: C-FIND, C-MOVE, C-GET, each failure
one sentence). The fetch worker (:mod:`.fetch`) retrieves a study or series on request
(``dicom-node fetch``, ``POST /fetch``) and the top-up completes a series the settle timer
completed with fewer instances than a source holds; either way the instances enter the node
through intake, as any C-STORE does, and their series is processed once, whole.
"""

from __future__ import annotations

from dicom_node.sources.qr import (
    AssociationRejected,
    MoveDestinationUnknown,
    NotFound,
    RetrieveIncomplete,
    ServiceRefused,
    SourceClient,
    SourceError,
    SourceUnreachable,
)
from dicom_node.sources.settings import SourceSettings

__all__ = [
    "AssociationRejected",
    "MoveDestinationUnknown",
    "NotFound",
    "RetrieveIncomplete",
    "ServiceRefused",
    "SourceClient",
    "SourceError",
    "SourceSettings",
    "SourceUnreachable",
]
