"""After a crash: the spool is the truth, and the job database is brought back in line.

An instance is acknowledged once its spool file is synced; its database row comes after. A
crash between the two leaves a whole file that the sender was told is stored: it is
registered. A crash mid-write leaves a partial file that was never acknowledged: it is moved
to ``quarantine/`` (received data is never deleted). So is a whole file that fails the
C-STORE's checks: the handler writes a data set while it checks its image attributes, and
removes the file of one it refuses, so a crash in between can leave one behind.
"""

from __future__ import annotations

import io
import logging

import pydicom
from pydicom.dataset import Dataset

from dicom_node.intake.checks import StoreRefused, check_identity, check_image
from dicom_node.intake.geometry import slice_geometry
from dicom_node.intake.spool import Spool, check_uid, dataset_digest
from dicom_node.state import NewInstance
from dicom_node.state.instances import InstanceRepository

__all__ = ["read_whole", "reconcile"]

log = logging.getLogger("dicom_node.intake.recovery")


def reconcile(spool: Spool, instances: InstanceRepository, max_rows_columns: int = 4096) -> int:
    """Register spooled files the database does not know; return how many.

    ``max_rows_columns`` is ``limits.max_rows_columns``, as the C-STORE checked it.
    """
    known = instances.known_paths()
    n = 0
    for path in spool.all_files():
        if str(path) in known:
            continue
        data = path.read_bytes()
        try:
            ds = read_whole(data)
            sop = check_uid(ds.SOPInstanceUID, "SOP Instance UID")
        except Exception as exc:  # noqa: BLE001 - an unreadable spool file is set aside
            moved = spool.quarantine(path, f"incomplete or unreadable: {exc}")
            log.warning(
                "spool file %s is incomplete (never acknowledged); moved to %s", path.name, moved
            )
            continue
        try:
            check_identity(ds, str(ds.get("SOPClassUID", "")), "")
            check_image(ds, max_rows_columns)
        except StoreRefused as exc:
            moved = spool.quarantine(path, f"refused (0x{exc.status:04X}): {exc.reason}")
            log.warning(
                "spool file %s fails the C-STORE checks (never acknowledged): %s; moved to %s",
                path.name,
                exc.reason,
                moved,
            )
            continue
        instances.add(
            NewInstance(
                sop_uid=sop,
                sop_class=str(ds.SOPClassUID),
                series_uid=str(ds.SeriesInstanceUID),
                study_uid=str(ds.StudyInstanceUID),
                modality=str(ds.get("Modality", "")),
                calling_ae=str(ds.file_meta.get("SourceApplicationEntityTitle", "")).strip(),
                path=path,
                size=len(data),
                digest=dataset_digest(data),
                received=path.stat().st_mtime,
                geometry=slice_geometry(ds).to_json(),
            )
        )
        n += 1
    return n


def read_whole(data: bytes) -> Dataset:
    """Parse an encoded instance completely, or raise if it is truncated.

    pydicom reads lazily and tolerates a short final element, so the pixel data length is
    checked against what the image attributes declare (native syntaxes); an encapsulated
    stream that ends early fails to parse.
    """
    ds = pydicom.dcmread(io.BytesIO(data))
    if "PixelData" in ds:
        pixels = ds.PixelData
        if not ds.file_meta.TransferSyntaxUID.is_compressed:
            expected = (
                int(ds.Rows)
                * int(ds.Columns)
                * int(ds.get("SamplesPerPixel", 1))
                * int(ds.get("NumberOfFrames", 1) or 1)
                * int(ds.BitsAllocated)
                // 8
            )
            if len(pixels) < expected:
                raise ValueError(f"Pixel Data holds {len(pixels)} of {expected} bytes")
    return ds
