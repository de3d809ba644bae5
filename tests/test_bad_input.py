"""A catalogue of bad input, pushed over real associations to one node process.

Every case names its expected outcome: refused in negotiation, a specific C-STORE failure
status, a job failed with a specific reason, or a connection the node drops. After each case
a C-ECHO proves the node still serves and ``spool/.incoming`` is checked empty. The last test
prints one summary line and checks that no acknowledged instance was lost.

Peers: pynetdicom as an SCU (crafted data sets, and raw data set bytes sent as they are),
DCMTK's storescu, and plain sockets for bytes that are not DICOM at all.
"""

from __future__ import annotations

import copy
import io
import socket
import struct
import time
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    ComprehensiveSRStorage,
    CTImageStorage,
    MRImageStorage,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    Verification,
)

from dicom_node.synthetic import SeriesAttributes, ct_slice
from tests.peers import NodeProcess, associate, storescu
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
pytestmark = pytest.mark.filterwarnings(
    "ignore:Invalid value for VR UI",
    "ignore:The value length",
    "ignore:Expected explicit VR",
    "ignore:Invalid value for VR DS",
)
ALL_SYNTAXES = [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEGLosslessSV1]


# -- the ledger ---------------------------------------------------------------------------
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


@pytest.fixture(scope="module")
def ledger(request, node) -> Iterator[Ledger]:
    """The module's ledger; once its last test ran, whatever the order, the summary: every
    acknowledged instance is in the spool, nothing was written outside it."""
    book = Ledger()
    yield book
    _summary(node, book, whole=_whole_module_ran(request))


def _whole_module_ran(request) -> bool:
    """Whether the catalogue ran whole (the count is checked only then, not for ``-k``)."""
    module = request.node.path
    return sum(i.path == module for i in request.session.items) >= 100


def _summary(node: NodeProcess, ledger: Ledger, whole: bool) -> None:
    if whole:
        assert len(ledger.rows) >= 100, f"the catalogue has {len(ledger.rows)} cases, not 100"
    spooled = _spooled_uids(node)
    lost = ledger.acked - set(spooled)
    strays = [p for p in node.workdir.parent.rglob("*pwned*")]
    spool = node.data_dir / "spool"
    outside = [p for p in node.data_dir.rglob("*.dcm") if spool not in p.parents]
    line = (
        f"bad-input catalogue: {len(ledger.rows)} cases, {ledger.as_expected} as expected, "
        f"instances lost = {len(lost)}"
    )
    print("\n" + line)
    assert ledger.as_expected == len(ledger.rows)
    assert not lost, lost
    assert not strays and not outside, (strays, outside)
    # every job here fails before inference: nothing was made to send to a PACS
    assert not list((node.data_dir / "results").rglob("*.dcm"))
    assert _echo(node.port)


@pytest.fixture(scope="module")
def node(tmp_path_factory, dcmtk_tools) -> Iterator[NodeProcess]:
    work = tmp_path_factory.mktemp("bad-input")
    n = NodeProcess(
        work / "node",
        node={"settle_seconds": 0.3, "unsupported_sop_class": "refuse"},
        limits=LIMITS,
        # never reached: every series here fails assembly first
        inference={"backend": "local", "bundle": str(work / "no-bundle")},
    ).start()
    yield n
    n.stop()


@pytest.fixture(scope="module")
def fail_node(tmp_path_factory, dcmtk_tools) -> Iterator[NodeProcess]:
    """A node that negotiates every storage class and fails non-CT instances (0x0122)."""
    n = NodeProcess(
        tmp_path_factory.mktemp("bad-input-fail") / "node",
        node={
            "settle_seconds": 3600,
            "complete_on_release": False,
            "unsupported_sop_class": "fail",
        },
    ).start()
    yield n
    n.stop()


@pytest.fixture
def served(node: NodeProcess) -> Iterator[None]:
    """After each case: the node answers C-ECHO and has no half-written file."""
    yield
    assert _echo(node.port), f"node stopped serving:\n{node.tail()}"
    incoming = node.data_dir / "spool" / ".incoming"
    deadline = time.monotonic() + 5  # a connection's thread removes its partial file as it ends
    while list(incoming.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(incoming.iterdir()) == []


# -- peers --------------------------------------------------------------------------------
def _ae(*contexts: tuple[str, list[str]]) -> AE:
    ae = AE(ae_title="BAD_INPUT")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    for abstract, syntaxes in contexts:
        for syntax in syntaxes:  # one context per syntax: the node accepts each as proposed
            ae.add_requested_context(abstract, syntax)
    return ae


def _echo(port: int) -> bool:
    assoc = _ae().associate("127.0.0.1", port, ae_title="DICOM_NODE")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


@contextmanager
def _association(port: int, abstract: str = CTImageStorage, syntaxes=None):
    assoc = _ae((abstract, syntaxes or ALL_SYNTAXES)).associate(
        "127.0.0.1", port, ae_title="DICOM_NODE"
    )
    assert assoc.is_established
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _status(rsp: Dataset, ledger: Ledger, sop_uid: str) -> str:
    """'0xSSSS' (and the node's comment) of a C-STORE response; records acknowledgements."""
    assert rsp is not None and "Status" in rsp, "no C-STORE response"
    if rsp.Status == 0:
        ledger.acked.add(sop_uid)
    return f"0x{rsp.Status:04X}"


def _comment(rsp: Dataset) -> str:
    return str(rsp.get("ErrorComment", ""))


@contextmanager
def _as_stored_bytes() -> Iterator[None]:
    """Let pynetdicom send a file's data set bytes as they are, without decoding them."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def _raw_file(
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


def _send_raw(
    port: int,
    ledger: Ledger,
    tmp: Path,
    body: bytes,
    sop_uid: str,
    syntax: str = ExplicitVRLittleEndian,
    data_uid: str | None = None,
    sop_class: str = CTImageStorage,
) -> Dataset:
    path = _raw_file(tmp, body, sop_uid, sop_class, syntax)
    with _as_stored_bytes(), _association(port, sop_class, [syntax]) as assoc:
        rsp = assoc.send_c_store(path)
    _status(rsp, ledger, data_uid or sop_uid)
    return rsp


# -- data ---------------------------------------------------------------------------------
def _ct(
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


def _bytes(ds: Dataset, implicit: bool = False) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return encode(ds, implicit, True)


def _series(n: int, **kw) -> list[Dataset]:
    attrs = SeriesAttributes()
    return [_ct(z=2.0 * k, attrs=attrs, number=k + 1, **kw) for k in range(n)]


def _enhanced_ct(frames: int, items: int, pixel_frames: int, positions: list[float]) -> Dataset:
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


# -- C-STORE of crafted instances: each answered with a failure status ---------------------
def _uid_case(keyword: str, value: str | None) -> Callable[[], Dataset]:
    def build() -> Dataset:
        ds = _ct()
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
        return ds

    return build


def _modified(**changes) -> Callable[[], Dataset]:
    def build() -> Dataset:
        ds = _ct()
        for k, v in changes.items():
            if v is None:
                delattr(ds, k)
            else:
                setattr(ds, k, v)
        return ds

    return build


def _short_pixels() -> Dataset:
    ds = _ct(rows=64, cols=64)
    ds.PixelData = ds.PixelData[: 16 * 16 * 2]
    return ds


def _compressed(frames: int, fragments: list[bytes] | None, encapsulated: bool = True):
    def build() -> Dataset:
        ds = _ct()
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.NumberOfFrames = frames
        if encapsulated:
            ds.PixelData = encapsulate(fragments or [b"\xff\xd8\xff\xd9"])
            ds["PixelData"].is_undefined_length = True
        ds["PixelData"].VR = "OB"
        return ds

    return build


#: (case, build the data set, status, start of the node's error comment)
DATASET_CASES = [
    ("pixel data shorter than declared", _short_pixels, "0xC000", "Pixel Data holds 512 bytes"),
    (
        "SOP Instance UID missing",
        _uid_case("SOPInstanceUID", None),
        "0xA900",
        "SOP Instance UID is missing",
    ),
    (
        "SOP Instance UID empty",
        _uid_case("SOPInstanceUID", ""),
        "0xA900",
        "SOP Instance UID is missing or empty",
    ),
    (
        "Series Instance UID missing",
        _uid_case("SeriesInstanceUID", None),
        "0xA900",
        "Series Instance UID is missing",
    ),
    (
        "Study Instance UID empty",
        _uid_case("StudyInstanceUID", ""),
        "0xA900",
        "Study Instance UID is missing",
    ),
    (
        "SOP Instance UID '../../../../pwned-sop'",
        _uid_case("SOPInstanceUID", "../../../../pwned-sop"),
        "0xA900",
        "SOP Instance UID '../../../../pwned-sop' is not",
    ),
    (
        "Series Instance UID '../../pwned-series'",
        _uid_case("SeriesInstanceUID", "../../pwned-series"),
        "0xA900",
        "Series Instance UID '../../pwned-series' is not",
    ),
    (
        "Study Instance UID '/tmp/pwned-study'",
        _uid_case("StudyInstanceUID", "/tmp/pwned-study"),
        "0xA900",
        "Study Instance UID '/tmp/pwned-study' is not",
    ),
    (
        "Series Instance UID of 70 digits",
        _uid_case("SeriesInstanceUID", "1" * 70),
        "0xA900",
        "Series Instance UID is longer than 64 characters",
    ),
    (
        "SOP Class UID of MR in a CT context",
        _modified(SOPClassUID=MRImageStorage),
        "0xA900",
        f"SOP Class UID {MRImageStorage} does not match",
    ),
    (
        "huge declared Rows x Columns",
        _modified(Rows=65535, Columns=65535),
        "0xA900",
        "image size 65535x65535 is outside 1..4096",
    ),
    ("zero Rows", _modified(Rows=0), "0xA900", "image size 0x16 is outside"),
    ("Rows missing", _modified(Rows=None), "0xA900", "Rows or Columns missing"),
    ("no Pixel Data", _modified(PixelData=None), "0xA900", "a CT image without Pixel Data"),
    ("modality MR in a CT image", _modified(Modality="MR"), "0xA900", "modality MR in a CT"),
    (
        "compressed: 1000 frames declared, 1 fragment",
        _compressed(1000, None),
        "0xC000",
        "1000 frames declared, but Pixel Data holds only 1 fragment",
    ),
    (
        "compressed syntax, native Pixel Data",
        _compressed(1, None, encapsulated=False),
        "0xC000",
        "Pixel Data is not encapsulated",
    ),
    # meaningless pixel and geometry values: refused, the attribute named
    (
        "RescaleSlope 1e308",
        _modified(RescaleSlope="1e308"),
        "0xA900",
        "RescaleSlope 1e+308, RescaleIntercept -1024: 12-bit pixels",
    ),
    (
        "RescaleSlope 0",
        _modified(RescaleSlope="0"),
        "0xA900",
        "RescaleSlope 0 maps every pixel to one value",
    ),
    (
        "RescaleSlope NaN",
        _modified(RescaleSlope="NaN"),
        "0xA900",
        "RescaleSlope NaN is not a finite number",
    ),
    (
        "RescaleIntercept inf",
        _modified(RescaleIntercept="inf"),
        "0xA900",
        "RescaleIntercept inf is not a finite number",
    ),
    (
        "BitsAllocated 1",
        _modified(BitsAllocated=1),
        "0xA900",
        "BitsAllocated 1 is not 16, as a CT image requires",
    ),
    ("BitsAllocated 8", _modified(BitsAllocated=8), "0xA900", "BitsAllocated 8 is not 16"),
    ("BitsAllocated 64", _modified(BitsAllocated=64), "0xA900", "BitsAllocated 64 is not 16"),
    ("BitsStored 17", _modified(BitsStored=17), "0xA900", "BitsStored 17 is outside"),
    (
        "PixelSpacing 0",
        _modified(PixelSpacing=["0", "0"]),
        "0xA900",
        "PixelSpacing (0, 0) is not positive",
    ),
    (
        "PixelSpacing NaN",
        _modified(PixelSpacing=["NaN", "0.7"]),
        "0xA900",
        "PixelSpacing NaN is not a finite number",
    ),
    (
        "ImageOrientationPatient all zero",
        _modified(ImageOrientationPatient=[0] * 6),
        "0xA900",
        "ImageOrientationPatient is not two orthogonal unit vectors",
    ),
    (
        "ImagePositionPatient inf",
        _modified(ImagePositionPatient=["0", "inf", "0"]),
        "0xA900",
        "ImagePositionPatient inf is not a finite number",
    ),
    (
        "Enhanced CT: 4 frames, 3 per-frame items",
        lambda: _enhanced_ct(4, 3, 4, [0, 5, 10]),
        "0xA900",
        "4 frames declared, 3 Per-Frame Functional Groups",
    ),
    (
        "Enhanced CT: 4 frames, pixels for 2",
        lambda: _enhanced_ct(4, 4, 2, [0, 5, 10, 15]),
        "0xC000",
        "Pixel Data holds 1024 bytes, the image attributes declare 2048",
    ),
    # malformed headers
    ("Columns missing", _modified(Columns=None), "0xA900", "Rows or Columns missing"),
    ("zero Columns", _modified(Columns=0), "0xA900", "image size 16x0 is outside"),
    ("Rows 5000", _modified(Rows=5000), "0xA900", "image size 5000x16 is outside 1..4096"),
    (
        "SOP Class UID missing",
        _modified(SOPClassUID=None),
        "0xA900",
        "SOP Class UID None does not match",
    ),
    (
        "SOP Instance UID with letters",
        _uid_case("SOPInstanceUID", "1.2.abc.4"),
        "0xA900",
        "SOP Instance UID '1.2.abc.4' is not a valid UID",
    ),
    (
        "SOP Instance UID ending in a dot",
        _uid_case("SOPInstanceUID", "1.2.3."),
        "0xA900",
        "SOP Instance UID '1.2.3.' is not a valid UID",
    ),
    (
        "Study Instance UID of 65 characters",
        _uid_case("StudyInstanceUID", "1." + "2" * 63),
        "0xA900",
        "Study Instance UID is longer than 64 characters",
    ),
    ("modality SEG in a CT image", _modified(Modality="SEG"), "0xA900", "modality SEG in a CT"),
    # pixel attributes
    ("BitsAllocated 32", _modified(BitsAllocated=32), "0xA900", "BitsAllocated 32 is not 16"),
    ("BitsStored 0", _modified(BitsStored=0), "0xA900", "BitsStored 0 is outside"),
    (
        "PixelRepresentation 2",
        _modified(PixelRepresentation=2),
        "0xA900",
        "PixelRepresentation 2 is not 0 or 1",
    ),
    (
        "SamplesPerPixel 3",
        _modified(SamplesPerPixel=3),
        "0xA900",
        "SamplesPerPixel 3 is not 1",
    ),
    (
        "RescaleIntercept 1e7",
        _modified(RescaleIntercept="1e7"),
        "0xA900",
        "RescaleSlope 1, RescaleIntercept 1e+07: 12-bit pixels rescale be",
    ),
    (
        "RescaleSlope -10000",
        _modified(RescaleSlope="-10000"),
        "0xA900",
        "RescaleSlope -10000, RescaleIntercept -1024: 12-bit pixels resca",
    ),
    # geometry
    (
        "PixelSpacing negative",
        _modified(PixelSpacing=["-0.7", "0.7"]),
        "0xA900",
        "PixelSpacing (-0.7, 0.7) is not positive",
    ),
    (
        "PixelSpacing with 3 values",
        _modified(PixelSpacing=["0.7", "0.7", "0.7"]),
        "0xA900",
        "PixelSpacing has 3 values, not 2",
    ),
    (
        "PixelSpacing inf",
        _modified(PixelSpacing=["inf", "0.7"]),
        "0xA900",
        "PixelSpacing inf is not a finite number",
    ),
    (
        "ImageOrientationPatient rows parallel",
        _modified(ImageOrientationPatient=[1, 0, 0, 1, 0, 0]),
        "0xA900",
        "ImageOrientationPatient is not two orthogonal unit vectors",
    ),
    (
        "ImageOrientationPatient not unit length",
        _modified(ImageOrientationPatient=[2, 0, 0, 0, 2, 0]),
        "0xA900",
        "ImageOrientationPatient is not two orthogonal unit vectors",
    ),
    (
        "ImageOrientationPatient with 5 values",
        _modified(ImageOrientationPatient=[1, 0, 0, 0, 1]),
        "0xA900",
        "ImageOrientationPatient has 5 values, not 6",
    ),
    (
        "ImageOrientationPatient NaN",
        _modified(ImageOrientationPatient=["1", "0", "0", "0", "NaN", "0"]),
        "0xA900",
        "ImageOrientationPatient NaN is not a finite number",
    ),
    (
        "ImagePositionPatient with 2 values",
        _modified(ImagePositionPatient=["0", "0"]),
        "0xA900",
        "ImagePositionPatient has 2 values, not 3",
    ),
    # finite but physically impossible: a series of them would end "done" with 0.0 mL
    (
        "PixelSpacing 1e30",
        _modified(PixelSpacing=["1e30", "1e30"]),
        "0xA900",
        "PixelSpacing (1e+30, 1e+30) is outside 0.001..1000 mm",
    ),
    (
        "PixelSpacing 1e-30",
        _modified(PixelSpacing=["1e-30", "1e-30"]),
        "0xA900",
        "PixelSpacing (1e-30, 1e-30) is outside 0.001..1000 mm",
    ),
    (
        "RescaleSlope 1e-300",
        _modified(RescaleSlope="1e-300"),
        "0xA900",
        "RescaleSlope 1e-300: every 12-bit pixel rescales into",
    ),
    (
        "ImagePositionPatient 1e300",
        _modified(ImagePositionPatient=["0", "0", "1e300"]),
        "0xA900",
        "ImagePositionPatient (0, 0, 1e+300) lies beyond 100000 mm",
    ),
    (
        "SliceThickness NaN",
        _modified(SliceThickness="NaN"),
        "0xA900",
        "SliceThickness NaN is not a finite number",
    ),
    (
        "SliceThickness negative",
        _modified(SliceThickness="-2"),
        "0xA900",
        "SliceThickness -2 is outside 0.001..1000 mm",
    ),
    # multi-frame: values in the functional groups, frame counts
    (
        "Enhanced CT: RescaleSlope 0 in the shared functional groups",
        lambda: _enhanced_group_value("PixelValueTransformationSequence", RescaleSlope="0"),
        "0xA900",
        "RescaleSlope 0 maps every pixel to one value",
    ),
    (
        "Enhanced CT: PixelSpacing 0 in the shared functional groups",
        lambda: _enhanced_group_value("PixelMeasuresSequence", PixelSpacing=["0", "0"]),
        "0xA900",
        "PixelSpacing (0, 0) is not positive",
    ),
    (
        "Enhanced CT: PixelSpacing 1e30 in the shared functional groups",
        lambda: _enhanced_group_value("PixelMeasuresSequence", PixelSpacing=["1e30", "1e30"]),
        "0xA900",
        "PixelSpacing (1e+30, 1e+30) is outside 0.001..1000 mm",
    ),
    (
        "Enhanced CT: SliceThickness NaN in the shared functional groups",
        lambda: _enhanced_group_value(
            "PixelMeasuresSequence", PixelSpacing=["0.7", "0.7"], SliceThickness="NaN"
        ),
        "0xA900",
        "SliceThickness NaN is not a finite number",
    ),
    (
        "Enhanced CT: 0 frames declared",
        lambda: _enhanced_ct(0, 0, 0, []),
        "0xA900",
        "0 frames declared",
    ),
    # encapsulated Pixel Data
    (
        "compressed: Basic Offset Table only, no fragment",
        lambda: _no_fragment(),
        "0xC000",
        "encapsulated Pixel Data holds no fragment",
    ),
]


def _enhanced_group_value(sequence: str, **values) -> Dataset:
    """An Enhanced CT whose shared functional groups hold ``values`` in ``sequence``."""
    ds = _enhanced_ct(2, 2, 2, [0.0, 5.0])
    shared = ds.SharedFunctionalGroupsSequence[0]
    if sequence not in shared:
        setattr(shared, sequence, [Dataset()])
    for keyword, value in values.items():
        setattr(getattr(shared, sequence)[0], keyword, value)
    return ds


def _no_fragment() -> Dataset:
    ds = _compressed(1, None)()
    ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"  # the Basic Offset Table item
    return ds


@pytest.mark.parametrize(
    ("case", "build", "status", "comment"), DATASET_CASES, ids=[c[0] for c in DATASET_CASES]
)
def test_crafted_instance_is_refused(node, ledger, served, tmp_path, case, build, status, comment):
    ds = build()
    syntax = ds.file_meta.TransferSyntaxUID
    affected = ds.file_meta.MediaStorageSOPInstanceUID
    # Sent as bytes with the meta's UIDs, so that data sets pynetdicom would refuse to
    # send (no SOP Instance UID, a class other than the context's) reach the node as made.
    rsp = _send_raw(
        node.port,
        ledger,
        tmp_path,
        _bytes(ds),
        affected,
        syntax=syntax,
        sop_class=ds.file_meta.MediaStorageSOPClassUID,
    )
    ledger.check(case, f"{status} {comment}", f"{_status(rsp, ledger, affected)} {_comment(rsp)}")


@pytest.mark.parametrize("pdu", [0, 16384], ids=["one PDU", "16 KiB PDUs"])
def test_instance_above_max_instance_bytes_is_aborted_as_it_arrives(
    node, ledger, served, tmp_path, pdu
):
    """The association ends while the data set arrives, not after it was buffered whole:
    in one PDU (its header is enough) or in many (the running total is)."""
    ds = _ct(rows=1024, cols=1024)  # 2 MB, the node's limit is 1.5 MB
    before = _log_lines(node, "(limits.max_instance_bytes 1500000)")
    ae = _ae((CTImageStorage, [ExplicitVRLittleEndian]))
    ae.maximum_pdu_size = pdu
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE", max_pdu=pdu)
    assert assoc.is_established
    started = time.monotonic()
    rsp = assoc.send_c_store(ds)
    elapsed = time.monotonic() - started
    until = time.monotonic() + 5  # the peer's DUL notices the abort or the reset
    while assoc.is_established and time.monotonic() < until:
        time.sleep(0.05)
    ended = not assoc.is_established
    if assoc.is_established:
        assoc.release()
    deadline = time.monotonic() + 5
    while (
        time.monotonic() < deadline
        and _log_lines(node, "(limits.max_instance_bytes 1500000)") == before
    ):
        time.sleep(0.1)
    logged = _log_lines(node, "(limits.max_instance_bytes 1500000)") - before
    answered = rsp is not None and "Status" in rsp
    if answered:
        _status(rsp, ledger, ds.SOPInstanceUID)
    ledger.check(
        f"instance above max_instance_bytes, {'one PDU' if not pdu else 'PDUs'}",
        "aborted, no response, 1 log line",
        f"{'aborted' if ended else 'open'}, "
        f"{'a response' if answered else 'no response'}, {logged} log line(s)",
    )
    assert elapsed < 5, elapsed
    assert str(ds.SOPInstanceUID) not in _spooled_uids(node)


# -- corrupt and truncated streams --------------------------------------------------------
def _corrupt_middle(uid: str) -> bytes:
    body = bytearray(_bytes(_ct(rows=32, cols=32, uid=uid)))
    body[400:900] = np.random.default_rng(5).bytes(500)
    return bytes(body)


def _truncated_pixels(uid: str) -> bytes:
    body = _bytes(_ct(rows=32, cols=32, uid=uid))
    return body[: len(body) - 700]


def _cut_in_header(uid: str) -> bytes:
    body = _bytes(_ct(uid=uid))
    # end 3 bytes into the header of the element after (0008,0016) SOP Class UID
    ds = pydicom.dcmread(io.BytesIO(body), force=True)
    raw = ds.get_item(0x00080016)
    return body[: raw.value_tell + raw.length + 3]


def _jpeg(uid: str) -> Dataset:
    ds = _compressed(1, [b"\xff\xd8" + bytes(300) + b"\xff\xd9"])()
    ds.SOPInstanceUID = uid
    return ds


def _truncated_fragment(uid: str) -> bytes:
    return _bytes(_jpeg(uid))[:-120]


def _overlong_fragment(uid: str) -> bytes:
    ds = _jpeg(uid)
    data = bytearray(ds.PixelData)
    data[12:16] = struct.pack("<L", 304 + 1000)  # the fragment item after an empty BOT
    ds.PixelData = bytes(data)
    return _bytes(ds)


def _deflate_bomb(uid: str) -> bytes:
    """A data set of 8 MB (2048x2048 zero pixels) that deflates to some 8 KB."""
    ds = _ct(uid=uid)
    ds.Rows = ds.Columns = 2048
    ds.PixelData = bytes(2048 * 2048 * 2)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(_bytes(ds)) + deflater.flush()


STREAM_CASES = [
    (
        "deflated data set inflating past max_instance_bytes",
        _deflate_bomb,
        DeflatedExplicitVRLittleEndian,
        "0xA702",
        "deflated data set inflates past 1500000",
    ),
    (
        "corrupt: random bytes as the data set",
        lambda _: np.random.default_rng(5).bytes(5000),
        ExplicitVRLittleEndian,
        "0xC000",
        "data set ends inside element",
    ),
    (
        "corrupt: 500 bytes of garbage mid-header",
        _corrupt_middle,
        ExplicitVRLittleEndian,
        "0xC000",
        "data set ends inside element",
    ),
    (
        "corrupt: a data set of 0xFF bytes",
        lambda _: b"\xff" * 256,
        ExplicitVRLittleEndian,
        "0xC000",
        "the data set holds no readable element",
    ),
    (
        "truncated inside Pixel Data",
        _truncated_pixels,
        ExplicitVRLittleEndian,
        "0xC000",
        "data set ends inside element (7FE0,0010)",
    ),
    (
        "truncated inside an element header",
        _cut_in_header,
        ExplicitVRLittleEndian,
        "0xC000",
        "3 byte(s) after element (0008,0016) cannot be parsed",
    ),
    (
        "truncated inside a compressed fragment",
        _truncated_fragment,
        JPEGLosslessSV1,
        "0xC000",
        "the data set holds no readable element",
    ),
    (
        "fragment longer than the Pixel Data holding it",
        _overlong_fragment,
        JPEGLosslessSV1,
        "0xC000",
        "encapsulated Pixel Data: Unexpected tag",
    ),
    (
        "implicit VR data set in an explicit VR context",
        lambda uid: _bytes(_ct(uid=uid), implicit=True),
        ExplicitVRLittleEndian,
        "0xC000",
        "data set is in implicit VR, not in the negotiated",
    ),
    (
        "deflated syntax, stream not deflate",
        lambda _: np.random.default_rng(9).bytes(3000),
        DeflatedExplicitVRLittleEndian,
        "0xC000",
        "dataset cannot be decoded: Error -3 while decompressing data",
    ),
    (
        "deflated syntax, deflate stream cut in half",
        lambda uid: _deflated(uid)[: len(_deflated(uid)) // 2],
        DeflatedExplicitVRLittleEndian,
        "0xC000",
        "dataset cannot be decoded: Error -5 while decompressing data",
    ),
    (
        "explicit VR data set in an implicit VR context",
        lambda uid: _bytes(_ct(uid=uid)),
        ImplicitVRLittleEndian,
        "0xC000",
        "data set is in explicit VR, not in the negotiated Implicit VR Li",
    ),
    (
        "big endian data set in a little endian context",
        lambda uid: _big_endian(uid),
        ExplicitVRLittleEndian,
        "0xC000",
        "data set ends inside element (0800,0500)",
    ),
    (
        "an OB element declaring 1 GiB, 10 bytes present",
        lambda uid: (
            _with_element(uid, struct.pack("<HH2s2xI", 0x0029, 0x1010, b"OB", 1 << 30)) + bytes(10)
        ),
        ExplicitVRLittleEndian,
        "0xC000",
        "data set ends inside element (0029,1010)",
    ),
    (  # PS3.5 6.2.2: a VR the reader does not know is read as UN; the image is whole
        "an element of unknown VR 'ZZ' after Pixel Data: stored",
        lambda uid: (
            _bytes(_ct(uid=uid)) + struct.pack("<HH2sH", 0x7FE1, 0x0010, b"ZZ", 4) + b"abcd"
        ),
        ExplicitVRLittleEndian,
        "0x0000",
        "",
    ),
    (
        "a sequence of undefined length never closed",
        lambda uid: _with_element(uid, _open_sequence()),
        ExplicitVRLittleEndian,
        "0xC000",
        "dataset cannot be decoded: No tag to read",
    ),
]


def _deflated(uid: str) -> bytes:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(_bytes(_ct(uid=uid))) + deflater.flush()


def _big_endian(uid: str) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return encode(_ct(uid=uid), False, False)


def _with_element(uid: str, element: bytes) -> bytes:
    """A CT data set without Pixel Data, then ``element`` (bytes as they are)."""
    ds = _ct(uid=uid)
    del ds.PixelData
    return _bytes(ds) + element


def _open_sequence() -> bytes:
    """(0029,1020) SQ of undefined length, one item of undefined length, no delimiters."""
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    inner = struct.pack("<HH2sH", 0x0010, 0x0020, b"LO", 4) + b"ABCD"
    return struct.pack("<HH2s2xI", 0x0029, 0x1020, b"SQ", 0xFFFFFFFF) + item + inner


@pytest.mark.parametrize(
    ("case", "body", "syntax", "status", "comment"), STREAM_CASES, ids=[c[0] for c in STREAM_CASES]
)
def test_corrupt_stream_is_refused(
    node, ledger, served, tmp_path, case, body, syntax, status, comment
):
    uid = generate_uid()
    rsp = _send_raw(node.port, ledger, tmp_path, body(uid), uid, syntax=syntax)
    ledger.check(case, f"{status} {comment}", f"{_status(rsp, ledger, uid)} {_comment(rsp)}")


def test_affected_uid_differs_from_the_data_set(node, ledger, served, tmp_path):
    ds = _ct()
    rsp = _send_raw(
        node.port, ledger, tmp_path, _bytes(ds), generate_uid(), data_uid=ds.SOPInstanceUID
    )
    ledger.check(
        "Affected SOP Instance UID differs from the data set's",
        "0xA900 SOP Instance UID in the data set differs",
        f"{_status(rsp, ledger, ds.SOPInstanceUID)} {_comment(rsp)}",
    )


_FORGED = "2026-01-01 00:00:00,000 INFO x: FORGED"  # within a UID's 64 characters


@pytest.mark.parametrize("where", ["Affected SOP Instance UID", "data set SOP Instance UID"])
def test_control_characters_do_not_forge_log_lines(node, ledger, served, tmp_path, where):
    ds = _ct()
    evil = f"1.2.3\r\n{_FORGED}"
    if where == "Affected SOP Instance UID":
        rsp = _send_raw(node.port, ledger, tmp_path, _bytes(ds), evil, data_uid=ds.SOPInstanceUID)
    else:
        ds.SOPInstanceUID = evil
        rsp = _send_raw(node.port, ledger, tmp_path, _bytes(ds), evil)
    status = _status(rsp, ledger, ds.SOPInstanceUID)
    deadline = time.monotonic() + 5  # the refusal's log line names the value, escaped
    logs = [node.log, node.data_dir / "logs" / "node.log"]
    while time.monotonic() < deadline and not all(
        "FORGED" in p.read_text(errors="replace") for p in logs
    ):
        time.sleep(0.1)
    forged = [
        line
        for p in logs
        for line in p.read_text(errors="replace").splitlines()
        if line.startswith(_FORGED[:20]) or line.startswith("2026-01-01")
    ]
    ledger.check(
        f"{where} with CR LF and a forged log line",
        "0xA900, no forged line",
        f"{status}, {'no forged line' if not forged else forged}",
    )


# -- negotiation --------------------------------------------------------------------------
NEGOTIATION_CASES = [
    ("unknown transfer syntax", CTImageStorage, UNKNOWN_SYNTAX, 0x04),
    ("MR Image Storage", MRImageStorage, ExplicitVRLittleEndian, 0x03),
    ("Comprehensive SR Storage", ComprehensiveSRStorage, ExplicitVRLittleEndian, 0x03),
    ("Segmentation Storage", SegmentationStorage, ExplicitVRLittleEndian, 0x03),
    ("a private SOP class", PRIVATE_SOP_CLASS, ExplicitVRLittleEndian, 0x03),
    ("RT Structure Set Storage", RTStructureSetStorage, ExplicitVRLittleEndian, 0x03),
    ("Secondary Capture Image Storage", SecondaryCaptureImageStorage, ImplicitVRLittleEndian, 0x03),
    ("CT Image Storage in a private syntax only", CTImageStorage, PRIVATE_SOP_CLASS, 0x04),
]
_CONTEXT_RESULT = {0x03: "abstract syntax not supported", 0x04: "transfer syntax not supported"}


@pytest.mark.parametrize(
    ("case", "abstract", "syntax", "result"),
    NEGOTIATION_CASES,
    ids=[c[0] for c in NEGOTIATION_CASES],
)
def test_refused_in_negotiation(node, ledger, served, case, abstract, syntax, result):
    assoc = _ae((abstract, [syntax])).associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
    assert assoc.is_established  # Verification is accepted; the storage context is not
    observed = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
    assoc.release()
    ledger.check(
        f"{case}: refused in negotiation",
        _CONTEXT_RESULT[result],
        _CONTEXT_RESULT.get(observed.get(abstract), "accepted"),
    )


def test_real_seg_from_dcmtk_is_refused_in_negotiation(node, ledger, served):
    seg = shared_data() / "seg" / "dcmqi" / "liver.dcm"
    r = storescu(node.port, seg, "DICOM_NODE", "STORESCU", "-R")  # propose the file's class
    observed = r.stderr.strip() if r.returncode else "sent"
    ledger.check(
        "real SEG file from DCMTK storescu", "F: No Acceptable Presentation Contexts", observed
    )
    assert str(pydicom.dcmread(seg).SOPInstanceUID) not in _spooled_uids(node)


def _sr() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComprehensiveSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "SR"
    return ds


def _mr() -> Dataset:
    ds = _ct()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.Modality = "MR"
    return ds


@pytest.mark.parametrize(("case", "build"), [("MR", _mr), ("SR", _sr)])
def test_non_ct_fails_with_0122_when_negotiated(fail_node, ledger, case, build):
    ds = build()
    with _association(fail_node.port, ds.SOPClassUID) as assoc:
        rsp = assoc.send_c_store(ds)
    ledger.check(
        f"{case} with unsupported_sop_class='fail'",
        f"0x0122 SOP class {ds.SOPClassUID} is not a CT image",
        f"{_status(rsp, ledger, ds.SOPInstanceUID)} {_comment(rsp)}",
    )
    assert _echo(fail_node.port)


def test_real_seg_from_dcmtk_fails_with_0122(fail_node, ledger):
    r = storescu(
        fail_node.port,
        shared_data() / "seg" / "dcmqi" / "liver.dcm",
        "DICOM_NODE",
        "STORESCU",
        "-R",
        "-v",
    )
    response = [line for line in r.stderr.splitlines() if "Received Store Response" in line]
    ledger.check(
        "real SEG file from DCMTK with unsupported_sop_class='fail'",
        "I: Received Store Response (Refused: SOPClassNotSupported)",
        response[0] if response else r.stderr[-300:],
    )
    assert fail_node.jobs() == []
    assert _echo(fail_node.port)


# -- the same SOP Instance UID twice ------------------------------------------------------
def _spooled_uids(node: NodeProcess) -> dict[str, Path]:
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
        for p in (node.data_dir / "spool").glob("*/*/*.dcm")
    }


def test_same_uid_other_content_keeps_the_first(node, ledger, served):
    first = _ct(z=0.0)
    second = copy.deepcopy(first)
    second.PixelData = np.zeros((16, 16), np.uint16).tobytes()
    with _association(node.port) as assoc:
        a = _status(assoc.send_c_store(first), ledger, first.SOPInstanceUID)
        rsp = assoc.send_c_store(second)
    b = f"{_status(rsp, ledger, second.SOPInstanceUID)} {_comment(rsp)}"
    ledger.check(
        "same SOP Instance UID, other pixels",
        "0x0000 then 0xC001 other content is already stored under",
        f"{a} then {b}",
    )
    kept = pydicom.dcmread(_spooled_uids(node)[str(first.SOPInstanceUID)])
    assert kept.PixelData == first.PixelData


def test_same_uid_same_content_is_a_duplicate(node, ledger, served):
    ds = _ct(z=0.0)
    with _association(node.port) as assoc:
        statuses = [_status(assoc.send_c_store(ds), ledger, ds.SOPInstanceUID) for _ in range(2)]
    count = _job(node, ds.SeriesInstanceUID)["instance_count"]
    ledger.check(
        "same instance sent twice",
        "0x0000 0x0000, stored once",
        f"{' '.join(statuses)}, stored {'once' if count == 1 else count}",
    )


# -- series the node stores, whose jobs fail with a reason ---------------------------------
def _job(node: NodeProcess, series_uid: str, state: str | None = None) -> dict:
    def find(jobs: list[dict]) -> dict | None:
        return next((j for j in jobs if j["series_uid"] == series_uid), None)

    jobs = node.wait_for(
        lambda js: (j := find(js)) is not None and (state is None or j["state"] == state),
        timeout=60,
        what=f"series {series_uid} {state or 'known'}",
    )
    return find(jobs)  # type: ignore[return-value]


def _push(node: NodeProcess, ledger: Ledger, datasets: list[Dataset]) -> list[str]:
    with _association(node.port, datasets[0].SOPClassUID) as assoc:
        return [_status(assoc.send_c_store(ds), ledger, ds.SOPInstanceUID) for ds in datasets]


def _mixed_sizes() -> list[Dataset]:
    s = _series(3)
    big = _ct(z=4.0, rows=20, cols=20, number=3)
    big.SeriesInstanceUID, big.StudyInstanceUID = s[0].SeriesInstanceUID, s[0].StudyInstanceUID
    big.FrameOfReferenceUID = s[0].FrameOfReferenceUID
    return [s[0], s[1], big]


def _mixed_orientations() -> list[Dataset]:
    s = _series(3)
    s[2].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    return s


def _gantry_tilt() -> list[Dataset]:
    s = _series(4)
    for k, ds in enumerate(s):
        ds.GantryDetectorTilt = 20
        ds.ImagePositionPatient = [0.0, 2.0 * k * np.tan(np.radians(20)), 2.0 * k]
    return s


def _gap() -> list[Dataset]:
    s = _series(5)
    for ds, z in zip(s, (0, 2, 4, 8, 10), strict=True):
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    return s


def _enhanced_inconsistent() -> list[Dataset]:
    return [_enhanced_ct(4, 4, 4, [0.0, 5.0, 5.0, 30.0])]


def _undecodable_jpeg() -> list[Dataset]:
    s = _series(3)
    for ds in s:
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = encapsulate([b"\xff\xd8" + bytes(range(200)) + b"\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    return s


def _two_frames_of_reference() -> list[Dataset]:
    s = _series(3)
    s[2].FrameOfReferenceUID = generate_uid()
    return s


JOB_CASES = [
    (
        "two frames of reference",
        _two_frames_of_reference,
        "not a volume: slices have 2 different FrameOfReferenceUID values",
    ),
    ("single slice", lambda: _series(1), "not a volume: only 1 slice(s); at least 3 are needed"),
    ("mixed sizes", _mixed_sizes, "not a volume: slices have mixed sizes: 16x16, 20x20"),
    (
        "mixed orientations",
        _mixed_orientations,
        "not a volume: slices have 2 different orientations",
    ),
    ("gantry tilt", _gantry_tilt, "not a volume: gantry tilt of 20.0 degrees"),
    ("a gap of one slice", _gap, "not a volume: 1 slice(s) missing: gap of 4.00 mm"),
    (
        "Enhanced CT, frames at repeated positions",
        _enhanced_inconsistent,
        "not a volume: frames do not form a volume",
    ),
    (
        "JPEG Lossless that does not decode",
        _undecodable_jpeg,
        "not a volume: pixel data cannot be decoded",
    ),
]


@pytest.mark.parametrize(("case", "build", "reason"), JOB_CASES, ids=[c[0] for c in JOB_CASES])
def test_series_job_fails_with_reason(node, ledger, served, case, build, reason):
    datasets = build()
    statuses = _push(node, ledger, datasets)
    assert statuses == ["0x0000"] * len(datasets)
    job = _job(node, datasets[0].SeriesInstanceUID, "failed")
    ledger.check(f"job: {case}", f"failed: {reason}", f"{job['state']}: {job['reason']}")
    assert job["instance_count"] == len(datasets)


def test_gap_series_from_dcmtk_fails_with_reason(node, ledger, served, tmp_path):
    paths = []
    for k, ds in enumerate(_gap()):
        paths.append(tmp_path / f"{k}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    r = storescu(node.port, paths)
    assert r.returncode == 0, r.stderr
    ledger.acked.update(str(pydicom.dcmread(p).SOPInstanceUID) for p in paths)
    job = _job(node, str(pydicom.dcmread(paths[0]).SeriesInstanceUID), "failed")
    reason = "not a volume: 1 slice(s) missing"
    ledger.check(
        "job: a gap, pushed by DCMTK storescu",
        f"failed: {reason}",
        f"{job['state']}: {job['reason']}",
    )


def test_series_over_the_instance_limit(node, ledger, served):
    attrs = SeriesAttributes()
    datasets = [_ct(z=0.0, attrs=attrs, number=k + 1) for k in range(7)]  # one position
    with _association(node.port) as assoc:
        statuses = [
            _status(assoc.send_c_store(ds), ledger, ds.SOPInstanceUID) for ds in datasets[:6]
        ]
        rsp = assoc.send_c_store(datasets[6])
    ledger.check(
        "7th instance of a series limited to 6",
        "0xA701 series already holds 6",
        f"{_status(rsp, ledger, datasets[6].SOPInstanceUID)} {_comment(rsp)}",
    )
    assert statuses == ["0x0000"] * 6
    job = _job(node, attrs.series_instance_uid, "failed")
    ledger.check(
        "job: six slices at one position",
        "failed: not a volume: two or more slices share the same position",
        f"{job['state']}: {job['reason']}",
    )


# -- the transport: bytes that are not DICOM, peers that stop talking ---------------------
def _drain(sock: socket.socket, timeout: float = 30.0) -> bytes:
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


def _connect(node: NodeProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", node.port), timeout=10)


def _pdu_kind(data: bytes) -> str:
    kinds = {0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x07: "A-ABORT"}
    return kinds.get(data[0], "other") if data else "close"


def _log_lines(node: NodeProcess, text: str) -> int:
    return node.log.read_text(errors="replace").count(text)


def test_garbage_bytes_on_the_port(node, ledger, served):
    before = _log_lines(node, "Unknown PDU type")
    with _connect(node) as s:
        s.sendall(b"\xee" + np.random.default_rng(3).bytes(4095))
        answer = _drain(s)
    time.sleep(0.2)  # let the node's log line land
    lines = _log_lines(node, "Unknown PDU type") - before
    ledger.check(
        "garbage bytes on the port",
        "A-ABORT, 1 log line",
        f"{_pdu_kind(answer)}, {lines} log line{'s' if lines != 1 else ''}",
    )


def test_http_request_on_the_port(node, ledger, served):
    with _connect(node) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: node\r\n\r\n")
        answer = _drain(s)
    ledger.check("an HTTP request on the DICOM port", "A-ABORT", _pdu_kind(answer))


def test_malformed_associate_request(node, ledger, served):
    body = (
        b"\x00\x01\x00\x00"
        + b"DICOM_NODE".ljust(16)
        + b"BAD_INPUT".ljust(16)
        + bytes(32)
        + b"\x10\x00\x00\x40"
        + b"1.2.840.10008.3.1.1.1"
    )
    with _connect(node) as s:
        s.sendall(b"\x01\x00" + struct.pack(">L", len(body)) + body)
        answer = _drain(s)
    ledger.check("A-ASSOCIATE-RQ with an item longer than the PDU", "A-ABORT", _pdu_kind(answer))


def test_pdu_declaring_4_gib_then_silence(node, ledger, served):
    with _connect(node) as s:
        s.sendall(b"\x01\x00\xff\xff\xff\xf0" + bytes(64))
        answer = _drain(s)  # the node's read times out after network_timeout
    ledger.check(
        "PDU header declaring 4 GiB, then silence",
        "dropped",
        "dropped" if _pdu_kind(answer) in ("close", "A-ABORT") else answer[:16].hex(),
    )


def test_abandoned_connection(node, ledger, served):
    with _connect(node) as s:
        answer = _drain(s)  # connect, say nothing: dropped after acse_timeout
    ledger.check("connection that never asks for an association", "close", _pdu_kind(answer))


def test_silent_association_is_aborted(node, ledger, served):
    with _association(node.port) as assoc:
        deadline = time.monotonic() + 30
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.2)
        ledger.check(
            "association that goes quiet",
            "aborted by the node",
            "aborted by the node" if assoc.is_aborted else "still open",
        )


def _partial_store(node: NodeProcess, finish: Callable) -> tuple[str, int]:
    """Send the first fragments of a C-STORE of a 300x300 image, then ``finish(assoc)``; the
    instance's UID and the local port the association came from."""
    ds = _ct(rows=300, cols=300)
    with _association(node.port) as assoc:
        port = assoc.dul.socket.socket.getsockname()[1]
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = CTImageStorage
        req.AffectedSOPInstanceUID = ds.SOPInstanceUID
        req.Priority = 2
        req.DataSet = io.BytesIO(_bytes(ds))
        msg = C_STORE_RQ()
        msg.primitive_to_message(req)
        context_id = assoc.accepted_contexts[-1].context_id
        for k, pdata in enumerate(msg.encode_msg(context_id, 16384)):
            if k == 4:
                break
            assoc.dul.send_pdu(pdata)
        time.sleep(0.3)
        finish(assoc)
    return str(ds.SOPInstanceUID), port


def _tcp_drop(assoc) -> None:
    assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
    assoc.kill()


@pytest.mark.parametrize(
    ("case", "finish"),
    [
        ("A-ABORT mid-transfer", lambda assoc: assoc.abort()),
        ("TCP connection dropped mid-transfer", _tcp_drop),
    ],
)
def test_interrupted_transfer_leaves_nothing(node, ledger, served, case, finish):
    uid, port = _partial_store(node, finish)
    # the node has seen the association end (then anything it began is gone or kept)
    ended = f"association aborted: BAD_INPUT from 127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while ended not in node.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"the node never logged {ended!r}"
        time.sleep(0.05)
    incoming = list((node.data_dir / "spool" / ".incoming").iterdir())
    stored = uid in _spooled_uids(node)
    ledger.check(
        case,
        "nothing stored, .incoming empty",
        f"{'stored' if stored else 'nothing stored'}, "
        f".incoming {'empty' if not incoming else incoming}",
    )


# -- association-level abuse --------------------------------------------------------------
def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBL", kind, 0, len(body)) + body


@pytest.mark.parametrize(
    ("case", "pdu"),
    [
        ("P-DATA-TF before any association", _pdu(0x04, struct.pack(">LBB", 4, 1, 3) + b"ab")),
        ("A-RELEASE-RQ before any association", _pdu(0x05, bytes(4))),
        ("A-ASSOCIATE-AC sent to the acceptor", _pdu(0x02, bytes(68))),
    ],
)
def test_pdu_out_of_order_is_aborted(node, ledger, served, case, pdu):
    with _connect(node) as s:
        s.sendall(pdu)
        answer = _drain(s)
    ledger.check(case, "A-ABORT", _pdu_kind(answer))


def test_wrong_called_ae_title_is_rejected(node, ledger, served):
    assoc, rejection = associate(
        _ae((CTImageStorage, [ExplicitVRLittleEndian])), node.port, ae_title="NOT_THE_NODE"
    )
    if assoc.is_established:
        assoc.release()
    observed = "established" if rejection is None else f"rejected {rejection}"
    # (result, source, reason): rejected permanent, by the service user, called AE title
    ledger.check("A-ASSOCIATE-RQ to another called AE title", "rejected (1, 1, 7)", observed)


def test_association_request_without_presentation_contexts(node, ledger, served):
    with _connect(node) as s:
        s.sendall(_associate_rq_without_contexts())
        answer = _drain(s, timeout=10)
    ledger.check(
        "A-ASSOCIATE-RQ without presentation contexts", "A-ASSOCIATE-RJ", _pdu_kind(answer)
    )


def _associate_rq_without_contexts() -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) with an application context and user information
    (maximum length) and no presentation context item."""
    app = b"1.2.840.10008.3.1.1.1"
    app_item = struct.pack(">BBH", 0x10, 0, len(app)) + app
    max_len = struct.pack(">BBHL", 0x51, 0, 4, 16384)
    user = struct.pack(">BBH", 0x50, 0, len(max_len)) + max_len
    body = (
        struct.pack(">HH", 1, 0)
        + b"DICOM_NODE".ljust(16)
        + b"BAD_INPUT".ljust(16)
        + bytes(32)
        + app_item
        + user
    )
    return _pdu(0x01, body)


def test_c_store_on_a_context_never_negotiated(node, ledger, served):
    ds = _ct()
    with _association(node.port) as assoc:
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = CTImageStorage
        req.AffectedSOPInstanceUID = ds.SOPInstanceUID
        req.Priority = 2
        req.DataSet = io.BytesIO(_bytes(ds))
        msg = C_STORE_RQ()
        msg.primitive_to_message(req)
        for pdata in msg.encode_msg(201, 16384):  # an odd ID no context was given
            assoc.dul.send_pdu(pdata)
        deadline = time.monotonic() + 10
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        observed = "aborted by the node" if assoc.is_aborted else "still open"
    ledger.check("C-STORE on a presentation context never negotiated", "aborted", observed)
    assert str(ds.SOPInstanceUID) not in _spooled_uids(node)
