"""Send files with C-STORE: the operator's ``storescu``, with a progress line.

One association for everything, a presentation context per (SOP class, transfer syntax)
found in the files, so no file is transcoded on the way.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pynetdicom import AE

from dicom_node.common.associations import TUNE_REQUESTED


@dataclass
class PushReport:
    sent: int = 0
    failed: int = 0
    skipped: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


def _files(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        out.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    return out


def push_paths(
    paths: Iterable[Path],
    ae_title: str,
    host: str,
    port: int,
    calling_ae: str = "DICOM_NODE_PUSH",
    progress: bool = True,
) -> PushReport:
    """C-STORE every DICOM file under ``paths``; files that are not DICOM are skipped."""
    report = PushReport()
    headers = {}
    for f in _files(paths):
        try:
            headers[f] = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not a DICOM file
            report.skipped += 1
    ae = AE(ae_title=calling_ae)
    contexts = {(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for h in headers.values()}
    for sop_class, ts in sorted(contexts)[:128]:
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate(host, port, ae_title=ae_title, evt_handlers=[TUNE_REQUESTED])
    if not assoc.is_established:
        raise ConnectionError(f"{ae_title}@{host}:{port} refused or cannot be reached")
    try:
        total = len(headers)
        for i, f in enumerate(headers, 1):
            status = assoc.send_c_store(f)
            code = int(status.Status) if status and "Status" in status else -1
            report.statuses[str(f)] = code
            if code in (0x0000, 0xB000, 0xB006, 0xB007):
                report.sent += 1
            else:
                report.failed += 1
            if progress:
                width = 30
                done = int(width * i / total)
                sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{total}")
                sys.stderr.flush()
        if progress:
            sys.stderr.write("\n")
    finally:
        if assoc.is_established:
            assoc.release()
    return report
