"""Streaming assembly: slices staged as they arrive (their headers kept, common slices read
from their spool files at assembly, others decoded) give the very volume the spool gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset

from dicom_node.series.assembly import StreamingAssembler
from dicom_node.series.volume import VolumeError, assemble_series
from dicom_node_testing.synthetic import write_ct_series


def _as_received(path: Path) -> pydicom.Dataset:
    """The data set as the C-STORE handler has it: no meta group but its transfer syntax."""
    ds = pydicom.dcmread(path)
    syntax = ds.file_meta.TransferSyntaxUID
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _stream(paths: list[Path], seed: int = 0) -> tuple[StreamingAssembler, list[Path]]:
    """Feed ``paths`` in a shuffled arrival order; return the assembler and that order."""
    arrival = list(paths)
    np.random.default_rng(seed).shuffle(arrival)
    assembler = StreamingAssembler()
    for p in arrival:
        assembler.feed("1.2.3", str(p), _as_received(p))
    return assembler, arrival


def _same_volume(a, b) -> None:
    assert a.array.dtype == b.array.dtype
    assert a.array.shape == b.array.shape
    assert a.array.tobytes() == b.array.tobytes()  # bit for bit
    assert np.array_equal(a.affine, b.affine)
    assert a.source_uids == b.source_uids
    assert a.frame_numbers == b.frame_numbers
    assert a.headers == b.headers
    assert [h.file_meta for h in a.headers] == [h.file_meta for h in b.headers]


def _synthetic(folder: Path, slope: float = 1.0) -> list[Path]:
    hu = np.random.default_rng(3).integers(-1024, 2000, (23, 48, 40)).astype(np.int16)
    paths = write_ct_series(hu, folder, spacing=(2.5, 0.8, 0.8), orientation=(0, 1, 0, 0, 0, -1))
    if slope != 1.0:
        for p in paths:
            ds = pydicom.dcmread(p)
            ds.RescaleSlope = slope
            ds.save_as(p)
    return paths


@pytest.mark.parametrize(
    "source", ["synthetic", "float", "lidc-chest/LIDC-IDRI-0001", "dcmqi-abdomen-3slice"]
)
@pytest.mark.parametrize("allocator", ["numpy", "shm"])
def test_streamed_volume_is_bit_identical_to_the_spool_assembly(
    tmp_path, data_dir, source, allocator
):
    from dicom_node.inference.triton.shm import allocate as shm_allocate

    if source == "synthetic":
        paths = _synthetic(tmp_path)
    elif source == "float":
        paths = _synthetic(tmp_path, slope=0.5)
    else:
        paths = sorted((data_dir / "ct" / source).rglob("*.dcm"))
    allocate = np.empty if allocator == "numpy" else shm_allocate
    assembler, arrival = _stream(paths)
    try:
        staged = assembler.take("1.2.3")
        if source != "float":  # native slices stay in their spool files until assembly
            assert assembler.staged_bytes == 0
        streamed = staged.assemble(arrival, 3, allocate)
        assert streamed is not None, staged.problem
        _same_volume(streamed, assemble_series(arrival, 3))
        if source == "float":
            assert streamed.array.dtype == np.float32
        assert assembler.staged_bytes == 0  # the staging memory is given back
    finally:
        assembler.close()


def test_streamed_series_that_is_not_a_volume_fails_with_the_same_reason(tmp_path):
    paths = _synthetic(tmp_path)
    del paths[7]
    assembler, arrival = _stream(paths, seed=1)
    try:
        with pytest.raises(VolumeError) as streamed:
            assembler.take("1.2.3").assemble(arrival, 3, np.empty)
        with pytest.raises(VolumeError) as spooled:
            assemble_series(arrival, 3)
        assert str(streamed.value) == str(spooled.value)
        assert "1 slice(s) missing" in str(streamed.value)
        assert assembler.staged_bytes == 0
    finally:
        assembler.close()


def test_staged_slices_that_differ_from_the_database_are_not_used(tmp_path):
    paths = _synthetic(tmp_path)
    assembler, arrival = _stream(paths[:-1], seed=2)  # one slice stored, never fed (restart)
    try:
        assert assembler.take("1.2.3").assemble(paths, 3, np.empty) is None
        assert assembler.staged_bytes == 0
        # one that would need float voxels after integer ones, all decoded as they arrive
        # (a trailing element after Pixel Data: not read from the spool file at assembly),
        # is read from the spool instead
        mixed = _synthetic(tmp_path / "mixed")
        for k, p in enumerate(mixed):
            ds = pydicom.dcmread(p)
            ds.DataSetTrailingPadding = b"\0\0"
            if k == 5:
                ds.RescaleSlope = 0.5
            ds.save_as(p)
        for p in mixed:
            assembler.feed("1.2.4", str(p), _as_received(p))
        staged = assembler.take("1.2.4")
        assert staged.assemble(mixed, 3, np.empty) is None
        assert "floating-point" in (staged.problem or "")
    finally:
        assembler.close()


def test_slices_read_at_assembly_and_slices_decoded_on_arrival_make_one_volume(tmp_path):
    paths = _synthetic(tmp_path)
    ds = pydicom.dcmread(paths[5])
    ds.RescaleSlope = 0.5  # decoded as it arrives, into float voxels; the rest read later
    ds.save_as(paths[5])
    assembler, arrival = _stream(paths, seed=4)
    try:
        streamed = assembler.take("1.2.3").assemble(arrival, 3, np.empty)
        assert streamed is not None
        assert streamed.array.dtype == np.float32
        _same_volume(streamed, assemble_series(arrival, 3))
        assert assembler.staged_bytes == 0
    finally:
        assembler.close()


def test_a_slice_whose_file_changed_after_it_was_stored_sends_assembly_to_the_spool(tmp_path):
    paths = _synthetic(tmp_path)
    assembler, arrival = _stream(paths, seed=5)
    try:
        with open(paths[3], "r+b") as f:  # cut inside its Pixel Data
            f.truncate(paths[3].stat().st_size - 10)
        assert assembler.take("1.2.3").assemble(arrival, 3, np.empty) is None
        with pytest.raises(VolumeError):  # where the spool says why
            assemble_series(arrival, 3)
    finally:
        assembler.close()
