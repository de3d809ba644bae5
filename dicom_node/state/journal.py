"""The acknowledgement journal: an acknowledgement is durable before the database knows it.

"Never sent twice once acknowledged" must hold whatever fails after the destination's
answer. Each acknowledgement is first appended to a small journal file that was allocated
whole when the node started (writing into it needs no new disk block, so a full disk cannot
stop it), then committed to the database; on start the journal is reconciled into the
database before anything is sent (:class:`dicom_node.export.sender.Exporter`).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from dicom_node.common.durable import fsync_dir

__all__ = ["AckJournal"]


class AckJournal:
    """Acknowledgements not yet known to be in the database, in a file allocated whole.

    ``slots`` fixed-size records (one JSON line each, zero-padded; a zero first byte is
    a free slot) in a file reserved with ``posix_fallocate`` when it is created: an append
    writes into blocks the file already owns, then ``fdatasync`` (no size change, so no
    metadata to journal). Cleared once every record is committed to the database.
    """

    SLOT = 256

    def __init__(self, path: Path, slots: int = 4096) -> None:
        self.path = Path(path)
        self.slots = slots
        self._lock = threading.Lock()
        size = slots * self.SLOT
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size < size:
            os.posix_fallocate(self._fd, 0, size)
            os.fsync(self._fd)
            fsync_dir(self.path.parent)
        self._next = 0
        while self._next < slots and os.pread(self._fd, 1, self._next * self.SLOT) not in (
            b"",
            b"\0",
        ):
            self._next += 1

    def records(self) -> list[dict[str, Any]]:
        out = []
        with self._lock:
            for k in range(self._next):
                raw = os.pread(self._fd, self.SLOT, k * self.SLOT).rstrip(b"\0")
                try:
                    out.append(json.loads(raw))
                except ValueError:  # a record torn by a crash mid-write: its ack was lost
                    continue
        return out

    @property
    def used(self) -> int:
        return self._next

    def append(self, record: dict[str, Any]) -> None:
        """Record durably; raises ``OSError`` when the journal is full or unwritable."""
        data = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        if len(data) > self.SLOT:
            raise OSError(f"acknowledgement record of {len(data)} bytes exceeds a slot")
        with self._lock:
            if self._next >= self.slots:
                raise OSError("the acknowledgement journal is full")
            os.pwrite(self._fd, data.ljust(self.SLOT, b"\0"), self._next * self.SLOT)
            os.fdatasync(self._fd)
            self._next += 1

    def clear(self) -> None:
        """Forget every record (the caller committed them all)."""
        with self._lock:
            if self._next:
                os.pwrite(self._fd, bytes(self._next * self.SLOT), 0)
                os.fdatasync(self._fd)
                self._next = 0

    def close(self) -> None:
        os.close(self._fd)
