"""What every association the node requests has in common (export, storage commitment,
query/retrieve, ``dicom-node push``): the ``evt_handlers`` entry :data:`NO_DELAY`."""

from __future__ import annotations

import socket
from typing import Any

from pynetdicom import evt

__all__ = ["NO_DELAY", "send_without_delay"]


def send_without_delay(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler of an association the node requests: ``TCP_NODELAY`` on its
    socket.

    Why: pynetdicom writes a C-STORE as one P-DATA PDU for the command and others for the
    data set. With Nagle's algorithm the last, partial segment waits until the peer has
    acknowledged what went before, and a peer that delays its ACKs (Linux does, by up to
    40 ms) holds every object that long: storing a 21 KB SR in Orthanc took 50 ms, and 8 ms
    without. Each PDU is a whole message: waiting saves no small writes.
    """
    assoc: Any = event.assoc
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # closed meanwhile, or not TCP: nothing to speed up
        pass


#: The ``evt_handlers`` entry for :meth:`pynetdicom.ae.ApplicationEntity.associate`.
NO_DELAY = (evt.EVT_CONN_OPEN, send_without_delay)
