"""The C-STORE data set checks, one by one, on data sets encoded and parsed as the SCP does.

Each refusal is a status and a reason the peer and the log see; the SCP's answers to real
peers sending such data sets are in ``test_bad_input.py``.
"""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
)
from pynetdicom.dsutils import decode, encode

from dicom_node.intake.checks import (
    CANNOT_UNDERSTAND,
    DOES_NOT_MATCH_SOP_CLASS,
    SOP_CLASS_NOT_SUPPORTED,
    TOO_LARGE,
    StoreRefused,
    check_encapsulated,
    check_identity,
    check_image,
    check_inflated_size,
    check_sop_class,
    check_well_formed,
    expected_pixel_bytes,
    is_deferred,
    value_length,
)
from dicom_node.intake.received import Received, decode_received, part10_header

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
MR = "1.2.840.10008.5.1.4.1.1.4"


def _ct(syntax: UID = ExplicitVRLittleEndian, **values: object) -> Dataset:
    """A small, valid CT image data set (4x4, 16 bits)."""
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PixelSpacing = [0.5, 0.5]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = bytes(32)
    for keyword, value in values.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _encoded(ds: Dataset, syntax: UID = ExplicitVRLittleEndian) -> bytes:
    data = encode(ds, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    assert data is not None
    return data


def _refused(call, *args) -> StoreRefused:
    with pytest.raises(StoreRefused) as info:
        call(*args)
    return info.value


# -- SOP class, size -------------------------------------------------------------------
def test_only_ct_classes_are_stored():
    check_sop_class(CT)
    check_sop_class(ENHANCED_CT)
    refused = _refused(check_sop_class, MR)
    assert refused.status == SOP_CLASS_NOT_SUPPORTED == 0x0122
    assert refused.reason == f"SOP class {MR} is not a CT image"


def test_a_deflate_bomb_is_refused_before_it_is_inflated_whole():
    bomb = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = bomb.compress(bytes(8 * 1024 * 1024)) + bomb.flush()
    assert len(deflated) < 16 * 1024
    refused = _refused(check_inflated_size, deflated, 4 * 1024 * 1024)
    assert refused.status == TOO_LARGE == 0xA702
    assert refused.reason == f"deflated data set inflates past {4 * 1024 * 1024} bytes"
    # fed a piece at a time, as a data set spilled to a file is read
    pieces = iter([deflated[:100], deflated[100:]])
    assert _refused(check_inflated_size, pieces, 4 * 1024 * 1024).status == TOO_LARGE
    check_inflated_size(deflated, 8 * 1024 * 1024)  # exactly the limit: accepted
    check_inflated_size(b"\xff" * 64, 10)  # not deflate: left to the parse


# -- encoding ------------------------------------------------------------------------------
def test_a_whole_data_set_parses_and_passes():
    data = _encoded(_ct())
    ds = decode_received(Received(size=len(data), data=data), ExplicitVRLittleEndian)
    assert ds.SOPInstanceUID == "1.2.3.4.5"
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    check_image(ds, 4)


def test_a_data_set_cut_inside_a_value_is_refused():
    data = _encoded(_ct())[:-10]  # Pixel Data declares 32 bytes, 22 arrive
    ds = decode(io.BytesIO(data), False, True)
    refused = _refused(check_well_formed, ds, len(data))
    assert refused.status == CANNOT_UNDERSTAND == 0xC000
    assert refused.reason == "data set ends inside element (7FE0,0010) (22 of 32 bytes)"
    # the same through the parse the SCP runs
    received = Received(size=len(data), data=data)
    assert _refused(decode_received, received, ExplicitVRLittleEndian).reason == refused.reason


def test_bytes_after_the_last_element_are_refused():
    data = _encoded(_ct()) + b"\x01\x02\x03"
    refused = _refused(decode_received, Received(size=len(data), data=data), ExplicitVRLittleEndian)
    assert refused.status == CANNOT_UNDERSTAND
    assert refused.reason == "3 byte(s) after element (7FE0,0010) cannot be parsed"


def test_garbage_is_refused_as_holding_no_element():
    data = b"\xff" * 7
    refused = _refused(decode_received, Received(size=len(data), data=data), ExplicitVRLittleEndian)
    assert refused.status == CANNOT_UNDERSTAND
    assert refused.reason == "the data set holds no readable element (truncated, or not DICOM)"


def test_a_data_set_in_the_other_vr_encoding_is_refused():
    data = _encoded(_ct(), ExplicitVRLittleEndian)
    received = Received(size=len(data), data=data)
    refused = _refused(decode_received, received, ImplicitVRLittleEndian)
    assert refused.status == CANNOT_UNDERSTAND
    assert (
        refused.reason
        == "data set is in explicit VR, not in the negotiated Implicit VR Little Endian"
    )


def test_a_deflated_data_set_is_checked_on_its_values():
    data = _encoded(_ct(DeflatedExplicitVRLittleEndian), DeflatedExplicitVRLittleEndian)
    ds = decode_received(Received(size=len(data), data=data), DeflatedExplicitVRLittleEndian)
    assert ds.PixelData == bytes(32)


# -- identity ------------------------------------------------------------------------------
def test_identity_is_the_three_uids_checked():
    ds = _ct()
    assert check_identity(ds, CT, "1.2.3.4.5") == ("1.2.3.4.5", "1.2.3.4", "1.2.3")
    assert check_identity(ds, CT, "") == ("1.2.3.4.5", "1.2.3.4", "1.2.3")  # none requested

    refused = _refused(check_identity, _ct(SeriesInstanceUID="1.2.x"), CT, "")
    assert refused.status == DOES_NOT_MATCH_SOP_CLASS == 0xA900
    assert "Series Instance UID" in refused.reason and "1.2.x" in refused.reason
    assert "SOP Instance UID" in _refused(check_identity, _ct(SOPInstanceUID=None), CT, "").reason

    refused = _refused(check_identity, ds, ENHANCED_CT, "")
    assert refused.reason == (
        f"SOP Class UID {CT} does not match the presentation context's {ENHANCED_CT}"
    )
    refused = _refused(check_identity, ds, CT, "1.2.3.4.6")
    assert refused.reason == "SOP Instance UID in the data set differs from the C-STORE request's"


# -- image -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "values, status, reason",
    [
        ({"PixelData": None}, 0xA900, "a CT image without Pixel Data"),
        ({"Rows": None}, 0xA900, "Rows or Columns missing"),
        ({"Columns": 5000}, 0xA900, "image size 4x5000 is outside 1..1024"),
        ({"Rows": 0}, 0xA900, "image size 0x4 is outside 1..1024"),
        ({"Modality": "MR"}, 0xA900, "modality MR in a CT image"),
        ({"BitsAllocated": 8}, 0xA900, "BitsAllocated 8 is not 16, as a CT image requires"),
        ({"RescaleSlope": 0}, 0xA900, "RescaleSlope 0 maps every pixel to one value"),
        (
            {"PixelData": bytes(30)},
            0xC000,
            "Pixel Data holds 30 bytes, the image attributes declare 32",
        ),
    ],
)
def test_images_the_node_cannot_assemble_are_refused(values, status, reason):
    refused = _refused(check_image, _ct(**values), 1024)
    assert (refused.status, refused.reason) == (status, reason)


def _enhanced(frames: object, items: int) -> Dataset:
    ds = _ct(SOPClassUID=ENHANCED_CT, NumberOfFrames=frames, PixelData=bytes(32 * 2))
    ds.PerFrameFunctionalGroupsSequence = Sequence([Dataset() for _ in range(items)])
    return ds


def test_an_enhanced_ct_describes_each_frame_once():
    check_image(_enhanced(2, 2), 1024)
    refused = _refused(check_image, _enhanced(2, 1), 1024)
    assert refused.reason == "2 frames declared, 1 Per-Frame Functional Groups items present"
    refused = _refused(check_image, _enhanced(None, 2), 1024)
    assert refused.reason == "a multi-frame CT without a valid Number of Frames"
    assert refused.status == DOES_NOT_MATCH_SOP_CLASS


def _compressed(fragments: list[bytes], **values: object) -> Dataset:
    ds = _ct(JPEGLSLossless, **values)
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].is_undefined_length = True
    return ds


def test_encapsulated_pixel_data_holds_a_whole_fragment_per_frame():
    check_image(_compressed([b"\x01" * 10]), 1024)
    check_encapsulated(_compressed([b"\x01" * 10, b"\x02" * 8], NumberOfFrames=2))

    native = _ct(JPEGLSLossless)
    refused = _refused(check_encapsulated, native)
    assert refused.reason == (
        "Pixel Data is not encapsulated although JPEG-LS Lossless Image Compression is a "
        "compressed transfer syntax"
    )
    cut = _compressed([b"\x01" * 10])
    cut.PixelData = cut.PixelData[:-4]
    assert _refused(check_encapsulated, cut).reason == (
        "encapsulated Pixel Data ends inside a fragment"
    )
    only_table = _compressed([b"\x01" * 10])
    only_table.PixelData = only_table.PixelData[:8]  # the Basic Offset Table item alone
    assert _refused(check_encapsulated, only_table).reason == (
        "encapsulated Pixel Data holds no fragment"
    )
    refused = _refused(check_encapsulated, _compressed([b"\x01" * 10], NumberOfFrames=3))
    assert refused.reason == "3 frames declared, but Pixel Data holds only 1 fragment(s)"
    assert refused.status == CANNOT_UNDERSTAND
    not_a_number = _compressed([b"\x01" * 10])
    not_a_number[0x00280008] = RawDataElement(Tag(0x00280008), "IS", 2, b"x ", 0, False, True)
    refused = _refused(check_encapsulated, not_a_number)
    assert (refused.status, refused.reason) == (0xA900, "Number of Frames is not a number")


def test_expected_pixel_bytes_counts_frames_and_samples():
    assert expected_pixel_bytes(_ct()) == 32
    assert expected_pixel_bytes(_ct(NumberOfFrames=3)) == 96
    assert expected_pixel_bytes(_ct(BitsAllocated=None)) is None


def _spilled(tmp_path: Path, ds: Dataset) -> Received:
    """A data set as pynetdicom leaves a large one: in a file, behind its header."""
    header = part10_header(CT, "1.2.3.4.5", ExplicitVRLittleEndian)
    path = tmp_path / "incoming.part"
    path.write_bytes(header + _encoded(ds))
    size = os.path.getsize(path) - len(header)
    return Received(size=size, file=path, offset=len(header), meta=header)


def test_a_large_data_set_is_checked_where_it_lies(tmp_path: Path):
    """Parsed from its file, Pixel Data deferred: its length is checked without reading it."""
    whole = _ct(Rows=1024, Columns=1024, PixelData=bytes(1024 * 1024 * 2))  # 2 MB
    parsed = decode_received(_spilled(tmp_path, whole), ExplicitVRLittleEndian)
    assert is_deferred(parsed, "PixelData")  # over the 1 MB kept in memory
    assert value_length(parsed, "PixelData") == 1024 * 1024 * 2
    check_image(parsed, 1024)
    assert is_deferred(parsed, "PixelData")  # checked, still in the file

    short = _ct(Rows=1024, Columns=1024, PixelData=bytes(1024 * 1024 * 3 // 2))
    parsed = decode_received(_spilled(tmp_path, short), ExplicitVRLittleEndian)
    refused = _refused(check_image, parsed, 1024)
    assert (refused.status, refused.reason) == (
        CANNOT_UNDERSTAND,
        "Pixel Data holds 1572864 bytes, the image attributes declare 2097152",
    )
