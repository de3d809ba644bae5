"""Assemble a stored series into a 3D volume in patient coordinates.

highdicom does the geometry (``get_series_volume_positions``, ``get_volume_from_series``,
``Volume``): we only add the checks that turn "not a volume" into a reason a radiographer
can act on, and we keep the slice order of the source SOP Instance UIDs so that the SEG and
RTSTRUCT can reference exactly the images each frame lies on.

Array convention, used by every later stage: ``volume.array`` is (slices, rows, columns) and
``volume.affine`` maps (slice, row, column, 1) to LPS millimetres (highdicom's convention).

Why one module of this size: it is the one place that says what a CT volume is, the
highdicom geometry and every check that turns "not a volume" into a reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from dicom_node.common.heap import empty_volume
from dicom_node.common.standard_tables import remember_iod_lookups
from dicom_node.intake.checks import CT_SOP_CLASSES, MULTIFRAME_CT_SOP_CLASSES
from dicom_node.intake.plausibility import InvalidValue, check_image_values

#: Gantry tilt, or slices stepping off the normal, up to this many degrees is taken as none.
_TILT_TOLERANCE_DEG = 0.5


remember_iod_lookups()


class VolumeError(ValueError):
    """A series cannot be a volume; the message is the reason recorded on its job."""


@dataclass
class SeriesVolume:
    """A CT series as a volume, with what the encoders need to reference its sources.

    Attributes
    ----------
    volume:
        highdicom ``Volume``: ``array`` (slices, rows, columns) in Hounsfield units and
        ``affine`` mapping voxel indices to LPS mm in the series' Frame of Reference.
    source_uids:
        SOP Instance UID of the image each slice comes from, in slice order.
    frame_numbers:
        For multi-frame sources, the 1-based frame number of each slice; else ``None``.
    headers:
        The source datasets without Pixel Data, in slice order (one per instance for
        single-frame series, the one multi-frame dataset otherwise).
    """

    volume: hd.Volume | hd.VolumeGeometry
    source_uids: list[str]
    frame_numbers: list[int] | None
    headers: list[Dataset]
    #: The voxels when they live in device memory (see :func:`volume_from_plan`).
    device_pixels: Any = None

    @property
    def array(self) -> np.ndarray | Any:
        """The voxels: a numpy array, or the device volume the allocator gave."""
        if self.device_pixels is not None:
            return self.device_pixels
        if not isinstance(self.volume, hd.Volume):
            raise VolumeError("the voxels of this volume were released after inference")
        return self.volume.array

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns)."""
        return self.volume.spatial_shape

    def has_pixels(self) -> bool:
        """Whether the voxels are still here (not released after inference or handed over)."""
        return self.device_pixels is not None or isinstance(self.volume, hd.Volume)

    def release_pixels(self) -> None:
        """Keep only the geometry once inference is done.

        The encoders need the affine, the shape and the headers, not the voxels; dropping a
        300-slice CT's 150 MB before encoding keeps the node's peak memory near the size of
        one volume plus its label map.
        """
        if isinstance(self.volume, hd.Volume):
            self.volume = self.volume.get_geometry()
        if self.device_pixels is not None:
            self.device_pixels.release()
            self.device_pixels = None

    @property
    def affine(self) -> np.ndarray:
        return self.volume.affine

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(slice, row, column) spacing in mm."""
        return tuple(float(v) for v in self.volume.spacing)  # type: ignore[return-value]

    @property
    def first(self) -> Dataset:
        return self.headers[0]


def _header(ds: Dataset) -> Dataset:
    """A copy of ``ds`` without bulk data, small enough to keep for the encoders."""
    out = Dataset()
    out.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
    for elem in ds:
        if elem.tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):
            continue
        if elem.tag == 0x52009230:  # Per-frame Functional Groups: kept (multi-frame geometry)
            out.add(elem)
            continue
        out.add(elem)
    return out


def _check_common(datasets: Sequence[Dataset], min_slices: int) -> None:
    modalities = {str(ds.get("Modality", "")) for ds in datasets}
    if modalities != {"CT"}:
        raise VolumeError(f"modality is {', '.join(sorted(modalities)) or 'missing'}, not CT")
    for ds in datasets:
        if ds.get("SOPClassUID") not in CT_SOP_CLASSES:
            raise VolumeError(f"SOP class {ds.get('SOPClassUID')} is not a CT image")
    # Pixel and geometry sanity before anything is decoded or inferred: also for files
    # spooled before the C-STORE handler checked the same (dicom_node.intake.plausibility).
    for ds in datasets:
        try:
            check_image_values(ds)
        except InvalidValue as exc:
            raise VolumeError(f"instance {ds.get('SOPInstanceUID')}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - an unparsable value is a reason, not a crash
            raise VolumeError(
                f"instance {ds.get('SOPInstanceUID')}: unreadable value: {exc}"
            ) from None
    frames = {str(ds.get("FrameOfReferenceUID") or "") for ds in datasets}
    if "" in frames:
        raise VolumeError("an instance has no FrameOfReferenceUID")
    if len(frames) > 1:
        raise VolumeError(f"slices have {len(frames)} different FrameOfReferenceUID values")


def _single_frame_checks(datasets: Sequence[Dataset], min_slices: int) -> None:
    if len(datasets) < min_slices:
        raise VolumeError(f"only {len(datasets)} slice(s); at least {min_slices} are needed")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(sizes) > 1:
        raise VolumeError(
            "slices have mixed sizes: " + ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        )
    for ds in datasets:
        for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if kw not in ds or ds[kw].value in (None, ""):
                raise VolumeError(f"instance {ds.SOPInstanceUID} has no {kw}")
    orientations = {
        tuple(round(float(v), 4) for v in ds.ImageOrientationPatient) for ds in datasets
    }
    if len(orientations) > 1:
        raise VolumeError(f"slices have {len(orientations)} different orientations")
    spacings = {tuple(round(float(v), 4) for v in ds.PixelSpacing) for ds in datasets}
    if len(spacings) > 1:
        raise VolumeError("slices have different pixel spacings")
    tilts = {float(ds.get("GantryDetectorTilt", 0) or 0) for ds in datasets}
    tilt = max(abs(t) for t in tilts)
    orientation = np.array(next(iter(orientations)), dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    order = np.argsort(positions @ normal)
    positions = positions[order]
    if len(set(map(tuple, np.round(positions, 3)))) < len(positions):
        raise VolumeError("two or more slices share the same position")
    steps = np.diff(positions, axis=0)
    if len(steps):
        lengths = np.linalg.norm(steps, axis=1)
        cosines = np.abs(steps @ normal) / np.where(lengths > 0, lengths, 1)
        angle = float(np.degrees(np.arccos(np.clip(cosines.min(), -1, 1))))
        if tilt > _TILT_TOLERANCE_DEG or angle > _TILT_TOLERANCE_DEG:
            raise VolumeError(
                f"gantry tilt of {max(tilt, angle):.1f} degrees: slices are not stacked "
                "perpendicular to the image plane"
            )
        check_spacing(steps @ normal)


def check_spacing(distances: np.ndarray) -> None:
    """Raise :class:`VolumeError` unless sorted slices are evenly spaced.

    ``distances`` are the steps between consecutive slices along the slice normal, in
    position order. A step that is a whole multiple of the smallest one is reported as
    missing slices (a gap), any other unevenness as non-uniform spacing. The completion
    rule (:mod:`dicom_node.series.completion`) asks the same question of a series still arriving.
    """
    if not len(distances):
        return
    smallest = float(distances.min())
    if smallest <= 0:
        raise VolumeError("two or more slices share the same position")
    ratios = distances / smallest
    if float(ratios.max()) > 1.5 and np.allclose(ratios, np.round(ratios), atol=0.05):
        missing = int(np.round(ratios).sum() - len(ratios))
        raise VolumeError(
            f"{missing} slice(s) missing: gap of {float(distances.max()):.2f} mm in a "
            f"series spaced {smallest:.2f} mm"
        )
    if float(distances.max() - smallest) > max(0.01 * smallest, 0.01):
        raise VolumeError(
            f"non-uniform slice spacing: {smallest:.2f} to {float(distances.max()):.2f} mm"
        )


def pixel_dtype(datasets: Sequence[Dataset]) -> type:
    """int16 when every rescale maps integers to integers that fit, else float32.

    int16 halves the memory of a volume against float32 and is exactly what a CT stores.
    """
    for ds in datasets:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        bits = int(ds.get("BitsStored", 16))
        if slope != int(slope) or intercept != int(intercept) or slope != 1 or bits > 15:
            return np.float32
    return np.int16


#: Allocates a volume's array, ``(shape, dtype) -> array``: :func:`~dicom_node.common.heap.empty_volume` by default, or
#: memory an inference server reads in place (:class:`dicom_node.inference.triton.shm.SharedArray`).
Allocator = Callable[[tuple[int, int, int], type], np.ndarray]


@dataclass(frozen=True)
class SlicePlan:
    """Where each single-frame slice goes, decided from headers alone.

    ``order[slot]`` is the index, in the datasets the plan was made from, of the slice at
    ``slot``; ``shape`` is (slices, rows, columns) and ``dtype`` that of the voxels.
    """

    order: list[int]
    spacing: float
    dtype: type
    shape: tuple[int, int, int]


def plan_single_frame(datasets: Sequence[Dataset], min_slices: int = 3) -> SlicePlan:
    """Check that single-frame CT headers form a volume and plan its slice order.

    Raises :class:`VolumeError` with the reason a series is not a volume. The plan is the
    same whether the slices are then read from the spool (:func:`assemble_single_frame`)
    or were staged while they arrived (:mod:`dicom_node.series.assembly`).
    """
    _check_common(datasets, min_slices)
    _single_frame_checks(datasets, min_slices)
    spacing, positions = hd.spatial.get_series_volume_positions(datasets)
    if positions is None or spacing is None:
        raise VolumeError("slices do not form a regularly spaced volume")
    order = [positions.index(i) for i in range(len(datasets))]
    ordered = [datasets[k] for k in order]
    first = ordered[0]
    return SlicePlan(
        order=order,
        spacing=float(spacing),
        dtype=pixel_dtype(ordered),
        shape=(len(ordered), int(first.Rows), int(first.Columns)),
    )


def volume_from_plan(
    datasets: Sequence[Dataset],
    plan: SlicePlan,
    array: np.ndarray | Any,
    *,
    headers_only: bool = False,
) -> SeriesVolume:
    """The :class:`SeriesVolume` of ``array`` (filled in ``plan`` order) and its headers.

    ``headers_only`` says that ``datasets`` hold no pixel data any more and may be kept as
    the headers themselves: copying 200 headers element by element costs ~0.1 s, on the
    way from the last instance to the results.

    ``array`` is a numpy array, or a volume in device memory (an allocator's
    :class:`~dicom_node.inference.triton.cuda_shm.CudaVolume`): highdicom's ``Volume`` holds numpy
    arrays only, so that one is kept beside the volume's geometry.
    """
    ordered = [datasets[k] for k in plan.order]
    first = ordered[0]
    attributes = {
        "frame_of_reference_uid": first.FrameOfReferenceUID,
        "image_position": first.ImagePositionPatient,
        "image_orientation": first.ImageOrientationPatient,
        "pixel_spacing": first.PixelSpacing,
        "spacing_between_slices": plan.spacing,
        "coordinate_system": hd.spatial.get_image_coordinate_system(first),
    }
    device_pixels = None
    if isinstance(array, np.ndarray):
        volume: hd.Volume | hd.VolumeGeometry = hd.Volume.from_attributes(array=array, **attributes)
    else:
        slices, rows, columns = plan.shape
        volume = hd.VolumeGeometry.from_attributes(
            rows=rows, columns=columns, number_of_frames=slices, **attributes
        )
        device_pixels = array
    return SeriesVolume(
        volume=volume,
        source_uids=[str(ds.SOPInstanceUID) for ds in ordered],
        frame_numbers=None,
        headers=list(ordered) if headers_only else [_header(ds) for ds in ordered],
        device_pixels=device_pixels,
    )


def decode_slice(ds: Dataset) -> np.ndarray:
    """A slice's stored values through its modality LUT (Hounsfield units for CT).

    The caller assigns the result into an array of the plan's dtype: numpy's cast there is
    the one every path of the node uses, so that all give the same voxels.
    """
    return apply_modality_lut(ds.pixel_array, ds)


def assemble_single_frame(
    datasets: Sequence[Dataset],
    min_slices: int = 3,
    paths: Sequence[Path] | None = None,
    allocate: Allocator = empty_volume,
) -> SeriesVolume:
    """Assemble single-frame CT datasets into a :class:`SeriesVolume`.

    ``datasets`` may be headers read without pixel data when ``paths`` (same order) says
    where each file is: the slices are then decoded one at a time into the volume.
    highdicom's ``get_volume_from_series`` needs every dataset with its pixel data at once,
    and with its per-frame intermediates it peaked at several times the volume's size; here
    the geometry is still highdicom's (``get_series_volume_positions``,
    ``Volume.from_attributes``) and only the filling of the array is our own loop.
    ``allocate`` gives the array the slices are decoded into, so that a volume bound for a
    server on this host is written once, straight into the memory the server reads.
    """
    plan = plan_single_frame(datasets, min_slices)
    array = allocate(plan.shape, plan.dtype)
    for slot, k in enumerate(plan.order):
        ds = datasets[k]
        try:
            full = ds if paths is None or "PixelData" in ds else pydicom.dcmread(paths[k])
            array[slot] = decode_slice(full)
        except Exception as exc:  # noqa: BLE001 - decoders raise many types; a reason
            raise VolumeError(f"pixel data cannot be decoded: {exc}") from exc
    return volume_from_plan(datasets, plan, array)


def assemble_multiframe(ds: Dataset, min_slices: int = 3) -> SeriesVolume:
    """Assemble an Enhanced (or Legacy Converted Enhanced) CT from its frames."""
    _check_common([ds], min_slices)
    frames = int(ds.get("NumberOfFrames", 1))
    if frames < min_slices:
        raise VolumeError(f"only {frames} frame(s); at least {min_slices} are needed")
    try:
        image = hd.Image.from_dataset(ds, copy=False)
        volume = image.get_volume(dtype=pixel_dtype([ds]))
    except (ValueError, RuntimeError, KeyError, AttributeError, NotImplementedError) as exc:
        raise VolumeError(f"frames do not form a volume: {exc}") from exc
    if volume is None:
        raise VolumeError("frames do not form a regularly spaced volume")
    # highdicom sorts frames into the volume; recover which frame each slice came from
    # by matching each frame's position to the volume's slice positions.
    pffg = ds.PerFrameFunctionalGroupsSequence
    positions = np.array(
        [[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient] for f in pffg]
    )
    slice_pos = np.array(
        [volume.affine @ np.array([k, 0, 0, 1.0]) for k in range(volume.shape[0])]
    )[:, :3]
    frame_numbers = []
    for p in slice_pos:
        d = np.linalg.norm(positions - p, axis=1)
        frame_numbers.append(int(np.argmin(d)) + 1)
    return SeriesVolume(
        volume=volume,
        source_uids=[str(ds.SOPInstanceUID)] * volume.shape[0],
        frame_numbers=frame_numbers,
        headers=[_header(ds)],
    )


def assemble_series(
    paths: Sequence[Path], min_slices: int = 3, allocate: Allocator = empty_volume
) -> SeriesVolume:
    """Read the stored files of one series and assemble them (``allocate``: see
    :func:`assemble_single_frame`; a multi-frame instance is decoded by highdicom).

    Raises :class:`VolumeError` with a one-sentence reason for any series that is not a
    CT volume: too few slices, gaps, non-uniform spacing, mixed orientations or sizes,
    gantry tilt, another modality, or pixel data that cannot be decoded.
    """
    if not paths:
        raise VolumeError("the series has no instances")
    datasets = []
    for p in paths:
        try:  # headers only: slices are decoded one by one into the volume
            datasets.append(pydicom.dcmread(p, stop_before_pixels=True))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a reason, not a crash
            raise VolumeError(f"stored file {Path(p).name} cannot be read: {exc}") from exc
    multi = [ds for ds in datasets if ds.get("SOPClassUID") in MULTIFRAME_CT_SOP_CLASSES]
    if multi:
        if len(datasets) != 1:
            raise VolumeError(
                f"series mixes {len(multi)} multi-frame and {len(datasets) - len(multi)} "
                "other instances"
            )
        return assemble_multiframe(pydicom.dcmread(paths[0]), min_slices)
    return assemble_single_frame(datasets, min_slices, paths, allocate)
