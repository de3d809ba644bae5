"""Crafting bad input: the peers (pynetdicom SCUs, raw sockets) and the data sets the
catalogue sends, shared by its modules (one node serves them all, :mod:`.conftest`)."""

from __future__ import annotations

import copy
import socket
import struct
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    CTImageStorage,
    Verification,
)

from dicom_node.common.associations import TUNE_REQUESTED
from dicom_node_testing.synthetic import SeriesAttributes, ct_slice
from tests.peers import NodeProcess
from tests.peers import testdata as shared_data

#: Limits of the node under test: small, so that each is reached by a small case.
LIMITS = {
    "acse_timeout": 2.0,
    "network_timeout": 4.0,
    "max_instance_bytes": 1_500_000,
    "max_instances_per_series": 6,
    "min_slices": 3,
}
UNKNOWN_SYNTAX = "1.2.826.0.1.3680043.9.7433.99.1"  # a private transfer syntax nobody decodes
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.9.7433.99.2"
ALL_SYNTAXES = [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEGLosslessSV1]


@dataclass
class Ledger:
    """Expected and observed outcome of every case, and every instance the node acknowledged."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)
    acked: set[str] = field(default_factory=set)

    def check(self, case: str, expected: str, observed: str) -> None:
        """Record a case; its outcome is as expected when ``observed`` starts with ``expected``
        (statuses and reasons are compared up to the detail the case is about)."""
        self.rows.append((case, expected, observed))
        assert observed.startswith(expected), f"{case}: expected {expected!r}, got {observed!r}"

    @property
    def as_expected(self) -> int:
        return sum(o.startswith(e) for _, e, o in self.rows)


# -- peers --------------------------------------------------------------------------------
def scu_ae(*contexts: tuple[str, list[str]]) -> AE:
    ae = AE(ae_title="BAD_INPUT")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    for abstract, syntaxes in contexts:
        for syntax in syntaxes:  # one context per syntax: the node accepts each as proposed
            ae.add_requested_context(abstract, syntax)
    return ae


def echo(port: int) -> bool:
    assoc = scu_ae().associate("127.0.0.1", port, ae_title="DICOM_NODE")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


@contextmanager
def association(port: int, abstract: str = CTImageStorage, syntaxes=None):
    # tuned as the node's own: pynetdicom's requestor can otherwise lose a fast response
    # to its reactor (see RequestorDIMSE), which would read as the node not answering
    assoc = scu_ae((abstract, syntaxes or ALL_SYNTAXES)).associate(
        "127.0.0.1", port, ae_title="DICOM_NODE", evt_handlers=[TUNE_REQUESTED]
    )
    assert assoc.is_established
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def status_of(rsp: Dataset, ledger: Ledger, sop_uid: str) -> str:
    """'0xSSSS' (and the node's comment) of a C-STORE response; records acknowledgements."""
    assert rsp is not None and "Status" in rsp, "no C-STORE response"
    if rsp.Status == 0:
        ledger.acked.add(sop_uid)
    return f"0x{rsp.Status:04X}"


def comment_of(rsp: Dataset) -> str:
    return str(rsp.get("ErrorComment", ""))


@contextmanager
def as_stored_bytes() -> Iterator[None]:
    """Let pynetdicom send a file's data set bytes as they are, without decoding them."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def raw_file(
    tmp: Path,
    body: bytes,
    sop_uid: str,
    sop_class: str = CTImageStorage,
    syntax: str = ExplicitVRLittleEndian,
) -> Path:
    """A Part 10 file: valid File Meta Information, then ``body`` as its data set bytes.

    pynetdicom takes the C-STORE request's Affected SOP Class/Instance UID from the meta.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    buf = DicomBytesIO()  # the meta group alone (saving a deflated file deflates a data set)
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    path = tmp / f"{uuid.uuid4().hex}.dcm"
    path.write_bytes(buf.getvalue() + body)
    return path


def send_raw(
    port: int,
    ledger: Ledger,
    tmp: Path,
    body: bytes,
    sop_uid: str,
    syntax: str = ExplicitVRLittleEndian,
    data_uid: str | None = None,
    sop_class: str = CTImageStorage,
) -> Dataset:
    path = raw_file(tmp, body, sop_uid, sop_class, syntax)
    with as_stored_bytes(), association(port, sop_class, [syntax]) as assoc:
        rsp = assoc.send_c_store(path)
    status_of(rsp, ledger, data_uid or sop_uid)
    return rsp


# -- data ---------------------------------------------------------------------------------
def ct_slice_ds(
    z: float = 0.0,
    rows: int = 16,
    cols: int = 16,
    attrs: SeriesAttributes | None = None,
    orientation=(1, 0, 0, 0, 1, 0),
    number: int = 1,
    uid: str | None = None,
) -> Dataset:
    hu = np.random.default_rng(int(z * 10) + rows).integers(-1000, 1000, (rows, cols))
    return ct_slice(
        hu,
        (0.0, 0.0, z),
        orientation,
        (0.7, 0.7),
        2.0,
        number,
        attrs or SeriesAttributes(),
        sop_instance_uid=uid,
    )


def encoded(ds: Dataset, implicit: bool = False) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return encode(ds, implicit, True)


def ct_series(n: int, **kw) -> list[Dataset]:
    attrs = SeriesAttributes()
    return [ct_slice_ds(z=2.0 * k, attrs=attrs, number=k + 1, **kw) for k in range(n)]


def enhanced_ct(frames: int, items: int, pixel_frames: int, positions: list[float]) -> Dataset:
    """A small Enhanced CT built from the real one in the shared data (16x16 frames)."""
    src = pydicom.dcmread(shared_data() / "enhanced-ct" / "eCT_Supplemental.dcm")
    ds = copy.deepcopy(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 16
    ds.NumberOfFrames = frames
    first = src.PerFrameFunctionalGroupsSequence[0]
    per_frame = []
    for k in range(items):
        item = copy.deepcopy(first)
        item.PlanePositionSequence[0].ImagePositionPatient = [0.0, 0.0, positions[k]]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.zeros((pixel_frames, 16, 16), np.uint16).tobytes()
    return ds


# -- shared by several layers ------------------------------------------------------------
def job_of(node: NodeProcess, series_uid: str, state: str | None = None) -> dict:
    def find(jobs: list[dict]) -> dict | None:
        return next((j for j in jobs if j["series_uid"] == series_uid), None)

    jobs = node.wait_for(
        lambda js: (j := find(js)) is not None and (state is None or j["state"] == state),
        timeout=60,
        what=f"series {series_uid} {state or 'known'}",
    )
    return find(jobs)  # type: ignore[return-value]


def push(node: NodeProcess, ledger: Ledger, datasets: list[Dataset]) -> list[str]:
    with association(node.port, datasets[0].SOPClassUID) as assoc:
        return [status_of(assoc.send_c_store(ds), ledger, ds.SOPInstanceUID) for ds in datasets]


def spooled_uids(node: NodeProcess) -> dict[str, Path]:
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
        for p in (node.data_dir / "spool").glob("*/*/*.dcm")
    }


def drain(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """Read until the node closes the connection; return what it sent."""
    sock.settimeout(timeout)
    got = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


def connect(node: NodeProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", node.port), timeout=10)


def pdu_kind(data: bytes) -> str:
    kinds = {0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x07: "A-ABORT"}
    return kinds.get(data[0], "other") if data else "close"


def log_lines(node: NodeProcess, text: str) -> int:
    return node.log.read_text(errors="replace").count(text)


def pdu_bytes(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBL", kind, 0, len(body)) + body
