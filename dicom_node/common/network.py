"""Network addresses: the one rule for "this machine only".

A loopback address is reachable from this machine alone. The node asks it for two
reasons, with one answer: whether credentials or clinical pages may be served without
authentication (names are never resolved then: a name may resolve elsewhere tomorrow), and
whether a Triton server shares this machine's memory (a name such as ``triton`` in a
compose file is resolved then, since a wrong answer costs only speed).
"""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["host_of", "is_loopback"]


def host_of(address: str) -> str:
    """The host of ``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address."""
    address = address.strip()
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    try:
        ipaddress.ip_address(address)  # a bare address, IPv6 included
        return address
    except ValueError:
        return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def is_loopback(address: str, *, resolve: bool = False) -> bool:
    """Whether ``address`` (a host, ``host:port`` or ``[v6]:port``) names this machine
    through a loopback address; ``localhost`` does. Another name is loopback only when
    ``resolve`` is true and it resolves to a loopback address now."""
    host = host_of(address)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        if not resolve:
            return False
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except (OSError, ValueError):
            return False
