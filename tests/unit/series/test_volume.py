"""Volume assembly: real series assemble with the right geometry; bad ones fail with a reason."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from dicom_node.series.volume import VolumeError, assemble_series
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series


def _series(tmp_path, n=8, shape=(32, 32), spacing=(2.5, 0.8, 0.8), seed=0, **kw):
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1000, 1500, size=(n, *shape)).astype(np.int16)
    return hu, write_ct_series(hu, tmp_path, spacing=spacing, **kw)


def test_real_chest_series_assembles_in_patient_coordinates(data_dir):
    paths = sorted((data_dir / "ct" / "lidc-chest" / "LIDC-IDRI-0001").rglob("*.dcm"))
    vol = assemble_series(paths)
    assert vol.array.shape == (16, 512, 512)
    assert vol.spacing == pytest.approx((2.5, 0.703125, 0.703125))
    # each slice's position equals its source file's Image Position (Patient)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, paths)}
    for k, uid in enumerate(vol.source_uids):
        pos = vol.affine @ np.array([k, 0, 0, 1.0])
        assert np.allclose(pos[:3], [float(v) for v in by_uid[uid].ImagePositionPatient], atol=1e-3)
        ref = by_uid[uid].pixel_array * float(by_uid[uid].RescaleSlope) + float(
            by_uid[uid].RescaleIntercept
        )
        assert np.array_equal(vol.array[k], ref)
    assert len(vol.headers) == 16 and "PixelData" not in vol.headers[0]


def test_synthetic_series_round_trips_hu(tmp_path):
    hu, paths = _series(tmp_path, spacing=(3.0, 0.7, 0.9), origin=(-100, -50, 20))
    vol = assemble_series(paths)
    assert vol.array.dtype == np.int16
    # highdicom orders slices right-handed; whichever order, the slice at each position holds
    # the HU written there
    for k in range(len(paths)):
        z = (vol.affine @ np.array([k, 0, 0, 1.0]))[2]
        written = int(round((z - 20) / 3.0))
        assert np.array_equal(vol.array[k], hu[written])
    assert np.allclose(np.linalg.norm(vol.affine[:3, :3], axis=0), [3.0, 0.7, 0.9])


def test_volume_assembles_into_the_memory_it_is_given(tmp_path):
    hu, paths = _series(tmp_path)
    given = []

    def allocate(shape, dtype):
        given.append(np.full(shape, 12345, dtype))
        return given[-1]

    vol = assemble_series(paths, allocate=allocate)
    assert vol.array is given[0]
    assert sorted(vol.array.ravel().tolist()) == sorted(hu.ravel().tolist())


def test_released_volume_keeps_its_geometry(tmp_path):
    _, paths = _series(tmp_path)
    vol = assemble_series(paths)
    affine, shape = vol.affine.copy(), vol.array.shape
    vol.release_pixels()
    assert vol.shape == shape and np.array_equal(vol.affine, affine)
    assert len(vol.headers) == len(paths)
    with pytest.raises(VolumeError, match="released"):
        vol.array  # noqa: B018


class DeviceVolume:
    """Stands for memory outside numpy that an allocator may give (GPU memory: a
    ``CudaVolume``, which needs a GPU): written slice by slice, released explicitly."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.slices = {}
        self.released = False

    def __setitem__(self, index, value):
        assert type(index) is int  # the CUDA volume takes whole slices by Python int
        self.slices[index] = np.asarray(value, self.dtype).copy()

    def release(self):
        self.released = True


def test_volume_assembles_into_device_memory_beside_its_geometry(tmp_path):
    hu, paths = _series(tmp_path)
    reference = assemble_series(paths)
    device = []
    vol = assemble_series(
        paths, allocate=lambda s, d: device.append(DeviceVolume(s, d)) or device[-1]
    )
    assert vol.array is device[0]
    assert sorted(device[0].slices) == list(range(len(paths)))
    assert np.array_equal(
        np.stack([device[0].slices[k] for k in range(len(paths))]), reference.array
    )
    assert np.array_equal(vol.affine, reference.affine) and vol.shape == reference.shape
    vol.release_pixels()
    assert device[0].released and vol.shape == reference.shape
    with pytest.raises(VolumeError, match="released"):
        vol.array  # noqa: B018


def test_gantry_tilt_fails_with_reason(data_dir):
    paths = sorted((data_dir / "ct" / "ge-head-gantry-tilt").glob("*.dcm"))
    with pytest.raises(VolumeError, match="gantry tilt of 18.5 degrees"):
        assemble_series(paths)


def test_gap_is_reported_as_missing_slices(tmp_path):
    _, paths = _series(tmp_path, n=10)
    with pytest.raises(VolumeError, match=r"2 slice\(s\) missing"):
        assemble_series(paths[:4] + paths[6:])


def test_non_uniform_spacing(tmp_path):
    _, a = _series(tmp_path / "a", n=4, spacing=(2.0, 1, 1))
    attrs = SeriesAttributes()
    hu = np.zeros((6, 32, 32), np.int16)
    p1 = write_ct_series(hu[:3], tmp_path / "b1", spacing=(2.0, 1, 1), attrs=attrs)
    p2 = write_ct_series(
        hu[3:], tmp_path / "b2", spacing=(3.1, 1, 1), attrs=attrs, origin=(0, 0, 4.0 + 3.1)
    )
    for p in p2:  # keep SOP UIDs unique, instance numbers distinct
        ds = pydicom.dcmread(p)
        ds.InstanceNumber += 3
        ds.save_as(p)
    with pytest.raises(VolumeError, match="non-uniform slice spacing"):
        assemble_series(p1 + p2)


def test_mixed_sizes(tmp_path):
    attrs = SeriesAttributes()
    p1 = write_ct_series(np.zeros((3, 32, 32), np.int16), tmp_path / "a", attrs=attrs)
    p2 = write_ct_series(
        np.zeros((3, 64, 64), np.int16), tmp_path / "b", attrs=attrs, origin=(0, 0, 6.0)
    )
    with pytest.raises(VolumeError, match="mixed sizes: 32x32, 64x64"):
        assemble_series(p1 + p2)


def test_mixed_orientations(tmp_path):
    attrs = SeriesAttributes()
    p1 = write_ct_series(np.zeros((3, 32, 32), np.int16), tmp_path / "a", attrs=attrs)
    p2 = write_ct_series(
        np.zeros((3, 32, 32), np.int16),
        tmp_path / "b",
        attrs=attrs,
        orientation=(1, 0, 0, 0, 0, -1),
        origin=(0, 50, 0),
    )
    with pytest.raises(VolumeError, match="2 different orientations"):
        assemble_series(p1 + p2)


def test_duplicate_positions(tmp_path):
    attrs = SeriesAttributes()
    p1 = write_ct_series(np.zeros((3, 32, 32), np.int16), tmp_path / "a", attrs=attrs)
    p2 = write_ct_series(np.ones((3, 32, 32), np.int16), tmp_path / "b", attrs=attrs)
    with pytest.raises(VolumeError, match="share the same position"):
        assemble_series(p1 + p2)


def test_too_few_slices_and_non_ct(tmp_path):
    _, paths = _series(tmp_path / "a", n=2)
    with pytest.raises(VolumeError, match=r"only 2 slice\(s\); at least 3"):
        assemble_series(paths)
    _, paths = _series(tmp_path / "b", n=4, attrs=SeriesAttributes(modality="MR"))
    with pytest.raises(VolumeError, match="modality is MR, not CT"):
        assemble_series(paths)


def test_undecodable_pixel_data(tmp_path):
    _, paths = _series(tmp_path, n=4)
    ds = pydicom.dcmread(paths[1])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(paths[1])
    with pytest.raises(VolumeError, match="pixel data cannot be decoded"):
        assemble_series(paths)


def test_enhanced_ct_is_assembled_from_its_frames(data_dir):
    path = data_dir / "enhanced-ct" / "eCT_Supplemental.dcm"
    vol = assemble_series([path], min_slices=2)
    assert vol.array.shape == (2, 512, 512)
    assert sorted(vol.frame_numbers) == [1, 2]
    ds = pydicom.dcmread(path)
    assert set(vol.source_uids) == {str(ds.SOPInstanceUID)}
    for k, frame in enumerate(vol.frame_numbers):
        pos = ds.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSequence[0]
        assert np.allclose(
            (vol.affine @ [k, 0, 0, 1])[:3], [float(v) for v in pos.ImagePositionPatient], atol=1e-3
        )
    with pytest.raises(VolumeError, match=r"only 2 frame\(s\)"):
        assemble_series([path], min_slices=3)
