"""Durable storage of received instances.

An instance is acknowledged only once its bytes and its directory entry are on disk
(``fsync`` of the file, then of the directory after the atomic rename). Paths are built from
UIDs that are validated first, so a crafted UID such as ``../../etc`` can never place a file
outside ``data_dir``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

from dicom_node.common.durable import fsync_dir

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_LENIENT_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class InvalidUID(ValueError):
    """A UID is missing, empty, too long or not made of digits and dots."""


def check_uid(value: object, name: str) -> str:
    """Return ``value`` as a UID string or raise :class:`InvalidUID` saying what is wrong.

    Leading zeros in a component are tolerated (some old modalities write them, and they
    are harmless in a path); anything but digits and dots is not.
    """
    uid = str(value).strip().rstrip("\x00").strip() if value is not None else ""
    if not uid:
        raise InvalidUID(f"{name} is missing or empty")
    if len(uid) > 64:
        raise InvalidUID(f"{name} is longer than 64 characters")
    if not _LENIENT_UID.match(uid):
        raise InvalidUID(f"{name} {uid[:64]!r} is not a valid UID (digits and dots only)")
    return uid


def is_strict_uid(uid: str) -> bool:
    """Whether ``uid`` also has no leading zeros in its components (PS3.5 9.1)."""
    return bool(_UID.match(uid))


def dataset_digest(data: bytes, has_meta: bool = True) -> str:
    """SHA-256 of an instance's data set, without its File Meta Information.

    The meta group names the sender (Source AE Title) and the implementation that wrote the
    file, so two faithful copies of one instance differ there; the data set itself is what
    "the same content" means when a peer re-sends an instance.
    """
    offset = 0
    if has_meta and data[128:132] == b"DICM":
        # (0002,0000) UL, explicit VR little endian: tag 4 + VR 2 + length 2 + value 4
        group_length = int.from_bytes(data[140:144], "little")
        offset = 144 + group_length
    return hashlib.sha256(memoryview(data)[offset:]).hexdigest()


class Spool:
    """The ``spool/`` tree under ``data_dir``: ``<study>/<series>/<sop>.dcm``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._tmp = self.root / ".incoming"
        self._tmp.mkdir(exist_ok=True, mode=0o700)
        self._known_dirs: set[Path] = set()

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        for uid, name in ((study_uid, "Study"), (series_uid, "Series"), (sop_uid, "SOP")):
            check_uid(uid, f"{name} Instance UID")
        # check_uid admits digits and dots only, never a separator, and no component can be
        # ".." (a UID component is non-empty digits): the path cannot leave the spool.
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def write(self, path: Path, *chunks: bytes) -> int:
        """Write ``chunks``, one after the other, to ``path`` durably; return the size.

        This is the hot path of every C-STORE, so it costs one ``fdatasync`` and no rename:
        the file is written in place. On ext4 and XFS that sync commits the journal
        transaction holding the new directory entry too (the spool's directories themselves
        are fsynced when created). A crash mid-write leaves a partial file that was never
        acknowledged; :func:`dicom_node.intake.recovery.reconcile` tells such a file from a
        whole one on start.

        The chunks go to the kernel in one ``writev``, so a header and the received data set
        need not be joined into a copy of the instance first.
        """
        self._ensure_dir(path.parent)
        pending = [memoryview(c) for c in chunks if len(c)]
        size = sum(v.nbytes for v in pending)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while pending:
                written = os.writev(fd, pending)
                while pending and written >= pending[0].nbytes:  # chunks written whole
                    written -= pending.pop(0).nbytes
                if pending:  # a short write stopped inside this chunk
                    pending[0] = pending[0][written:]
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return size

    def adopt(self, received: Path, path: Path) -> int:
        """Move a file received under the spool into ``path`` durably; return its size.

        For data sets written to a file as they arrived (:attr:`incoming`): the bytes are
        not copied, only renamed, and then synced as :meth:`write` syncs a new file (one
        ``fdatasync``, whose journal commit also holds the rename on ext4 and XFS; the
        directory is fsynced too, as a rename is worth it against a crash). Until the
        rename the file lies in ``.incoming``, which a start-up clears.
        """
        self._ensure_dir(path.parent)
        fd = os.open(received, os.O_RDONLY)
        try:
            os.replace(received, path)
            os.fdatasync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        fsync_dir(path.parent)
        return size

    def copy_in(self, path: Path, header: bytes, source: Path, offset: int) -> int:
        """Write ``header`` then the bytes of ``source`` from ``offset`` to ``path`` durably,
        a megabyte at a time: a received file too large to hold in memory whose own header
        is not the one the spool writes. Returns the size."""
        self._ensure_dir(path.parent)
        size = len(header)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with open(source, "rb") as src:
                src.seek(offset)
                chunk = header
                while chunk:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                    chunk = src.read(1024 * 1024)
                    size += len(chunk)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return size

    def _ensure_dir(self, directory: Path) -> None:
        """Create a series directory (and its study's) durably, once per process."""
        if directory in self._known_dirs:
            return
        # one level at a time: mkdir(parents=True) ignores the mode for the parents
        directory.parent.mkdir(exist_ok=True, mode=0o700)
        directory.mkdir(exist_ok=True, mode=0o700)
        fsync_dir(directory.parent)
        fsync_dir(directory.parent.parent)
        self._known_dirs.add(directory)

    @property
    def incoming(self) -> Path:
        """Where files are written while they arrive (the spool's file system)."""
        return self._tmp

    def quarantine(self, path: Path, reason: str) -> Path:
        """Move a spool file that cannot be used aside (never delete received data)."""
        target_dir = self.root.parent / "quarantine"
        target_dir.mkdir(exist_ok=True, mode=0o700)
        target = target_dir / f"{path.name}.{uuid.uuid4().hex[:8]}"
        os.replace(path, target)
        (target_dir / f"{target.name}.reason.txt").write_text(reason + "\n")
        return target

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def clean_incoming(self) -> int:
        """Remove partial files a crash left behind (they were never acknowledged)."""
        n = 0
        for p in self._tmp.glob("*.part"):
            p.unlink(missing_ok=True)
            n += 1
        return n

    def all_files(self) -> list[Path]:
        return sorted(p for p in self.root.glob("*/*/*.dcm"))
