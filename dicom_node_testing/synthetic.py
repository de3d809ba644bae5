"""Write synthetic CT series as DICOM files.

Tests, benchmarks and the demo model all need CT series that nobody else wrote: a phantom
with a known spleen, series with gaps or mixed sizes, a 512x512x200 series for timing.
This module turns a Hounsfield-unit array plus its geometry into a valid CT Image Storage
series (one file per slice), so that every consumer exercises the same code path a real
scanner's series takes.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)


@dataclass
class SeriesAttributes:
    """Patient, study and series attributes shared by every slice of a synthetic series."""

    patient_name: str = "Phantom^Abdomen"
    patient_id: str = "PHANTOM-0001"
    patient_birth_date: str = "19700101"
    patient_sex: str = "O"
    study_instance_uid: str = field(default_factory=generate_uid)
    series_instance_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    study_id: str = "1"
    accession_number: str = "ACC0001"
    series_number: int = 1
    series_description: str = "Synthetic abdomen CT"
    body_part_examined: str = "ABDOMEN"
    modality: str = "CT"
    manufacturer: str = "dicom-node phantom"
    referring_physician_name: str = "Ref^Doctor"
    study_date: str = field(default_factory=lambda: datetime.date.today().strftime("%Y%m%d"))


def ct_slice(
    hu: np.ndarray,
    position: Sequence[float],
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    slice_thickness: float,
    instance_number: int,
    attrs: SeriesAttributes,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """Build one CT Image Storage dataset whose stored values are ``hu + 1024``.

    ``hu`` is a 2D (rows, columns) array in Hounsfield units; ``position`` is the patient
    position (LPS, mm) of the first transmitted pixel and ``orientation`` the six direction
    cosines (row direction then column direction).
    """
    stored = np.clip(np.asarray(hu, dtype=np.int32) + 1024, 0, 4095).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid or generate_uid())
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyDate = attrs.study_date
    ds.SeriesDate = attrs.study_date
    ds.ContentDate = attrs.study_date
    ds.StudyTime = "120000"
    ds.SeriesTime = "120000"
    ds.ContentTime = "120000"
    ds.AccessionNumber = attrs.accession_number
    ds.Modality = attrs.modality
    ds.Manufacturer = attrs.manufacturer
    ds.ReferringPhysicianName = attrs.referring_physician_name
    ds.StudyDescription = "Synthetic study"
    ds.SeriesDescription = attrs.series_description
    ds.PatientName = attrs.patient_name
    ds.PatientID = attrs.patient_id
    ds.PatientBirthDate = attrs.patient_birth_date
    ds.PatientSex = attrs.patient_sex
    ds.BodyPartExamined = attrs.body_part_examined
    ds.SliceThickness = f"{slice_thickness:g}"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = attrs.study_instance_uid
    ds.SeriesInstanceUID = attrs.series_instance_uid
    ds.StudyID = attrs.study_id
    ds.SeriesNumber = attrs.series_number
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6g}" for v in orientation]
    ds.FrameOfReferenceUID = attrs.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{float(position[2]):.6g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.PixelData = stored.tobytes()
    return ds


def write_ct_series(
    hu: np.ndarray,
    out_dir: Path,
    spacing: Sequence[float] = (2.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    attrs: SeriesAttributes | None = None,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
) -> list[Path]:
    """Write ``hu`` (slices, rows, columns) as one CT file per slice into ``out_dir``.

    ``spacing`` is (slice, row, column) in mm; slices advance along the normal of
    ``orientation`` from ``origin``. Returns the paths in slice order.
    """
    attrs = attrs or SeriesAttributes()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    row_dir = np.asarray(orientation[:3], dtype=float)
    col_dir = np.asarray(orientation[3:], dtype=float)
    normal = np.cross(row_dir, col_dir)
    paths = []
    for k in range(hu.shape[0]):
        pos = np.asarray(origin, dtype=float) + k * float(spacing[0]) * normal
        ds = ct_slice(
            hu[k], pos, orientation, (spacing[1], spacing[2]), float(spacing[0]), k + 1, attrs
        )
        path = out_dir / f"{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
