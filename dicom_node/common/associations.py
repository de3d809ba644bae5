"""What every association the node requests gets (export, storage commitment, query and
retrieve, ``dicom-node push``): :data:`TUNE_REQUESTED`, an ``EVT_CONN_OPEN`` handler.

* ``TCP_NODELAY`` on its socket (:func:`tune_requested`).
* Responses that always reach the request waiting for them (:class:`RequestorDIMSE`).

Also the one statement of the pynetdicom release whose internals the node replaces
(:data:`TESTED_PYNETDICOM`), here and in :mod:`dicom_node.intake.pynetdicom_tuning`.
"""

from __future__ import annotations

import socket
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider

__all__ = [
    "TESTED_PYNETDICOM",
    "TUNES_INTERNALS",
    "TUNE_REQUESTED",
    "RequestorDIMSE",
    "tune_requested",
]

#: The pynetdicom release whose internals this module and
#: :mod:`dicom_node.intake.pynetdicom_tuning` were written against.
TESTED_PYNETDICOM = "3.0.4"
#: Whether the replacements of pynetdicom internals apply: within the tested series only.
TUNES_INTERNALS = pynetdicom.__version__.startswith("3.0.")


class RequestorDIMSE(DIMSEServiceProvider):
    """The DIMSE provider of an association the node requests: its reactor never takes a
    response off the queue.

    Why: pynetdicom's ``send_c_store`` (and every ``send_*``) pauses the association's
    reactor before it sends and reads the response itself. The pause is a flag the reactor
    sets before it waits and clears after, and ``send_*`` returns once the flag is set: a
    ``send_*`` that follows another at once can find the flag still set by a reactor that
    was already let go, send, and lose the response to the reactor, which drops it as an
    "unexpected" message. The request then waits out the DIMSE timeout and pynetdicom
    aborts the association, and the node would send the object again. A peer that answers
    fast makes it likelier. The reactor only serves requests from the peer (a storage
    commitment report, a C-GET's C-STOREs); a response stays for the ``send_*`` it answers.
    """

    def get_msg(self, block: bool = False) -> Any:
        if not block:  # the reactor's poll
            with self.msg_queue.mutex:
                head = self.msg_queue.queue[0] if self.msg_queue.queue else None
            if head is not None and head[1] is not None and not head[1].is_valid_request:
                return None, None
        return super().get_msg(block)


def tune_requested(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler of an association the node requests.

    ``TCP_NODELAY`` on its socket. Why: pynetdicom writes a C-STORE as one P-DATA PDU for
    the command and others for the data set. With Nagle's algorithm the last, partial
    segment waits until the peer has acknowledged what went before, and a peer that delays
    its ACKs (Linux does, by up to 40 ms) holds every object that long: storing a 21 KB SR
    in Orthanc took 50 ms, and 8 ms without. Each PDU is a whole message: waiting saves no
    small writes.

    Within the tested pynetdicom series, also :class:`RequestorDIMSE` (the connection
    opens before the association is negotiated: no message has been received yet).
    """
    assoc: Any = event.assoc
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # closed meanwhile, or not TCP: nothing to speed up
            pass
    if TUNES_INTERNALS and type(assoc.dimse) is DIMSEServiceProvider:
        assoc.dimse = RequestorDIMSE(assoc)


#: The ``evt_handlers`` entry for :meth:`pynetdicom.ae.ApplicationEntity.associate`.
TUNE_REQUESTED = (evt.EVT_CONN_OPEN, tune_requested)
