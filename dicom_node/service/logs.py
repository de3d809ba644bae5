"""Logging for the node: one line per association and per series state change.

Text or JSON lines, to stderr and to a size-rotated file in ``data_dir/logs``. pynetdicom's
own loggers are kept at WARNING: at INFO they print every PDU, and with it patient names.

Log lines carry values peers chose (AE titles, UIDs, reasons quoting attribute values). A
newline or another control character in one of them would let a peer write a line of its
own into the log, so every message is escaped (:func:`escape_controls`) as it is formatted,
whoever logged it; tracebacks keep their lines.

pynetdicom's transport layer writes a line per unknown PDU header and a traceback per
dropped connection: :class:`TransportLogFilter` keeps one line per bad connection.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import threading
from pathlib import Path

from dicom_node.intake.connections import ConnectionRefused

#: C0 and C1 control characters, DEL, and the Unicode line and paragraph separators.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """``text`` with each control character written as ``\\xNN`` (or ``\\uNNNN``)."""
    return _CONTROLS.sub(
        lambda m: (
            f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}"
        ),
        text,
    )


def _escaped_message(record: logging.LogRecord) -> str:
    return escape_controls(record.getMessage())


class TextFormatter(logging.Formatter):
    """The node's text lines: one line per record, whatever its values hold."""

    def format(self, record: logging.LogRecord) -> str:
        msg, args = record.msg, record.args
        record.msg, record.args = _escaped_message(record), None
        try:
            return super().format(record)
        finally:
            record.msg, record.args = msg, args


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": _escaped_message(record),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(
    data_dir: Path | None, json_lines: bool = False, level: int = logging.INFO
) -> None:
    """Configure the root logger once for a node process."""
    fmt: logging.Formatter = (
        JsonFormatter()
        if json_lines
        else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    stream = logging.StreamHandler()
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if data_dir is not None:
        log_dir = Path(data_dir) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        file_handler = logging.handlers.RotatingFileHandler(
            log_dir / "node.log", maxBytes=10 * 1024 * 1024, backupCount=5
        )
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # pydicom logs a whole traceback when a pixel decoder fails; the job records the reason
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


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
