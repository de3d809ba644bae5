"""A C-STORE's data set from the wire to a parsed data set: where its bytes are held while
they arrive, the Part 10 header its spool file gets, and the parse.

pynetdicom writes each received data set, File Meta Information first, into a file object
the node provides (:func:`dicom_node.intake.pynetdicom_tuning.receive_to_files`): an
:class:`IncomingDataSet`, which keeps the common instance in memory and spills a large one
into ``spool/.incoming``, on the spool's file system. :class:`Received` is what the C-STORE
handler gets from it, and :func:`decode_received` parses it into a pydicom data set with
the encoding checks of :mod:`dicom_node.intake.checks`, so that a broken stream is answered
with a status and never reaches a worker.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import pydicom
from pydicom import filereader
from pydicom.charset import default_encoding
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode

from dicom_node.common.durable import start_writeback
from dicom_node.intake.checks import (
    CANNOT_UNDERSTAND,
    StoreRefused,
    check_readable,
    check_vr_encoding,
    check_well_formed,
)
from dicom_node.intake.spool import dataset_digest

#: What pydicom's read_file_meta_info calls once it has opened the file and read the preamble
#: (private to pydicom: ``None`` in a release without it).
_read_file_meta_info: Callable[[BinaryIO], FileMetaDataset] | None = getattr(
    filereader, "_read_file_meta_info", None
)

#: A data set is received in memory up to this size, then in a file.
SPILL_ABOVE = 16 * 1024 * 1024
#: Data sets larger than this are checked where they lie, in the file pynetdicom wrote as
#: they arrived, never read into memory whole (their Pixel Data is parsed deferred).
READ_WHOLE_BELOW = 64 * 1024 * 1024
#: Values larger than this stay in the file while a large data set is parsed.
_DEFER_SIZE = 1024 * 1024


def _meta_element(element: int, vr: bytes, value: str | bytes, pad: bytes = b"\x00") -> bytes:
    """One group 0002 element in Explicit VR Little Endian, its value padded to even length."""
    raw = value.encode(default_encoding) if isinstance(value, str) else value
    if len(raw) % 2:
        raw += pad
    if vr == b"OB":  # 2 reserved bytes and a 32-bit length (PS3.5 Table 7.1-1)
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(raw)) + raw
    return struct.pack("<HH2sH", 0x0002, element, vr, len(raw)) + raw


#: The elements of the File Meta Information that are the same in every spool file.
_META_VERSION = _meta_element(0x0001, b"OB", b"\x00\x01")
_META_IMPLEMENTATION = _meta_element(0x0012, b"UI", PYNETDICOM_IMPLEMENTATION_UID) + _meta_element(
    0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION, pad=b" "
)


def part10_header(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, "DICM" and File Meta Information (PS3.10 7.1) for a received data set.

    Byte for byte what pynetdicom's ``Event.encoded_dataset(include_meta=True)`` puts in
    front of the data set (the request's Affected SOP Class and Instance UIDs, the
    context's transfer syntax, pynetdicom's implementation UID and version), but encoded
    directly: building and writing the group through pydicom costs some 0.3 ms of each
    C-STORE. ``encoded_dataset`` also joins header and data set into a copy of the whole
    instance; the spool writes the two buffers as they are.
    """
    meta = b"".join(
        (
            _META_VERSION,
            _meta_element(0x0002, b"UI", sop_class),
            _meta_element(0x0003, b"UI", sop_instance),
            _meta_element(0x0010, b"UI", transfer_syntax),
            _META_IMPLEMENTATION,
        )
    )
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(meta))
    return b"\x00" * 128 + b"DICM" + group_length + meta


def file_meta_of(header: bytes) -> FileMetaDataset:
    """The File Meta Information of a Part 10 ``header`` (preamble, "DICM", group 0002),
    as :func:`pydicom.filereader.read_file_meta_info` reads it from a spool file.

    For headers the node wrote itself (:func:`part10_header`), read from memory: the
    streaming assembler gives each kept slice header its spool file's meta group, at
    assembly, without opening the file.
    """
    if _read_file_meta_info is None:  # pragma: no cover - another pydicom: the public way
        return pydicom.dcmread(io.BytesIO(header)).file_meta
    return _read_file_meta_info(io.BytesIO(memoryview(header)[132:]))


class IncomingDataSet:
    """Where pynetdicom writes a C-STORE data set as it arrives: memory, then a file.

    With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom writes each data set (its File Meta
    Information first) to a ``NamedTemporaryFile`` made in the system's temporary directory,
    with no setting for another. This stands in for that file (the calls pynetdicom makes:
    ``name``, ``write``, ``file.flush``, ``close``). The common instance, under
    :data:`SPILL_ABOVE`, stays in memory, so that the handler parses it without reading a
    file back. A larger one goes on, as it arrives, into a file named ``name`` in
    ``spool/.incoming``, on the spool's file system, so that an accepted instance is renamed
    into the spool rather than copied; what a crash leaves there ends in ``.part`` and is
    removed at start (:meth:`Spool.clean_incoming`).

    With ``write_through``, an instance held in memory is also written to that file as it
    arrives, its pieces handed to the disk at once (:func:`start_writeback`): when the last
    fragment is in, the handler renames the file into the spool and syncs it, and the
    ``fdatasync`` on the way to the answer waits for the last piece only. The bytes held
    in memory are the ones parsed; the file is only ever renamed, never read.
    """

    #: Bytes gathered before they are written through: the File Meta Information comes in
    #: three small writes, each data set fragment in one of up to the peer's PDU size.
    WRITE_THROUGH_AT = 64 * 1024

    def __init__(self, directory: Path, write_through: bool = False) -> None:
        self.name = str(directory / f"{uuid.uuid4().hex}.part")
        #: The pieces written so far, while held in memory (``None`` once spilled): kept as
        #: written and joined once, where a growing buffer copied each piece in and the data
        #: set out again (two copies of every instance, holding the interpreter).
        self._parts: list[bytes | bytearray] | None = []
        self._held = 0
        self._file: io.BufferedWriter | None = None
        self.write_through = write_through
        #: The file written through (``None`` until the first write, and once closed).
        self._fd: int | None = None
        #: How much of ``_parts`` is in the file.
        self._written_parts = 0
        self._written = 0

    @property
    def spilled(self) -> bool:
        """Whether the data set is in the file ``name`` (else in memory)."""
        return self._file is not None

    @property
    def buffer(self) -> bytes | None:
        """Everything written so far, while held in memory; ``None`` once spilled."""
        return None if self._parts is None else b"".join(self._parts)

    @property
    def file(self) -> IncomingDataSet:
        return self  # pynetdicom flushes ``file`` after each fragment

    def write(self, data: bytes) -> int:
        if self._file is not None:
            return self._file.write(data)
        assert self._parts is not None
        # pynetdicom hands each fragment over as a new object of its own: kept as it is
        self._parts.append(data if isinstance(data, (bytes, bytearray)) else bytes(data))
        self._held += len(data)
        if self._held > SPILL_ABOVE:
            self._spill()
        elif self.write_through and self._held - self._written >= self.WRITE_THROUGH_AT:
            try:
                self._write_through()
            except OSError:  # the disk said no: held in memory alone, written by the handler
                self._stop_writing_through()
        return len(data)

    def _stop_writing_through(self) -> None:
        self.write_through = False
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        Path(self.name).unlink(missing_ok=True)
        self._written = self._written_parts = 0

    def _open(self) -> int:
        fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.fchmod(fd, 0o600)  # whatever the umask
        return fd

    def _write_through(self) -> None:
        """Write the pieces not yet in the file, and start them on their way to the disk."""
        assert self._parts is not None
        if self._fd is None:
            self._fd = self._open()
        pending = [memoryview(p) for p in self._parts[self._written_parts :] if len(p)]
        start = self._written
        while pending:
            done = os.writev(self._fd, pending)
            self._written += done
            while pending and done >= pending[0].nbytes:  # pieces written whole
                done -= pending.pop(0).nbytes
            if pending:  # a short write stopped inside this piece
                pending[0] = pending[0][done:]
        self._written_parts = len(self._parts)
        start_writeback(self._fd, start, self._written - start)

    def _spill(self) -> None:
        """Past :data:`SPILL_ABOVE`: the data set goes on in the file alone."""
        assert self._parts is not None
        if self._fd is not None:  # written through so far: the file has all but the tail
            self._write_through()
            self._file = open(self._fd, "wb", closefd=True)  # noqa: SIM115 - closed in close()
            self._fd = None
        else:
            self._file = open(self._open(), "wb", closefd=True)  # noqa: SIM115 - as above
            self._file.writelines(self._parts)
        self._parts = None

    def finish_write_through(self) -> Path | None:
        """Once the data set is whole: the file holding it all (header and data set,
        written through and not yet synced), or ``None`` when it was not written through
        or is the spilled file."""
        if not self.write_through or self._parts is None:
            return None
        try:
            if self._held > self._written or self._fd is None:
                self._write_through()
        except OSError:  # as in write(): the handler writes the data set it holds
            self._stop_writing_through()
            return None
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        return Path(self.name)

    def meta_and_data_set(self) -> tuple[bytes, bytes]:
        """What was written while held in memory: the Part 10 header pynetdicom wrote first
        (preamble, "DICM", File Meta Information) and the data set after it.

        pynetdicom writes the header in pieces of its own before the first fragment, so the
        data set is joined from the fragments alone, in one copy (none for a data set of
        one fragment of bytes).
        """
        assert self._parts is not None, "spilled: the data set is in the file"
        parts = self._parts
        head = b""
        for part in parts:  # preamble, "DICM" and (0002,0000) UL: the group's length
            if len(head) >= 144:
                break
            head += part
        offset = 144 + int.from_bytes(head[140:144], "little")  # after the meta group
        held = 0
        for k, part in enumerate(parts):
            if held == offset:  # a join of one bytes object is that object: no copy
                return b"".join(parts[:k]), b"".join(parts[k:])
            held += len(part)
        whole = b"".join(parts)  # the header did not end a piece: cut the whole
        return whole[:offset], whole[offset:]

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class Received:
    """A C-STORE's data set as pynetdicom handed it over.

    Either ``data`` (the data set's bytes, in memory) or ``file``: the file pynetdicom
    wrote as the data set arrived, whose data set starts at ``offset`` after the File Meta
    Information ``meta`` (preamble included) that pynetdicom wrote in front of it. A data set
    of up to :data:`READ_WHOLE_BELOW` bytes is read into ``data`` as well.

    ``streamed`` is the file a data set held in memory was written through to as it arrived
    (``meta`` then ``data``, not yet synced; see :class:`IncomingDataSet`): the spool
    renames it into place (:meth:`adopted`), and :meth:`discard` removes it otherwise.
    """

    size: int
    data: bytes | None = None
    file: Path | None = None
    offset: int = 0
    meta: bytes = b""
    streamed: Path | None = None

    def adopted(self) -> None:
        """The ``streamed`` file is the spool's now (renamed into place)."""
        self.streamed = None

    def discard(self) -> None:
        """Remove the ``streamed`` file, if the spool did not take it (a refused instance,
        a duplicate, a header other than the spool's)."""
        if self.streamed is not None:
            self.streamed.unlink(missing_ok=True)
            self.streamed = None

    @classmethod
    def from_event(cls, event: evt.Event) -> Received:
        """Where pynetdicom put the request's data set (the request's ``_dataset_file`` and
        ``_dataset_path``, set by pynetdicom 3.0's chunked receive)."""
        incoming = getattr(event.request, "_dataset_file", None)
        if isinstance(incoming, IncomingDataSet) and not incoming.spilled:
            meta, data = incoming.meta_and_data_set()
            # Held in memory, it has no file for pynetdicom to close and delete after the
            # handler (an unlink that fails, on the way to the response); a file it was
            # written through to is the storage's to adopt or discard.
            event.request._dataset_file = None
            streamed = incoming.finish_write_through()
            return cls(size=len(data), data=data, offset=len(meta), meta=meta, streamed=streamed)
        path = getattr(event.request, "_dataset_path", None)
        if not isinstance(path, Path) or not path.exists():
            # pynetdicom annotates Event.request as any request; an EVT_C_STORE's is a C_STORE
            request = cast(C_STORE, event.request)
            data = request.DataSet.getvalue() if request.DataSet else b""
            return cls(size=len(data), data=data)
        with open(path, "rb") as f:
            head = f.read(144)  # preamble, "DICM", (0002,0000) UL
            offset = 144 + int.from_bytes(head[140:144], "little")
            f.seek(0)
            meta = f.read(offset)
            size = os.fstat(f.fileno()).st_size - offset
            held = f.read() if size <= READ_WHOLE_BELOW else None
        return cls(size=size, data=held, file=path, offset=offset, meta=meta)

    def chunks(self, size: int = 1024 * 1024) -> Iterator[bytes]:
        """The data set's bytes, a piece at a time."""
        if self.data is not None:
            yield self.data
            return
        assert self.file is not None
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            while chunk := f.read(size):
                yield chunk

    def digest(self) -> str:
        """SHA-256 of the data set (as :func:`~dicom_node.intake.spool.dataset_digest`)."""
        if self.data is not None:
            return dataset_digest(self.data, has_meta=False)
        sha = hashlib.sha256()
        for chunk in self.chunks():
            sha.update(chunk)
        return sha.hexdigest()


def decode_received(received: Received, syntax: UID) -> Dataset:
    """Parse a received data set in the negotiated transfer ``syntax``, or refuse it (0xC000).

    A data set held in memory is parsed whole; a larger one from its file, values over a
    megabyte left there. The result's ``file_meta`` holds only the transfer syntax (pixel
    decoding and the checks read it); the spool file's full meta group is written by
    :func:`part10_header`.
    """
    try:
        if received.data is not None:
            ds = decode(
                io.BytesIO(received.data),
                syntax.is_implicit_VR,
                syntax.is_little_endian,
                syntax.is_deflated,
            )
            ds.set_original_encoding(syntax.is_implicit_VR, syntax.is_little_endian)
            end = received.size
        else:  # too large to hold: values over a megabyte stay in the file
            assert received.file is not None  # a data set not held in memory is in its file
            ds = pydicom.dcmread(
                received.file, defer_size=None if syntax.is_deflated else _DEFER_SIZE
            )
            end = received.offset + received.size  # value offsets count from the file's start
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
    except Exception as exc:  # noqa: BLE001 - any parse error is the peer's data
        raise StoreRefused(CANNOT_UNDERSTAND, f"dataset cannot be decoded: {exc}") from None
    # The stream of a deflated syntax is parsed after inflating: its offsets are not
    # offsets into the received bytes, so only the values are checked.
    syntax = ds.file_meta.TransferSyntaxUID
    check_well_formed(ds, None if syntax.is_deflated else end)
    check_vr_encoding(ds, syntax)
    check_readable(ds)
    return ds
