"""Logging for the node: one line per association and per series state change.

Text or JSON lines, to stderr and to a size-rotated file in ``data_dir/logs``. pynetdicom's
own loggers are kept at WARNING: at INFO they print every PDU, and with it patient names.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
from pathlib import Path


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(data_dir: Path | None, json_lines: bool = False, level: int = logging.INFO) -> None:
    """Configure the root logger once for a node process."""
    fmt: logging.Formatter = (
        JsonFormatter() if json_lines else
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
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
