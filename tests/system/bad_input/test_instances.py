"""Bad input in a C-STORE: crafted data sets, corrupt and truncated streams, the same SOP
Instance UID twice. Each answered with its DIMSE failure status and reason, nothing kept."""

from __future__ import annotations

import copy
import io
import struct
import time
import warnings
import zlib
from collections.abc import Callable

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    generate_uid,
)
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
)

from tests.system.bad_input.crafting import (
    association,
    comment_of,
    ct_slice_ds,
    encoded,
    enhanced_ct,
    job_of,
    log_lines,
    scu_ae,
    send_raw,
    spooled_uids,
    status_of,
)

pytestmark = [
    pytest.mark.cost(20),
    pytest.mark.filterwarnings(
        "ignore:Invalid value for VR UI",
        "ignore:The value length",
        "ignore:Expected explicit VR",
        "ignore:Invalid value for VR DS",
    ),
]


# -- C-STORE of crafted instances: each answered with a failure status ---------------------
def _uid_case(keyword: str, value: str | None) -> Callable[[], Dataset]:
    def build() -> Dataset:
        ds = ct_slice_ds()
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
        return ds

    return build


def _modified(**changes) -> Callable[[], Dataset]:
    def build() -> Dataset:
        ds = ct_slice_ds()
        for k, v in changes.items():
            if v is None:
                delattr(ds, k)
            else:
                setattr(ds, k, v)
        return ds

    return build


def _short_pixels() -> Dataset:
    ds = ct_slice_ds(rows=64, cols=64)
    ds.PixelData = ds.PixelData[: 16 * 16 * 2]
    return ds


def _compressed(frames: int, fragments: list[bytes] | None, encapsulated: bool = True):
    def build() -> Dataset:
        ds = ct_slice_ds()
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
    (
        "Enhanced CT: 4 frames, 3 per-frame items",
        lambda: enhanced_ct(4, 3, 4, [0, 5, 10]),
        "0xA900",
        "4 frames declared, 3 Per-Frame Functional Groups",
    ),
    (
        "Enhanced CT: 4 frames, pixels for 2",
        lambda: enhanced_ct(4, 4, 2, [0, 5, 10, 15]),
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
        lambda: enhanced_ct(0, 0, 0, []),
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
    ds = enhanced_ct(2, 2, 2, [0.0, 5.0])
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
    rsp = send_raw(
        node.port,
        ledger,
        tmp_path,
        encoded(ds),
        affected,
        syntax=syntax,
        sop_class=ds.file_meta.MediaStorageSOPClassUID,
    )
    ledger.check(
        case, f"{status} {comment}", f"{status_of(rsp, ledger, affected)} {comment_of(rsp)}"
    )


@pytest.mark.parametrize("pdu", [0, 16384], ids=["one PDU", "16 KiB PDUs"])
def test_instance_above_max_instance_bytes_is_aborted_as_it_arrives(
    node, ledger, served, tmp_path, pdu
):
    """The association ends while the data set arrives, not after it was buffered whole:
    in one PDU (its header is enough) or in many (the running total is)."""
    ds = ct_slice_ds(rows=1024, cols=1024)  # 2 MB, the node's limit is 1.5 MB
    before = log_lines(node, "(limits.max_instance_bytes 1500000)")
    ae = scu_ae((CTImageStorage, [ExplicitVRLittleEndian]))
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
        and log_lines(node, "(limits.max_instance_bytes 1500000)") == before
    ):
        time.sleep(0.1)
    logged = log_lines(node, "(limits.max_instance_bytes 1500000)") - before
    answered = rsp is not None and "Status" in rsp
    if answered:
        status_of(rsp, ledger, ds.SOPInstanceUID)
    ledger.check(
        f"instance above max_instance_bytes, {'one PDU' if not pdu else 'PDUs'}",
        "aborted, no response, 1 log line",
        f"{'aborted' if ended else 'open'}, "
        f"{'a response' if answered else 'no response'}, {logged} log line(s)",
    )
    assert elapsed < 5, elapsed
    assert str(ds.SOPInstanceUID) not in spooled_uids(node)


# -- corrupt and truncated streams --------------------------------------------------------
def _corrupt_middle(uid: str) -> bytes:
    body = bytearray(encoded(ct_slice_ds(rows=32, cols=32, uid=uid)))
    body[400:900] = np.random.default_rng(5).bytes(500)
    return bytes(body)


def _truncated_pixels(uid: str) -> bytes:
    body = encoded(ct_slice_ds(rows=32, cols=32, uid=uid))
    return body[: len(body) - 700]


def _cut_in_header(uid: str) -> bytes:
    body = encoded(ct_slice_ds(uid=uid))
    # end 3 bytes into the header of the element after (0008,0016) SOP Class UID
    ds = pydicom.dcmread(io.BytesIO(body), force=True)
    raw = ds.get_item(0x00080016)
    return body[: raw.value_tell + raw.length + 3]


def _jpeg(uid: str) -> Dataset:
    ds = _compressed(1, [b"\xff\xd8" + bytes(300) + b"\xff\xd9"])()
    ds.SOPInstanceUID = uid
    return ds


def _truncated_fragment(uid: str) -> bytes:
    return encoded(_jpeg(uid))[:-120]


def _overlong_fragment(uid: str) -> bytes:
    ds = _jpeg(uid)
    data = bytearray(ds.PixelData)
    data[12:16] = struct.pack("<L", 304 + 1000)  # the fragment item after an empty BOT
    ds.PixelData = bytes(data)
    return encoded(ds)


def _deflate_bomb(uid: str) -> bytes:
    """A data set of 8 MB (2048x2048 zero pixels) that deflates to some 8 KB."""
    ds = ct_slice_ds(uid=uid)
    ds.Rows = ds.Columns = 2048
    ds.PixelData = bytes(2048 * 2048 * 2)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(encoded(ds)) + deflater.flush()


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
        lambda uid: encoded(ct_slice_ds(uid=uid), implicit=True),
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
        lambda uid: encoded(ct_slice_ds(uid=uid)),
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
            encoded(ct_slice_ds(uid=uid))
            + struct.pack("<HH2sH", 0x7FE1, 0x0010, b"ZZ", 4)
            + b"abcd"
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
    return deflater.compress(encoded(ct_slice_ds(uid=uid))) + deflater.flush()


def _big_endian(uid: str) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return encode(ct_slice_ds(uid=uid), False, False)


def _with_element(uid: str, element: bytes) -> bytes:
    """A CT data set without Pixel Data, then ``element`` (bytes as they are)."""
    ds = ct_slice_ds(uid=uid)
    del ds.PixelData
    return encoded(ds) + element


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
    rsp = send_raw(node.port, ledger, tmp_path, body(uid), uid, syntax=syntax)
    ledger.check(case, f"{status} {comment}", f"{status_of(rsp, ledger, uid)} {comment_of(rsp)}")


def test_affected_uid_differs_from_the_data_set(node, ledger, served, tmp_path):
    ds = ct_slice_ds()
    rsp = send_raw(
        node.port, ledger, tmp_path, encoded(ds), generate_uid(), data_uid=ds.SOPInstanceUID
    )
    ledger.check(
        "Affected SOP Instance UID differs from the data set's",
        "0xA900 SOP Instance UID in the data set differs",
        f"{status_of(rsp, ledger, ds.SOPInstanceUID)} {comment_of(rsp)}",
    )


_FORGED = "2026-01-01 00:00:00,000 INFO x: FORGED"  # within a UID's 64 characters


@pytest.mark.parametrize("where", ["Affected SOP Instance UID", "data set SOP Instance UID"])
def test_control_characters_do_not_forge_log_lines(node, ledger, served, tmp_path, where):
    ds = ct_slice_ds()
    evil = f"1.2.3\r\n{_FORGED}"
    if where == "Affected SOP Instance UID":
        rsp = send_raw(node.port, ledger, tmp_path, encoded(ds), evil, data_uid=ds.SOPInstanceUID)
    else:
        ds.SOPInstanceUID = evil
        rsp = send_raw(node.port, ledger, tmp_path, encoded(ds), evil)
    status = status_of(rsp, ledger, ds.SOPInstanceUID)
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


# -- the same SOP Instance UID twice ------------------------------------------------------
def test_same_uid_other_content_keeps_the_first(node, ledger, served):
    first = ct_slice_ds(z=0.0)
    second = copy.deepcopy(first)
    second.PixelData = np.zeros((16, 16), np.uint16).tobytes()
    with association(node.port) as assoc:
        a = status_of(assoc.send_c_store(first), ledger, first.SOPInstanceUID)
        rsp = assoc.send_c_store(second)
    b = f"{status_of(rsp, ledger, second.SOPInstanceUID)} {comment_of(rsp)}"
    ledger.check(
        "same SOP Instance UID, other pixels",
        "0x0000 then 0xC001 other content is already stored under",
        f"{a} then {b}",
    )
    kept = pydicom.dcmread(spooled_uids(node)[str(first.SOPInstanceUID)])
    assert kept.PixelData == first.PixelData


def test_same_uid_same_content_is_a_duplicate(node, ledger, served):
    ds = ct_slice_ds(z=0.0)
    with association(node.port) as assoc:
        statuses = [status_of(assoc.send_c_store(ds), ledger, ds.SOPInstanceUID) for _ in range(2)]
    count = job_of(node, ds.SeriesInstanceUID)["instance_count"]
    ledger.check(
        "same instance sent twice",
        "0x0000 0x0000, stored once",
        f"{' '.join(statuses)}, stored {'once' if count == 1 else count}",
    )
