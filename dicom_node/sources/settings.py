"""A source: a PACS the node may query and retrieve from, one ``[[sources]]`` table.

The configuration (:mod:`dicom_node.config`) reads each ``[[sources]]`` table as a
:class:`SourceSettings` with the one validator every section goes through; the checks
that relate a source to the rest of the configuration are :meth:`SourceSettings.check`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dicom_node.config import ConfigError, check_ae_title, one_of, positive, tcp_port

if TYPE_CHECKING:
    from dicom_node.config import Settings

__all__ = ["SourceSettings"]


@dataclass(frozen=True)
class SourceSettings:
    """A PACS the node may query and retrieve from.

    ``retrieve`` picks how instances come back: ``"move"`` (C-MOVE: the PACS opens an
    association to the node's C-STORE SCP, so it must know the node's AE title, host and
    port) or ``"get"`` (C-GET: the instances come back on the node's own association, so
    the PACS needs no route to the node, only to accept its AE title).
    """

    name: str
    ae_title: str
    host: str
    port: int = tcp_port(104)
    #: Over DICOM TLS, with the certificates of the [tls] section.
    tls: bool = False
    #: "move": C-MOVE to this node's AE title (the PACS must know it, with the node's host
    #: and port); "get": C-GET, the instances come back on the node's own association.
    retrieve: str = one_of(
        "move", "get", notes={"move": "C-MOVE to this node", "get": "C-GET on one association"}
    )
    #: Seconds to wait for the association, and then for each response.
    timeout_seconds: float = positive(30.0)
    #: A series the settle timer completed is first compared with this source (instances
    #: counted at IMAGE level), and the instances it lacks are retrieved before it is
    #: processed.
    top_up: bool = False

    def describe(self) -> str:
        """How messages name the source: ``source 'pacs' (ORTHANC at 10.0.0.5:4242)``."""
        return f"source {self.name!r} ({self.ae_title} at {self.host}:{self.port})"

    def check(self, key: str, settings: Settings) -> None:
        """Raise :class:`~dicom_node.config.ConfigError` for a value the validator of
        single fields cannot judge."""
        if not self.name.strip():
            raise ConfigError(f"{key}.name: must not be empty")
        check_ae_title(self.ae_title, f"{key}.ae_title")
        if not self.host.strip():
            raise ConfigError(f"{key}.host: must name the PACS's host")
