"""Logging for the node: one line per association and per series state change.

Text or JSON lines, to stderr and to a size-rotated file in ``data_dir/logs``. pynetdicom's
own loggers are kept at WARNING: at INFO they print every PDU, and with it patient names.

Log lines carry values peers chose (AE titles, UIDs, reasons quoting attribute values). A
newline or another control character in one of them would let a peer write a line of its
own into the log, so every message is escaped (:func:`escape_controls`) as it is formatted,
whoever logged it; tracebacks keep their lines.

pynetdicom's transport layer writes a line per unknown PDU header and a traceback per
dropped connection: :mod:`dicom_node.intake.transport_log` keeps one line per bad connection.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
from pathlib import Path

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
