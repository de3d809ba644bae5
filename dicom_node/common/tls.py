"""DICOM TLS (PS3.15 Annex B.1, secure transport connection profile) for the node.

Two :class:`ssl.SSLContext` factories built from the ``[tls]`` settings: one for the SCP's
listening socket, one for associations the node opens to destinations. Both require TLS 1.2
or later (the BCP 195 profiles of PS3.15 B.9 and later forbid older versions) and verify the
peer against ``ca_certificates`` when it is given.

A certificate, key or CA file that is missing or unreadable is a configuration mistake and
raises :class:`TLSConfigError` (a :class:`~dicom_node.config.ConfigError`), so the node
refuses to start with one sentence rather than failing on the first peer.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

from dicom_node.config import ConfigError, TLSSettings

__all__ = [
    "TLSConfigError",
    "client_ssl_context",
    "client_tls_args",
    "peer_certificate_subject",
    "server_ssl_context",
]


class TLSConfigError(ConfigError):
    """The ``[tls]`` settings name files that cannot be used; the message says which."""


class _DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose sockets do their TLS handshake on first read.

    pynetdicom's server wraps each accepted socket in its single accept thread, and
    :meth:`ssl.SSLContext.wrap_socket` handshakes right there by default: one peer that opens
    a TCP connection and says nothing would hold that thread, so no other peer could
    connect. With the handshake deferred, it happens in the association's own thread, on its
    first read, bounded by the socket timeout the SCP sets when the connection opens.
    """

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect and not server_side,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )


def _readable(path: Path | None, key: str) -> Path:
    if path is None:
        raise TLSConfigError(f"tls.{key} is required when TLS is used")
    if not Path(path).is_file():
        raise TLSConfigError(f"tls.{key}: {path} does not exist or is not a file")
    return Path(path)


def _load_chain(ctx: ssl.SSLContext, tls: TLSSettings) -> None:
    cert = _readable(tls.certificate, "certificate")
    key = _readable(tls.private_key, "private_key")
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(
            f"tls: certificate {cert} and private key {key} cannot be loaded together: {exc}"
        ) from None


def _load_ca(ctx: ssl.SSLContext, tls: TLSSettings) -> None:
    ca = _readable(tls.ca_certificates, "ca_certificates")
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(
            f"tls.ca_certificates: {ca} holds no usable certificate: {exc}"
        ) from None


def server_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """The SSL context for the SCP's listening socket.

    Peers' certificates are verified against ``ca_certificates`` when given: required with
    ``require_client_certificate``, otherwise checked only if a peer presents one.
    """
    ctx = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, tls)
    if tls.require_client_certificate:
        if tls.ca_certificates is None:
            raise TLSConfigError(
                "tls.require_client_certificate needs tls.ca_certificates to verify peers against"
            )
        _load_ca(ctx, tls)
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_certificates is not None:
        _load_ca(ctx, tls)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """The SSL context for associations the node opens (exports to destinations).

    The destination's certificate must chain to ``ca_certificates`` (the system's CAs when
    that is not set) and name the host the node connects to. The node presents its own
    certificate when one is configured, for destinations that require client certificates.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca_certificates is not None:
        _load_ca(ctx, tls)
    if tls.certificate is not None or tls.private_key is not None:
        _load_chain(ctx, tls)
    return ctx


def client_tls_args(
    tls: TLSSettings, host: str, enabled: bool = True
) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for an association to ``host``; ``None`` unless ``enabled``."""
    if not enabled:
        return None
    return client_ssl_context(tls), host


def peer_certificate_subject(sock: socket.socket | None) -> str | None:
    """The common name (or full subject) of a TLS peer's verified certificate, if any."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        cert = sock.getpeercert()
    except (ValueError, OSError):  # handshake not done or connection gone
        return None
    if not cert:
        return None
    # ((("commonName", "x"),), ...): typeshed's union of every field's type hides that
    subject: Any = cert.get("subject", ())
    fields = {str(k): str(v) for rdn in subject for k, v in rdn}
    return fields.get("commonName") or ", ".join(f"{k}={v}" for k, v in fields.items())
