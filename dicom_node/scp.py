"""The node's DICOM application entity: C-ECHO and C-STORE SCP.

Behaviour hangs on small pynetdicom event handlers. The C-STORE handler validates the
instance, writes it durably to the spool, records it in the job database and only then
answers; every refusal is a DIMSE status from PS3.4 Annex B with one log line saying why.
This module does no pixel math and knows nothing of models. It remembers which series each
open association stored and, at a normal release (``EVT_RELEASED``), hands that set to the
node, whose completion rule (:mod:`dicom_node.completion`) decides what is complete.

Who may talk to the node is decided before any data set is read: DICOM TLS with optional
client certificates (:mod:`dicom_node.tls`), the source address, the calling and called AE
titles, and the number of concurrent associations, each refused with the A-ASSOCIATE-RJ
reason of PS3.8 9.3.4, and the connections one source address may hold. Every connection
is bounded in time and size as its bytes arrive (:mod:`dicom_node.connections`): a silent
peer frees its slot after ``network_timeout``, a trickling one after
``association_deadline_seconds`` or ``message_deadline_seconds``, and a data set growing
past ``max_instance_bytes`` aborts its association before the rest is read. Values no CT
image can have are refused before anything is written (:mod:`dicom_node.validation`).
Patient names and IDs reach the log only with
``[node] log_patient_identifiers``.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import logging
import os
import queue
import socket
import sqlite3
import ssl
import struct
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pynetdicom
from pydicom.charset import default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import parse_fragments
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    dimse_messages,
    evt,
)
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import DimseServiceType
from pynetdicom.dsutils import create_file_meta, decode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification

from dicom_node import connections
from dicom_node.completion import slice_geometry
from dicom_node.config import ConfigError, Settings
from dicom_node.jobs import InstanceConflict, JobStore
from dicom_node.spool import InvalidUID, Spool, check_uid, dataset_digest
from dicom_node.tls import peer_certificate_subject, server_ssl_context
from dicom_node.validation import InvalidValue, check_image_values
from dicom_node.volume import CT_SOP_CLASSES, MULTIFRAME_CT_SOP_CLASSES

log = logging.getLogger("dicom_node.scp")

#: Transfer syntaxes whose pixel data pydicom (with pylibjpeg, its plugins and pyjpegls)
#: decodes here. pynetdicom accepts, per context, the first of these the peer proposed, so
#: compressed syntaxes come first: the node then stores exactly the bytes the modality
#: encoded, and a sender that offers its file's own syntax never has to transcode.
TRANSFER_SYNTAXES = [
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
    HTJ2K,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,  # after the plain ones: inflating costs CPU for nothing
    ExplicitVRBigEndian,
]

# C-STORE statuses (PS3.4 Table B.2-1 and PS3.7 Annex C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (disk watermark)
TOO_MANY_INSTANCES = 0xA701  # Refused: Out of Resources (series limit)
TOO_LARGE = 0xA702  # Refused: Out of Resources (instance size limit)
DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand
UID_CONFLICT = 0xC001  # Error: Cannot understand (same SOP Instance UID, other content)
SOP_CLASS_NOT_SUPPORTED = 0x0122  # Refused: SOP Class not supported
PROCESSING_FAILURE = 0x0110

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason.
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
SOURCE_SERVICE_USER = 0x01
SOURCE_SERVICE_PROVIDER_PRESENTATION = 0x03
REASON_NO_REASON = 0x01
REASON_CALLING_AE = 0x03
REASON_CALLED_AE = 0x07
REASON_LOCAL_LIMIT_EXCEEDED = 0x02  # with SOURCE_SERVICE_PROVIDER_PRESENTATION

#: Connections the kernel queues for the node to accept.
LISTEN_BACKLOG = 128

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def allowed_networks(hosts: list[str]) -> list[IPNetwork]:
    """Parse ``[node] allowed_hosts``: IP addresses or networks in CIDR notation.

    Raises :class:`~dicom_node.config.ConfigError` naming the first entry that is neither.
    """
    networks = []
    for i, entry in enumerate(hosts):
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"node.allowed_hosts[{i}]: {entry!r} is not an IP address or network"
            ) from None
    return networks


def address_allowed(address: str, networks: list[IPNetwork]) -> bool:
    """Whether a peer's ``address`` lies in one of ``networks`` (all, when there are none).

    An IPv4 peer seen on a dual-stack socket (``::ffff:10.0.0.1``) matches IPv4 entries.
    """
    if not networks:
        return True
    ip = connections.peer_ip(address)
    if ip is None:
        return False
    return any(ip in net for net in networks if net.version == ip.version)


@dataclass
class StoreOutcome:
    """What happened to one C-STORE; passed to observers (metrics, the streaming
    assembler, tests).

    For a new instance, ``path`` is its spool file and ``dataset`` the data set the handler
    parsed (with its transfer syntax in ``file_meta``): an observer that decodes the pixels
    off the acknowledgement path need not parse the file again. Observers run before the
    response is sent, so they only hand work on.
    """

    status: int
    series_uid: str = ""
    sop_uid: str = ""
    new: bool = False
    reason: str = ""
    path: str = ""
    dataset: Dataset | None = field(default=None, repr=False)


class StoreRefused(Exception):
    """An instance is refused; carries the DIMSE status and the reason logged."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _expected_pixel_bytes(ds: Dataset) -> int | None:
    """Bytes of native (uncompressed) Pixel Data the image attributes declare."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    return rows * cols * samples * frames * bits // 8


#: Attributes that must agree for two encodings of one SOP Instance UID to be "the same".
_IDENTITY_KEYWORDS = (
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "RescaleSlope",
    "RescaleIntercept",
    "InstanceNumber",
)


def _same_image(stored_path: str, ds: Dataset) -> bool:
    """Whether ``ds`` is the stored instance in another encoding.

    Only reached when the data set bytes differ (a peer re-sent in another transfer
    syntax): the decoded pixels and the identifying attributes decide. Lossy and lossless
    encodings of one image are not the same content.
    """
    try:
        stored = pydicom.dcmread(stored_path)
        if any(stored.get(k) != ds.get(k) for k in _IDENTITY_KEYWORDS):
            return False
        return bool(np.array_equal(stored.pixel_array, ds.pixel_array))
    except Exception:  # noqa: BLE001 - undecodable either side: not provably the same
        return False


_UNDEFINED_LENGTH = 0xFFFFFFFF


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
    directly: building and writing the group through pydicom took some 0.3 ms of each
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


#: Data sets larger than this are checked where they lie, in the file pynetdicom wrote as
#: they arrived, never read into memory whole (their Pixel Data is parsed deferred).
READ_WHOLE_BELOW = 64 * 1024 * 1024
#: Values larger than this stay in the file while a large data set is parsed.
_DEFER_SIZE = 1024 * 1024
_incoming_dir: Path | None = None


#: A data set is received in memory up to this size, then in a file.
SPILL_ABOVE = 16 * 1024 * 1024


class IncomingDataSet:
    """Where pynetdicom writes a C-STORE data set as it arrives: memory, then a file.

    With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom writes each data set (its File Meta
    Information first) to a ``NamedTemporaryFile`` made in the system's temporary directory,
    with no setting for another. This stands in for that file (the calls pynetdicom makes:
    ``name``, ``write``, ``file.flush``, ``close``). The common instance, under
    :data:`SPILL_ABOVE`, stays in memory: creating, writing and reading back a file for
    each cost ingest about a sixth. A larger one goes on, as it arrives, into a file named
    ``name`` in ``spool/.incoming``, on the spool's file system, so that an accepted
    instance is renamed into the spool rather than copied; what a crash leaves there ends
    in ``.part`` and is removed at start (:meth:`Spool.clean_incoming`).
    """

    def __init__(self, directory: Path) -> None:
        self.name = str(directory / f"{uuid.uuid4().hex}.part")
        self.buffer: bytearray | None = bytearray()
        self._file: io.BufferedWriter | None = None

    @property
    def spilled(self) -> bool:
        """Whether the data set is in the file ``name`` (else in :attr:`buffer`)."""
        return self._file is not None

    @property
    def file(self) -> IncomingDataSet:
        return self  # pynetdicom flushes ``file`` after each fragment

    def write(self, data: bytes) -> int:
        if self._file is not None:
            return self._file.write(data)
        assert self.buffer is not None
        self.buffer += data
        if len(self.buffer) > SPILL_ABOVE:
            self._file = open(self.name, "xb")  # noqa: SIM115 - closed in close()
            os.chmod(self.name, 0o600)
            self._file.write(self.buffer)
            self.buffer = None
        return len(data)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _incoming_file(*args: object, **kwargs: object) -> IncomingDataSet | Any:
    """pynetdicom's ``NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")`` for a
    received data set: an :class:`IncomingDataSet` under the spool."""
    if _incoming_dir is None:
        return tempfile.NamedTemporaryFile(*args, **kwargs)  # type: ignore[call-overload]
    return IncomingDataSet(_incoming_dir)


class _PlainMeta(tuple):
    """The File Meta Information pynetdicom asks for: (SOP class, SOP instance, syntax)."""


def _create_file_meta(
    *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, **other: Any
) -> Any:
    """pynetdicom's ``create_file_meta`` for a received data set, left unbuilt: building
    and writing the group through pydicom took some 0.3 ms of each C-STORE (see
    :func:`part10_header`), a tenth of the time ingest takes here."""
    if other:
        return create_file_meta(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax=transfer_syntax,
            **other,
        )
    return _PlainMeta((sop_class_uid, sop_instance_uid, transfer_syntax))


def _write_file_meta_info(fp: Any, file_meta: Any, *args: Any, **kwargs: Any) -> None:
    """pydicom's ``write_file_meta_info``, or the same bytes from :func:`part10_header`."""
    if isinstance(file_meta, _PlainMeta):
        try:
            fp.write(part10_header(*(str(v or "") for v in file_meta))[132:])
            return
        except UnicodeEncodeError:  # not a UID at all: let pydicom write what it can
            file_meta = create_file_meta(
                sop_class_uid=file_meta[0],
                sop_instance_uid=file_meta[1],
                transfer_syntax=file_meta[2],
            )
    write_file_meta_info(fp, file_meta, *args, **kwargs)


def receive_to_files(incoming: Path) -> None:
    """Have pynetdicom write received C-STORE data sets to files in ``incoming``.

    A process-wide pynetdicom setting (it receives C-STORE as an SCP only here; sending is
    unaffected). Memory then no longer grows with the size of an instance: pynetdicom
    would otherwise join its fragments in memory, and the node copy them once more.
    """
    global _incoming_dir
    _incoming_dir = incoming
    dimse_messages.NamedTemporaryFile = _incoming_file  # type: ignore[attr-defined]
    if _TUNE_INTERNALS:  # module names checked against pynetdicom 3.0.4
        dimse_messages.create_file_meta = _create_file_meta  # type: ignore[attr-defined]
        dimse_messages.write_file_meta_info = _write_file_meta_info  # type: ignore[attr-defined]
    _config.STORE_RECV_CHUNKED_DATASET = True


def discard_partial(assoc: Association) -> None:
    """Remove the file of a data set whose association ended before it was complete.

    pynetdicom leaves it behind (it deletes the file only after the C-STORE handler ran).
    """
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is None:
        return
    try:
        partial.close()
        os.unlink(partial.name)
    except OSError:
        pass


@dataclass
class Received:
    """A C-STORE's data set as pynetdicom handed it over.

    Either ``data`` (the data set's bytes, in memory) or ``file``: the file pynetdicom
    wrote as the data set arrived, whose data set starts at ``offset`` after the File Meta
    Information ``meta`` (preamble included) that pynetdicom wrote in front of it. A data set
    of up to :data:`READ_WHOLE_BELOW` bytes is read into ``data`` as well.
    """

    size: int
    data: bytes | None = None
    file: Path | None = None
    offset: int = 0
    meta: bytes = b""

    @classmethod
    def from_event(cls, event: evt.Event) -> Received:
        incoming = getattr(event.request, "_dataset_file", None)
        if isinstance(incoming, IncomingDataSet) and not incoming.spilled:
            assert incoming.buffer is not None
            raw = memoryview(incoming.buffer)
            offset = 144 + int.from_bytes(raw[140:144], "little")  # after the meta group
            data = bytes(raw[offset:])
            raw.release()
            return cls(
                size=len(data), data=data, offset=offset, meta=bytes(incoming.buffer[:offset])
            )
        path = getattr(event.request, "_dataset_path", None)
        if not isinstance(path, Path) or not path.exists():
            data = event.request.DataSet.getvalue() if event.request.DataSet else b""
            return cls(size=len(data), data=data)
        with open(path, "rb") as f:
            head = f.read(144)  # preamble, "DICM", (0002,0000) UL
            offset = 144 + int.from_bytes(head[140:144], "little")
            f.seek(0)
            meta = f.read(offset)
            size = os.fstat(f.fileno()).st_size - offset
            data = f.read() if size <= READ_WHOLE_BELOW else None
        return cls(size=size, data=data, file=path, offset=offset, meta=meta)

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
        """SHA-256 of the data set (as :func:`~dicom_node.spool.dataset_digest`)."""
        if self.data is not None:
            return dataset_digest(self.data, has_meta=False)
        sha = hashlib.sha256()
        for chunk in self.chunks():
            sha.update(chunk)
        return sha.hexdigest()


def _check_inflated_size(data: bytes | Iterator[bytes], limit: int) -> None:
    """Refuse a deflated data set that inflates past ``limit`` bytes (0xA702).

    A few kilobytes of deflate can stand for gigabytes, and pydicom inflates a data set
    whole before parsing it. Inflating here a megabyte at a time, counting, costs one more
    pass over a (rare) deflated instance and never holds more than a megabyte of it. A
    stream that is not deflate is left to the parse, which refuses it.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        for piece in [data] if isinstance(data, bytes) else data:
            pending = piece
            while pending and not inflater.eof:
                total += len(inflater.decompress(pending, 1024 * 1024))
                if total > limit:
                    raise StoreRefused(TOO_LARGE, f"deflated data set inflates past {limit} bytes")
                pending = inflater.unconsumed_tail
            if inflater.eof:
                return
    except zlib.error:
        return


def _check_well_formed(ds: Dataset, size: int | None) -> None:
    """Refuse a data set whose encoding is cut short or unreadable (0xC000).

    pydicom reads leniently: a stream cut inside a value yields a shorter value, one cut
    inside an element header is dropped, garbage stops the parse without an error. So the
    raw top-level elements are checked against what they declare: each value as long as
    its length, and (``size`` given) the last element ending where the stream ends.
    """
    tags = list(ds.keys())
    if not tags:
        raise StoreRefused(
            CANNOT_UNDERSTAND, "the data set holds no readable element (truncated, or not DICOM)"
        )
    for tag in tags:
        elem = ds.get_item(tag, keep_deferred=True)
        if not isinstance(elem, RawDataElement) or elem.length == _UNDEFINED_LENGTH:
            continue
        if elem.value is None and elem.length and size is not None:  # deferred: in the file
            got = min(elem.length, max(size - elem.value_tell, 0))
        else:
            got = len(elem.value or b"")
        if got != elem.length:
            raise StoreRefused(
                CANNOT_UNDERSTAND,
                f"data set ends inside element {tag} ({got} of {elem.length} bytes)",
            )
    last = ds.get_item(tags[-1], keep_deferred=True)
    if size is not None and isinstance(last, RawDataElement) and last.length != _UNDEFINED_LENGTH:
        end = last.value_tell + last.length
        if end != size:
            raise StoreRefused(
                CANNOT_UNDERSTAND,
                f"{size - end} byte(s) after element {last.tag} cannot be parsed",
            )


def _check_encapsulated(ds: Dataset) -> None:
    """Encapsulated Pixel Data must be items, the last one complete, at least one per frame.

    A frame is one or more fragments (PS3.5 A.4), so a header declaring more frames than
    the data holds fragments is refused here, before a worker would size a volume for them.
    """
    if not ds["PixelData"].is_undefined_length:
        raise StoreRefused(
            CANNOT_UNDERSTAND,
            f"Pixel Data is not encapsulated although {ds.file_meta.TransferSyntaxUID.name} is "
            "a compressed transfer syntax",
        )
    data = ds.PixelData
    try:
        count, offsets = parse_fragments(data)
    except (ValueError, TypeError) as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, f"encapsulated Pixel Data: {exc}") from None
    if count < 2:  # the Basic Offset Table item comes first
        raise StoreRefused(CANNOT_UNDERSTAND, "encapsulated Pixel Data holds no fragment")
    last = offsets[-1]
    length = int.from_bytes(data[last + 4 : last + 8], "little")
    if last + 8 + length > len(data):
        raise StoreRefused(CANNOT_UNDERSTAND, "encapsulated Pixel Data ends inside a fragment")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise StoreRefused(DOES_NOT_MATCH_SOP_CLASS, "Number of Frames is not a number") from None
    if frames > count - 1:
        raise StoreRefused(
            CANNOT_UNDERSTAND,
            f"{frames} frames declared, but Pixel Data holds only {count - 1} fragment(s)",
        )


def _check_frames(ds: Dataset) -> None:
    """An Enhanced CT describes each of its frames once (PS3.3 C.7.6.16): refuse otherwise."""
    try:
        frames = int(ds.NumberOfFrames)
    except (AttributeError, TypeError, ValueError):
        raise StoreRefused(
            DOES_NOT_MATCH_SOP_CLASS, "a multi-frame CT without a valid Number of Frames"
        ) from None
    items = len(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if frames < 1 or items != frames:
        raise StoreRefused(
            DOES_NOT_MATCH_SOP_CLASS,
            f"{frames} frames declared, {items} Per-Frame Functional Groups items present",
        )


class _TransportLogFilter(logging.Filter):
    """One line per bad connection from pynetdicom's transport layer, not one per 6 bytes.

    pynetdicom logs "Unknown PDU type" for every PDU header it tries to read, so a peer
    sending garbage writes a log line per 6 bytes it sends, and it attaches a traceback to
    every dropped connection. This keeps the first unknown-PDU line of each connection
    (each has its own DUL thread) and the message of each exception without its traceback.
    A read refused by :mod:`dicom_node.connections`, which logged why, adds no line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(threading.current_thread(), "_dicom_node_refused", False) and (
            (record.exc_info and isinstance(record.exc_info[1], connections.ConnectionRefused))
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


def _quiet_transport_log() -> None:
    dul_log = logging.getLogger("pynetdicom.dul")
    if not any(isinstance(f, _TransportLogFilter) for f in dul_log.filters):
        dul_log.addFilter(_TransportLogFilter())


# -- pynetdicom tuning ------------------------------------------------------------------
# Per-association settings made from the EVT_CONN_OPEN handler, before the association's
# threads start. Two of them reach into pynetdicom internals for which it offers no
# setting (``Association.dimse``, ``DULServiceProvider._run_loop_delay``); they were
# checked against pynetdicom 3.0.4 and are applied to 3.0.x only. Without them the node
# behaves the same, only slower.

_TUNE_INTERNALS = pynetdicom.__version__.startswith("3.0.")

#: pynetdicom's default DUL loop delay, seconds.
_IDLE_LOOP_DELAY = 0.001
#: DUL loop delay while the peer is sending messages.
_BUSY_LOOP_DELAY = 0.0003
#: How long after its last message an association counts as busy, seconds.
_BUSY_PERIOD = 0.5
#: Longest wait of the association reactor for a message before it checks for a release,
#: an abort or the network timeout (pynetdicom checks every 1 ms).
_REACTOR_WAIT = 0.005

#: pynetdicom's own notification handlers, bound to every association by default. They
#: describe each PDU and DIMSE message for pynetdicom's INFO and DEBUG log lines.
_PYNETDICOM_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


class _PromptDIMSE(DIMSEServiceProvider):
    """A DIMSE provider with which an association answers without polling delays.

    pynetdicom serves an association with two polling threads. The acceptor reactor sleeps
    1 ms, then asks ``get_msg(block=False)`` whether a message is complete; the DUL sleeps
    ``_run_loop_delay`` (1 ms) after each loop that found nothing to do, also before it
    sends a queued response or reads the peer's next request. With a peer that sends the
    next instance only once it has the response, those waits were over a millisecond of
    each C-STORE.

    Here the reactor's poll waits on the message queue, up to :data:`_REACTOR_WAIT`, so a
    message is served as soon as it is complete and an idle reactor wakes less often than
    before. While messages arrive the DUL loops every :data:`_BUSY_LOOP_DELAY`; after
    :data:`_BUSY_PERIOD` without one it is back at pynetdicom's 1 ms, so an idle open
    association costs no more CPU than before. Releases and aborts are seen at most one
    wait later.
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._last_message = 0.0

    def receive_primitive(self, primitive: P_DATA) -> None:
        """pynetdicom's, and on a message it cannot decode (a presentation context never
        negotiated...), the data set file it had begun is removed: pynetdicom then shuts the
        association down without an event the node would see."""
        try:
            super().receive_primitive(primitive)
        except Exception:
            discard_partial(self.assoc)
            raise

    def get_msg(self, block: bool = False) -> tuple[None, None] | tuple[int, DimseServiceType]:
        if block:  # the requestor's wait for a response: pynetdicom's own
            return super().get_msg(block=True)
        try:
            item = self.msg_queue.get(timeout=_REACTOR_WAIT)
        except queue.Empty:
            if time.monotonic() - self._last_message > _BUSY_PERIOD:
                self.dul._run_loop_delay = _IDLE_LOOP_DELAY
            return None, None
        self._last_message = time.monotonic()
        self.dul._run_loop_delay = _BUSY_LOOP_DELAY
        return item


def _quick_ack(event: evt.Event) -> None:
    """After each PDU the node sends, acknowledge the peer's next data without delay.

    Once the node answers requests, Linux takes the connection for interactive and delays
    ACKs, hoping to send them with data, by up to 40 ms. A sender using Nagle's algorithm
    (DCMTK's ``storescu`` does) writes the 6-byte header of its next PDU and holds the
    rest until that header is acknowledged: once the DUL read headers promptly
    (:class:`_PromptDIMSE`), a few C-STOREs in a hundred stalled for those 40 ms.
    ``TCP_QUICKACK`` leaves the interactive mode; sending the next PDU enters it again,
    hence once per PDU sent.
    """
    assoc_socket = event.assoc.dul.socket
    sock = assoc_socket.socket if assoc_socket is not None else None
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    except OSError:  # closed meanwhile: nothing left to acknowledge
        pass


def _tune_association(assoc: Association) -> None:
    """Make a new association answer C-STOREs without pynetdicom's polling delays.

    Also unbinds pynetdicom's logging handlers while its logger discards what they
    format (the node logs pynetdicom at WARNING): on the DUL thread they cost about
    0.2 ms per C-STORE, before the request is handed to the reactor.
    """
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        for event, handler in _PYNETDICOM_LOG_HANDLERS:
            assoc.unbind(event, handler)
    if hasattr(socket, "TCP_QUICKACK"):  # Linux
        assoc.bind(evt.EVT_PDU_SENT, _quick_ack)
    if _TUNE_INTERNALS:
        # The reactor looks its provider up on each loop; nothing has used it yet.
        assoc.dimse = _PromptDIMSE(assoc)


class StorageSCP:
    """Validates, stores durably and records each received instance.

    Parameters
    ----------
    settings:
        The node's typed settings (AE title, limits, access control).
    spool, jobs:
        Where instances are written and recorded.
    on_stored:
        Called after each C-STORE with its :class:`StoreOutcome` (metrics, wake-ups).
    on_released:
        Called when an association is released normally (not aborted), with the SOP
        Instance UIDs it stored by Series Instance UID: the node's completion rule
        (:mod:`dicom_node.completion`) takes it from there.
    """

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        jobs: JobStore,
        on_stored: Callable[[StoreOutcome], None] | None = None,
        on_released: Callable[[dict[str, set[str]]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.jobs = jobs
        self.on_stored = on_stored
        self.on_released = on_released
        # The instances each open association has stored, by series (duplicates included: a
        # sender re-sending a whole series after a crash completes it by its release).
        self._carried: dict[Association, dict[str, set[str]]] = {}
        self._carried_lock = threading.Lock()
        self._locks = [threading.Lock() for _ in range(64)]
        # The SHA-256 of a new instance is computed here while its file is written and
        # synced (all three release the GIL): only its database row needs the digest.
        self._digests = ThreadPoolExecutor(
            max_workers=settings.limits.max_associations, thread_name_prefix="dicom-node-digest"
        )
        self._server = None
        # Parsed (and TLS files loaded) here, so a bad [node]/[tls] value stops the node at
        # start-up with one sentence instead of at the first peer.
        self._networks = allowed_networks(settings.node.allowed_hosts)
        self._per_address = connections.AddressLimiter(settings.limits.max_associations_per_address)
        self._ssl_context = server_ssl_context(settings.tls) if settings.tls.enabled else None
        self.ae = self._make_ae()
        _quiet_transport_log()

    # -- application entity -----------------------------------------------------------
    def _make_ae(self) -> AE:
        node, limits = self.settings.node, self.settings.limits
        ae = AE(ae_title=node.ae_title)
        # pynetdicom rejects beyond these itself, with the PS3.8 reasons: calling AE title
        # not recognised (1, 1, 3), called AE title not recognised (1, 1, 7) and, past
        # maximum_associations, transient local-limit-exceeded (2, 3, 2).
        ae.maximum_associations = limits.max_associations
        ae.require_calling_aet = [a.strip() for a in node.allowed_calling_aes]
        ae.require_called_aet = node.require_called_ae
        ae.acse_timeout = limits.acse_timeout
        ae.dimse_timeout = limits.dimse_timeout
        ae.network_timeout = limits.network_timeout
        # Large enough for a 1024x1024 slice in one PDU, small enough that a peer never
        # makes the node read hundreds of megabytes at once (it reads a PDU whole); a
        # peer sending larger ones is aborted (:mod:`dicom_node.connections`).
        ae.maximum_pdu_size = connections.MAX_PDU
        ae.add_supported_context(Verification)
        for uid in CT_SOP_CLASSES:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        if node.unsupported_sop_class == "fail":
            for cx in StoragePresentationContexts:
                if cx.abstract_syntax not in CT_SOP_CLASSES:
                    ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        return ae

    def handlers(self) -> list[tuple]:
        return [
            (evt.EVT_CONN_OPEN, self.handle_connection),
            (evt.EVT_CONN_CLOSE, self._connection_closed),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_ACCEPTED, self._log_assoc, ["accepted"]),
            (evt.EVT_RELEASED, self._log_assoc, ["released"]),
            (evt.EVT_ABORTED, self._log_assoc, ["aborted"]),
            (evt.EVT_RELEASED, self.handle_released),
            (evt.EVT_ABORTED, self._forget_association),
            (evt.EVT_REJECTED, self._log_rejected),
        ]

    def open_series(self) -> set[str]:
        """Series that an open association has stored instances of: more may follow.

        An association that ended without a release or an abort (its connection dropped)
        is forgotten here, once its thread has ended. Not on ``EVT_CONN_CLOSE``: that
        comes from the transport's thread and may precede ``EVT_RELEASED``, which the
        association's own thread triggers after the peer, answered, has hung up.
        """
        with self._carried_lock:
            for assoc in [a for a in self._carried if not a.is_alive()]:
                del self._carried[assoc]
            return {series for carried in self._carried.values() for series in carried}

    @property
    def tls(self) -> bool:
        """Whether the SCP speaks DICOM TLS (and only TLS) on its port."""
        return self._ssl_context is not None

    def start(self) -> None:
        """Start serving on the configured address, in background threads."""
        node = self.settings.node
        receive_to_files(self.spool.incoming)
        self._server = self.ae.start_server(
            (node.host, node.port),
            block=False,
            evt_handlers=self.handlers(),
            ssl_context=self._ssl_context,
        )
        # socketserver listens with a backlog of 5: in a burst of connections the 6th and
        # later wait for the peer's SYN retry (1 s, then 3 s), however fast they would be
        # refused or served. Listening again only raises the backlog (Linux, BSD).
        self._server.socket.listen(LISTEN_BACKLOG)
        log.info(
            "listening as %s on %s:%d%s",
            node.ae_title,
            node.host,
            self.port,
            " (DICOM TLS)" if self.tls else "",
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()
        self._digests.shutdown()

    # -- handlers ---------------------------------------------------------------------
    def _log_assoc(self, event: evt.Event, what: str) -> None:
        req = event.assoc.requestor
        log.info("association %s: %s from %s:%s", what, req.ae_title, req.address, req.port)

    def _log_rejected(self, event: evt.Event) -> None:
        req, rj = event.assoc.requestor, event.assoc.acceptor.primitive
        log.warning(
            "association rejected (%s, %s): %s; %r calling %r from %s",
            rj.result_str,
            rj.source_str,
            rj.reason_str,
            req.primitive.calling_ae_title,
            req.primitive.called_ae_title,
            req.address,
        )

    def handle_connection(self, event: evt.Event) -> None:
        """Bound a new connection: per address, in time and in size; complete its TLS
        handshake.

        A source address holding ``max_associations_per_address`` connections already is
        answered with an A-ASSOCIATE-RJ (transient, local limit exceeded) before anything
        it sent is read. Otherwise the connection's reads get the deadlines and the P-DATA
        size limit of :mod:`dicom_node.connections`, each read also bounded by
        ``network_timeout`` (pynetdicom leaves accepted sockets blocking without one), and
        the association is tuned to answer without polling delays (:func:`_tune_association`).

        On a TLS port the handshake is done here, in the connection's own thread (see
        :mod:`dicom_node.tls`), within ``association_deadline_seconds``, so that a peer
        without a valid certificate, or one speaking plain DICOM to the TLS port, is refused
        with one log line before any DICOM is read.
        """
        assoc_socket = event.assoc.dul.socket
        sock = assoc_socket.socket if assoc_socket is not None else None
        if sock is None:
            return
        limits = self.settings.limits
        address = str(event.address[0])
        if not self._per_address.admit(event.assoc, address):
            connections.reject_unread(assoc_socket, sock)
            return
        sock.settimeout(limits.network_timeout)
        _tune_association(event.assoc)
        connections.install(event.assoc, limits, address)
        if not isinstance(sock, ssl.SSLSocket):
            return
        try:
            connections.handshake_within(sock, limits.association_deadline_seconds)
        except (ssl.SSLError, OSError) as exc:
            if isinstance(exc, ssl.SSLEOFError):  # a port probe: connected, said nothing
                log.info("connection from %s closed before TLS began", address)
            else:
                reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
                log.warning("TLS connection from %s refused: %s", address, reason)
            # Closing queues "transport closed" for the DUL: the association ends before
            # it starts, without pynetdicom reading from the broken socket.
            assoc_socket.close()

    def _connection_closed(self, event: evt.Event) -> None:
        self._per_address.forget(event.assoc)
        discard_partial(event.assoc)

    def handle_requested(self, event: evt.Event) -> None:
        """Access control on the source address, before negotiation.

        The calling and called AE titles are checked by pynetdicom during negotiation
        (see :meth:`_make_ae`). PS3.8 has no rejection reason for a source address, so an
        address that is not allowed gets a permanent rejection with no reason given.
        """
        assoc = event.assoc
        address = assoc.requestor.address
        subject = peer_certificate_subject(assoc.dul.socket.socket if assoc.dul.socket else None)
        if subject is not None:
            log.info("TLS peer %s presents certificate %r", address, subject)
        if not assoc.requestor.requested_contexts:
            # PS3.8 9.3.2: a request holds one or more presentation contexts; one without
            # any could only hold a slot until the network timeout.
            log.warning(
                "association rejected: no presentation context requested (%r calling %r from %s)",
                assoc.requestor.primitive.calling_ae_title,
                assoc.requestor.primitive.called_ae_title,
                address,
            )
            assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_NO_REASON)
            assoc.kill()
            return
        if not address_allowed(address, self._networks):
            log.warning(
                "association rejected: source address %s is not in node.allowed_hosts "
                "(%r calling %r)",
                address,
                assoc.requestor.primitive.calling_ae_title,
                assoc.requestor.primitive.called_ae_title,
            )
            # As pynetdicom does for its own rejections: send, then stop the association's
            # threads once the A-ASSOCIATE-RJ is out.
            assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_NO_REASON)
            assoc.kill()

    def handle_released(self, event: evt.Event) -> None:
        """A normal release: hand the series this association stored to ``on_released``.

        pynetdicom triggers ``EVT_RELEASED`` on the association's thread after its last
        C-STORE was answered and after the A-RELEASE-RP went out, so the peer never waits
        for what the node does with it. The association is forgotten first: a series it
        carried is then no longer "open" when the node looks.
        """
        series = self._forget_association(event)
        if series and self.on_released is not None:
            self.on_released(series)

    def _forget_association(self, event: evt.Event) -> dict[str, set[str]]:
        """Drop the bookkeeping of an association that ended (aborts: nothing more)."""
        discard_partial(event.assoc)  # an abort mid-transfer leaves a partial data set
        with self._carried_lock:
            return self._carried.pop(event.assoc, {})

    def handle_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def handle_store(self, event: evt.Event) -> int | tuple[int, Dataset]:
        """Validate, write durably, record, answer."""
        try:
            outcome = self._store(event)
        except StoreRefused as exc:
            outcome = StoreOutcome(status=exc.status, reason=exc.reason)
            log.warning(
                "C-STORE refused (0x%04X) from %s: %s",
                exc.status,
                event.assoc.requestor.ae_title,
                exc.reason,
            )
        except OSError as exc:  # the disk said no: nothing was acknowledged
            outcome = StoreOutcome(status=OUT_OF_RESOURCES, reason=f"cannot write: {exc}")
            log.error("C-STORE refused (0xA700): cannot write the instance: %s", exc)
        except sqlite3.Error as exc:  # the database said no (locked, full, read-only)
            outcome = StoreOutcome(status=OUT_OF_RESOURCES, reason=f"cannot record: {exc}")
            log.error("C-STORE refused (0xA700): cannot record the instance: %s", exc)
        if outcome.status == SUCCESS and outcome.series_uid:
            with self._carried_lock:
                carried = self._carried.setdefault(event.assoc, {})
                carried.setdefault(outcome.series_uid, set()).add(outcome.sop_uid)
        if self.on_stored is not None:
            self.on_stored(outcome)
        outcome.dataset = None  # observers are done with it: its pixel data may go
        if outcome.status != SUCCESS and outcome.reason:
            status = Dataset()
            status.Status = outcome.status
            status.ErrorComment = outcome.reason[:64]
            return status  # type: ignore[return-value]
        return outcome.status

    def _store(self, event: evt.Event) -> StoreOutcome:
        limits = self.settings.limits
        context_class = event.context.abstract_syntax
        if context_class not in CT_SOP_CLASSES:
            raise StoreRefused(
                SOP_CLASS_NOT_SUPPORTED, f"SOP class {context_class} is not a CT image"
            )
        received = Received.from_event(event)
        if received.size > limits.max_instance_bytes:
            raise StoreRefused(
                TOO_LARGE,
                f"instance of {received.size} bytes exceeds {limits.max_instance_bytes}",
            )
        # The instance must fit above the watermark, so a burst of large instances cannot
        # take the disk below it between two checks.
        if self.spool.free_bytes() - received.size < limits.min_free_disk_mb * 1024 * 1024:
            raise StoreRefused(
                OUT_OF_RESOURCES,
                f"free disk space is below the {limits.min_free_disk_mb} MB watermark",
            )
        if event.context.transfer_syntax == DeflatedExplicitVRLittleEndian:
            _check_inflated_size(received.chunks(), limits.max_instance_bytes)
        ds = self._decode(event, received)
        sop_uid, series_uid, study_uid = self._check_identity(event, ds)
        self._check_image(ds)
        modality = str(ds.get("Modality", ""))
        # the UIDs checked above: the request's Affected UIDs, or the data set's in their place
        header = part10_header(context_class, sop_uid, event.context.transfer_syntax)
        path = self.spool.path_for(study_uid, series_uid, sop_uid)
        with self._locks[hash(sop_uid) % len(self._locks)]:
            existing = self.jobs.find_instance(sop_uid)
            if existing is not None:
                digest = received.digest()  # of the received data set bytes
                if existing["digest"] != digest and not _same_image(existing["path"], ds):
                    raise StoreRefused(
                        UID_CONFLICT,
                        f"other content is already stored under SOP Instance UID {sop_uid}",
                    )
                return StoreOutcome(SUCCESS, series_uid, sop_uid, new=False)
            if self.jobs.series_count(series_uid) >= limits.max_instances_per_series:
                raise StoreRefused(
                    TOO_MANY_INSTANCES,
                    f"series already holds {limits.max_instances_per_series} instances",
                )
            hashing = self._digests.submit(received.digest)
            size = self._write(path, header, received)
            geometry = slice_geometry(ds).to_json()  # while the digest is computed
            digest = hashing.result()
            try:
                new, previous = self.jobs.add_instance(
                    sop_uid=sop_uid,
                    sop_class=context_class,
                    series_uid=series_uid,
                    study_uid=study_uid,
                    modality=modality,
                    calling_ae=event.assoc.requestor.ae_title.strip(),
                    path=path,
                    size=size,
                    digest=digest,
                    geometry=geometry,
                )
            except InstanceConflict:  # pragma: no cover - guarded by the lock above
                raise StoreRefused(UID_CONFLICT, f"SOP Instance UID {sop_uid} conflict") from None
            except sqlite3.Error:
                # Not recorded, so not acknowledged: the file goes too, or a restart's
                # re-indexing of the spool would adopt an instance the peer saw refused.
                path.unlink(missing_ok=True)
                raise
        if previous is None:
            log.info("series %s: receiving (first instance)%s", series_uid, self._patient(ds))
        elif previous not in ("receiving", "processing"):
            log.info("series %s: receiving again (was %s)", series_uid, previous)
        # A data set parsed from its file (values deferred) is not handed on: the file has
        # moved, and decoding it whole is what its size forbids; its job reads the spool.
        keep = new and received.data is not None
        return StoreOutcome(
            SUCCESS, series_uid, sop_uid, new=new, path=str(path), dataset=ds if keep else None
        )

    def _write(self, path: Path, header: bytes, received: Received) -> int:
        """Put the received data set in the spool durably, behind ``header``; its size.

        A data set held in memory is written as before (one ``writev``, one
        ``fdatasync``: renaming pynetdicom's file and syncing the directory cost ingest
        about a quarter); pynetdicom then deletes its file. A large one is renamed into
        place if pynetdicom's file has exactly this header, else copied a piece at a time.
        """
        if received.data is not None:
            return self.spool.write(path, header, received.data)
        if received.file is not None and received.meta == header:
            return self.spool.adopt(received.file, path)
        assert received.file is not None
        return self.spool.copy_in(path, header, received.file, received.offset)

    def _patient(self, ds: Dataset) -> str:
        """ ", patient NAME (ID)" for a log line, only with ``log_patient_identifiers``.

        Logs are shipped, rotated and read by people who may see no patient data; by
        default the node names series by UID only.
        """
        if not self.settings.node.log_patient_identifiers:
            return ""
        return f", patient {ds.get('PatientName', '')} ({ds.get('PatientID', '')})"

    def _decode(self, event: evt.Event, received: Received) -> Dataset:
        syntax = event.context.transfer_syntax
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
                ds = pydicom.dcmread(
                    received.file, defer_size=None if syntax.is_deflated else _DEFER_SIZE
                )
                end = received.offset + received.size  # value offsets count from the file's start
            # Only the transfer syntax is read from it (pixel decoding, the checks); the
            # spool file's full meta group is written by part10_header.
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = event.context.transfer_syntax
        except Exception as exc:  # noqa: BLE001 - any parse error is the peer's data
            raise StoreRefused(CANNOT_UNDERSTAND, f"dataset cannot be decoded: {exc}") from None
        # The stream of a deflated syntax is parsed after inflating: its offsets are not
        # offsets into the received bytes, so only the values are checked.
        syntax = ds.file_meta.TransferSyntaxUID
        _check_well_formed(ds, None if syntax.is_deflated else end)
        # pydicom silently switches to the VR encoding it finds (its raw elements then have
        # no VR when read as implicit); the spool file would claim a transfer syntax its
        # data set is not in.
        first = ds.get_item(next(iter(ds.keys())))
        if isinstance(first, RawDataElement) and (first.VR is None) != syntax.is_implicit_VR:
            found = "implicit" if first.VR is None else "explicit"
            raise StoreRefused(
                CANNOT_UNDERSTAND,
                f"data set is in {found} VR, not in the negotiated {syntax.name}",
            )
        try:
            # Touch the elements we rely on so that a corrupt value fails here, as a
            # status, rather than later in a worker.
            for kw in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
                ds.get(kw)
            if "PixelData" in ds and not _deferred(ds, "PixelData"):
                ds["PixelData"].value  # noqa: B018 - forces the conversion of the last element
        except Exception as exc:  # noqa: BLE001 - any parse error is the peer's data
            raise StoreRefused(CANNOT_UNDERSTAND, f"dataset cannot be decoded: {exc}") from None
        return ds

    def _check_identity(self, event: evt.Event, ds: Dataset) -> tuple[str, str, str]:
        try:
            sop_uid = check_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
            series_uid = check_uid(ds.get("SeriesInstanceUID"), "Series Instance UID")
            study_uid = check_uid(ds.get("StudyInstanceUID"), "Study Instance UID")
        except InvalidUID as exc:
            raise StoreRefused(DOES_NOT_MATCH_SOP_CLASS, str(exc)) from None
        if str(ds.get("SOPClassUID", "")) != event.context.abstract_syntax:
            raise StoreRefused(
                DOES_NOT_MATCH_SOP_CLASS,
                f"SOP Class UID {ds.get('SOPClassUID')} does not match the presentation "
                f"context's {event.context.abstract_syntax}",
            )
        affected = str(event.request.AffectedSOPInstanceUID or "")
        if affected and affected != sop_uid:
            raise StoreRefused(
                DOES_NOT_MATCH_SOP_CLASS,
                "SOP Instance UID in the data set differs from the C-STORE request's",
            )
        return sop_uid, series_uid, study_uid

    def _check_image(self, ds: Dataset) -> None:
        limits = self.settings.limits
        if "PixelData" not in ds:
            raise StoreRefused(DOES_NOT_MATCH_SOP_CLASS, "a CT image without Pixel Data")
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
        except (AttributeError, TypeError, ValueError):
            raise StoreRefused(DOES_NOT_MATCH_SOP_CLASS, "Rows or Columns missing") from None
        if not (0 < rows <= limits.max_rows_columns and 0 < cols <= limits.max_rows_columns):
            raise StoreRefused(
                DOES_NOT_MATCH_SOP_CLASS,
                f"image size {rows}x{cols} is outside 1..{limits.max_rows_columns}",
            )
        if str(ds.get("Modality", "CT")) != "CT":
            raise StoreRefused(
                DOES_NOT_MATCH_SOP_CLASS, f"modality {ds.get('Modality')} in a CT image"
            )
        if ds.SOPClassUID in MULTIFRAME_CT_SOP_CLASSES:
            _check_frames(ds)
        try:  # values no CT image can have: refused here, not found empty after inference
            check_image_values(ds)
        except InvalidValue as exc:
            raise StoreRefused(DOES_NOT_MATCH_SOP_CLASS, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - an unparsable value is the peer's data
            raise StoreRefused(CANNOT_UNDERSTAND, f"dataset cannot be decoded: {exc}") from None
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            _check_encapsulated(ds)
        else:
            expected = _expected_pixel_bytes(ds)
            actual = _value_length(ds, "PixelData")
            if expected is not None and actual < expected:
                raise StoreRefused(
                    CANNOT_UNDERSTAND,
                    f"Pixel Data holds {actual} bytes, the image attributes declare {expected}",
                )


def _deferred(ds: Dataset, keyword: str) -> bool:
    """Whether an element's value was left in the file (read only when accessed)."""
    elem = ds.get_item(keyword, keep_deferred=True)
    return isinstance(elem, RawDataElement) and elem.value is None and bool(elem.length)


def _value_length(ds: Dataset, keyword: str) -> int:
    """An element's value length, without reading a deferred value into memory."""
    if _deferred(ds, keyword):
        return int(ds.get_item(keyword, keep_deferred=True).length)
    return len(ds[keyword].value or b"")


def read_header(data: bytes) -> Dataset:
    """Parse the header of an encoded instance (used when re-indexing the spool)."""
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
