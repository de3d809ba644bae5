"""Decoding a slice while its series arrives gives pydicom's voxels, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from dicom_node.series.assembly import decode_into
from dicom_node.series.volume import decode_slice


def ct_slice(
    stored: np.ndarray,
    bits: int,
    signed: bool,
    intercept: float,
    slope: float = 1.0,
    syntax: str = ExplicitVRLittleEndian,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = stored.astype("<u2").tobytes()
    return ds


@pytest.mark.parametrize("bits", [12, 13, 15, 16])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("intercept", [-1024, 0, -3000, 100])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_fast_decode_is_pydicom_s(bits, signed, intercept, syntax):
    rng = np.random.default_rng([bits, int(signed), intercept + 5000])
    # every 16-bit pattern, high bits beyond Bits Stored included
    stored = rng.integers(0, 2**16, size=(64, 48), dtype=np.uint32)
    ds = ct_slice(stored, bits, signed, intercept, syntax=syntax)
    expected = np.empty(stored.shape, np.int16)
    expected[...] = decode_slice(ds)
    got = np.full(stored.shape, 12345, np.int16)
    decode_into(ds, got)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("slope", "syntax", "dtype"),
    [
        (2.5, ExplicitVRLittleEndian, np.float32),  # a real rescale: float voxels
        (1.0, ExplicitVRBigEndian, np.int16),  # byte order other than native
        (1.0, ExplicitVRLittleEndian, np.float32),  # a float volume
    ],
)
def test_other_slices_go_through_pydicom(slope, syntax, dtype):
    stored = np.arange(12, dtype=np.uint16).reshape(3, 4) * 100
    ds = ct_slice(stored, 12, False, -1024, slope=slope, syntax=syntax)
    if syntax == ExplicitVRBigEndian:
        ds.PixelData = stored.astype(">u2").tobytes()
    expected = np.empty(stored.shape, dtype)
    expected[...] = decode_slice(ds)
    got = np.empty(stored.shape, dtype)
    decode_into(ds, got)
    np.testing.assert_array_equal(got, expected)


def test_an_encapsulated_slice_is_not_read_as_native():
    ds = ct_slice(np.zeros((2, 2), np.uint16), 16, False, 0, syntax=RLELossless)
    ds.PixelData = b"\x00" * 8  # not RLE: pydicom's decoder must be the one to say so
    with pytest.raises(Exception):  # noqa: B017 - whichever error pydicom's decoder raises
        decode_into(ds, np.empty((2, 2), np.int16))
