"""One log line per bad connection from pynetdicom's transport layer.

pynetdicom logs "Unknown PDU type" for every PDU header it tries to read, so a peer sending
garbage writes a log line per 6 bytes it sends, and it attaches a traceback to every dropped
connection. :class:`TransportLogFilter` keeps what an operator needs of it.
"""

from __future__ import annotations

import logging
import threading

from dicom_node.intake.connections import ConnectionRefused

__all__ = ["TransportLogFilter", "quiet_transport_log"]


class TransportLogFilter(logging.Filter):
    """One line per bad connection from pynetdicom's transport layer, not one per 6 bytes.

    pynetdicom logs "Unknown PDU type" for every PDU header it tries to read, so a peer
    sending garbage writes a log line per 6 bytes it sends, and it attaches a traceback to
    every dropped connection. This keeps the first unknown-PDU line of each connection
    (each has its own DUL thread) and the message of each exception without its traceback.
    A read refused by :mod:`dicom_node.intake.connections`, which logged why, adds no line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(threading.current_thread(), "_dicom_node_refused", False) and (
            (record.exc_info and isinstance(record.exc_info[1], ConnectionRefused))
            or str(record.msg).startswith("Connection closed before the entire PDU")
        ):
            return False
        if record.exc_info:
            if not record.getMessage():  # LOGGER.exception(exc) of an exception without text
                record.msg, record.args = type(record.exc_info[1]).__name__, ()
            record.exc_info = None
            record.exc_text = None
        if str(record.msg).startswith("Unknown PDU type received"):
            thread = threading.current_thread()
            if getattr(thread, "_dicom_node_logged_garbage", False):
                return False
            thread._dicom_node_logged_garbage = True  # type: ignore[attr-defined]
        return True


def quiet_transport_log() -> None:
    """Install :class:`TransportLogFilter` on pynetdicom's transport logger, once."""
    dul_log = logging.getLogger("pynetdicom.dul")
    if not any(isinstance(f, TransportLogFilter) for f in dul_log.filters):
        dul_log.addFilter(TransportLogFilter())
