"""The node's DICOM application entity: C-ECHO and C-STORE SCP.

Behaviour hangs on small pynetdicom event handlers. The C-STORE handler validates the
instance, writes it durably to the spool, records it in the job database and only then
answers; every refusal is a DIMSE status from PS3.4 Annex B with one log line saying why.
This module does no pixel math and knows nothing of models.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification

from dicom_node.config import Settings
from dicom_node.jobs import InstanceConflict, JobStore
from dicom_node.spool import InvalidUID, Spool, check_uid, dataset_digest
from dicom_node.volume import CT_SOP_CLASSES

log = logging.getLogger("dicom_node.scp")

#: Transfer syntaxes whose pixel data pydicom (with pylibjpeg, its plugins and pyjpegls)
#: decodes here. pynetdicom accepts, per context, the first of these the peer proposed, so
#: compressed syntaxes come first: the node then stores exactly the bytes the modality
#: encoded, and a sender that offers its file's own syntax never has to transcode.
TRANSFER_SYNTAXES = [
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
    HTJ2K,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,  # after the plain ones: inflating costs CPU for nothing
    ExplicitVRBigEndian,
]

# C-STORE statuses (PS3.4 Table B.2-1 and PS3.7 Annex C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (disk watermark)
TOO_MANY_INSTANCES = 0xA701  # Refused: Out of Resources (series limit)
TOO_LARGE = 0xA702  # Refused: Out of Resources (instance size limit)
DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand
UID_CONFLICT = 0xC001  # Error: Cannot understand (same SOP Instance UID, other content)
SOP_CLASS_NOT_SUPPORTED = 0x0122  # Refused: SOP Class not supported
PROCESSING_FAILURE = 0x0110

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason.
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
REASON_NO_REASON = 0x01
REASON_CALLING_AE = 0x03
REASON_CALLED_AE = 0x07


@dataclass
class StoreOutcome:
    """What happened to one C-STORE; passed to observers (metrics, tests)."""

    status: int
    series_uid: str = ""
    sop_uid: str = ""
    new: bool = False
    reason: str = ""


class StoreRefused(Exception):
    """An instance is refused; carries the DIMSE status and the reason logged."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _expected_pixel_bytes(ds: Dataset) -> int | None:
    """Bytes of native (uncompressed) Pixel Data the image attributes declare."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    return rows * cols * samples * frames * bits // 8


#: Attributes that must agree for two encodings of one SOP Instance UID to be "the same".
_IDENTITY_KEYWORDS = (
    "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "RescaleSlope",
    "RescaleIntercept", "InstanceNumber",
)


def _same_image(stored_path: str, ds: Dataset) -> bool:
    """Whether ``ds`` is the stored instance in another encoding.

    Only reached when the data set bytes differ (a peer re-sent in another transfer
    syntax): the decoded pixels and the identifying attributes decide. Lossy and lossless
    encodings of one image are not the same content.
    """
    try:
        stored = pydicom.dcmread(stored_path)
        if any(stored.get(k) != ds.get(k) for k in _IDENTITY_KEYWORDS):
            return False
        return bool(np.array_equal(stored.pixel_array, ds.pixel_array))
    except Exception:  # noqa: BLE001 - undecodable either side: not provably the same
        return False


class StorageSCP:
    """Validates, stores durably and records each received instance.

    Parameters
    ----------
    settings:
        The node's typed settings (AE title, limits, access control).
    spool, jobs:
        Where instances are written and recorded.
    on_stored:
        Called after each C-STORE with its :class:`StoreOutcome` (metrics, wake-ups).
    """

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        jobs: JobStore,
        on_stored: Callable[[StoreOutcome], None] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.jobs = jobs
        self.on_stored = on_stored
        self._locks = [threading.Lock() for _ in range(64)]
        self._server = None
        self.ae = self._make_ae()

    # -- application entity -----------------------------------------------------------
    def _make_ae(self) -> AE:
        node, limits = self.settings.node, self.settings.limits
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = limits.max_associations
        ae.acse_timeout = limits.acse_timeout
        ae.dimse_timeout = limits.dimse_timeout
        ae.network_timeout = limits.network_timeout
        ae.require_called_aet = node.require_called_ae
        ae.maximum_pdu_size = 0  # no limit: fewer, larger P-DATA PDUs from the peer
        ae.add_supported_context(Verification)
        for uid in CT_SOP_CLASSES:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        if node.unsupported_sop_class == "fail":
            for cx in StoragePresentationContexts:
                if cx.abstract_syntax not in CT_SOP_CLASSES:
                    ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        return ae

    def handlers(self) -> list[tuple]:
        return [
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_REQUESTED, self.handle_requested),
            (evt.EVT_ACCEPTED, self._log_assoc, ["accepted"]),
            (evt.EVT_RELEASED, self._log_assoc, ["released"]),
            (evt.EVT_ABORTED, self._log_assoc, ["aborted"]),
            (evt.EVT_REJECTED, self._log_assoc, ["rejected"]),
        ]

    def start(self) -> None:
        """Start serving on the configured address, in background threads."""
        node = self.settings.node
        self._server = self.ae.start_server(
            (node.host, node.port), block=False, evt_handlers=self.handlers()
        )
        log.info("listening as %s on %s:%d", node.ae_title, node.host, node.port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()

    # -- handlers ---------------------------------------------------------------------
    def _log_assoc(self, event: evt.Event, what: str) -> None:
        req = event.assoc.requestor
        log.info(
            "association %s: %s from %s:%s", what, req.ae_title, req.address, req.port
        )

    def handle_requested(self, event: evt.Event) -> None:
        """Access control before negotiation: calling AE title and source address."""
        node = self.settings.node
        assoc = event.assoc
        calling = assoc.requestor.primitive.calling_ae_title.strip()
        address = assoc.requestor.address
        if node.allowed_hosts and address not in node.allowed_hosts:
            log.warning("association refused: address %s is not allowed", address)
            assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_NO_REASON)
            assoc.is_rejected = True
            assoc.kill()
            return
        if node.allowed_calling_aes and calling not in node.allowed_calling_aes:
            log.warning("association refused: calling AE title %r is not allowed", calling)
            assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_CALLING_AE)
            assoc.is_rejected = True
            assoc.kill()

    def handle_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def handle_store(self, event: evt.Event) -> int | tuple[int, Dataset]:
        """Validate, write durably, record, answer."""
        try:
            outcome = self._store(event)
        except StoreRefused as exc:
            outcome = StoreOutcome(status=exc.status, reason=exc.reason)
            log.warning(
                "C-STORE refused (0x%04X) from %s: %s",
                exc.status,
                event.assoc.requestor.ae_title,
                exc.reason,
            )
        except OSError as exc:  # the disk said no: nothing was acknowledged
            outcome = StoreOutcome(status=OUT_OF_RESOURCES, reason=f"cannot write: {exc}")
            log.error("C-STORE refused (0xA700): cannot write the instance: %s", exc)
        if self.on_stored is not None:
            self.on_stored(outcome)
        if outcome.status != SUCCESS and outcome.reason:
            status = Dataset()
            status.Status = outcome.status
            status.ErrorComment = outcome.reason[:64]
            return status  # type: ignore[return-value]
        return outcome.status

    def _store(self, event: evt.Event) -> StoreOutcome:
        limits = self.settings.limits
        context_class = event.context.abstract_syntax
        if context_class not in CT_SOP_CLASSES:
            raise StoreRefused(
                SOP_CLASS_NOT_SUPPORTED, f"SOP class {context_class} is not a CT image"
            )
        if self.spool.free_bytes() < limits.min_free_disk_mb * 1024 * 1024:
            raise StoreRefused(
                OUT_OF_RESOURCES,
                f"free disk space is below the {limits.min_free_disk_mb} MB watermark",
            )
        data = event.request.DataSet.getvalue() if event.request.DataSet else b""
        if len(data) > limits.max_instance_bytes:
            raise StoreRefused(
                TOO_LARGE, f"instance of {len(data)} bytes exceeds {limits.max_instance_bytes}"
            )
        ds = self._decode(event)
        sop_uid, series_uid, study_uid = self._check_identity(event, ds)
        self._check_image(ds)
        modality = str(ds.get("Modality", ""))
        encoded = event.encoded_dataset(include_meta=True)
        digest = dataset_digest(encoded)
        path = self.spool.path_for(study_uid, series_uid, sop_uid)
        with self._locks[hash(sop_uid) % len(self._locks)]:
            existing = self.jobs.find_instance(sop_uid)
            if existing is not None:
                if existing["digest"] != digest and not _same_image(existing["path"], ds):
                    raise StoreRefused(
                        UID_CONFLICT,
                        f"SOP Instance UID {sop_uid} is already stored with other content",
                    )
                return StoreOutcome(SUCCESS, series_uid, sop_uid, new=False)
            if self.jobs.series_count(series_uid) >= limits.max_instances_per_series:
                raise StoreRefused(
                    TOO_MANY_INSTANCES,
                    f"series already holds {limits.max_instances_per_series} instances",
                )
            size, _ = self.spool.write(path, encoded)
            try:
                new, previous = self.jobs.add_instance(
                    sop_uid=sop_uid,
                    sop_class=context_class,
                    series_uid=series_uid,
                    study_uid=study_uid,
                    modality=modality,
                    calling_ae=event.assoc.requestor.ae_title.strip(),
                    path=path,
                    size=size,
                    digest=digest,
                )
            except InstanceConflict:  # pragma: no cover - guarded by the lock above
                raise StoreRefused(UID_CONFLICT, f"SOP Instance UID {sop_uid} conflict") from None
        if previous is None:
            log.info("series %s: receiving (first instance)", series_uid)
        elif previous not in ("receiving", "processing"):
            log.info("series %s: receiving again (was %s)", series_uid, previous)
        return StoreOutcome(SUCCESS, series_uid, sop_uid, new=new)

    def _decode(self, event: evt.Event) -> Dataset:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            # Touch the elements we rely on so that a truncated or corrupt stream fails
            # here, as a status, rather than later in a worker.
            for kw in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
                ds.get(kw)
            if "PixelData" in ds:
                ds["PixelData"].value  # noqa: B018 - forces the read of the last element
        except Exception as exc:  # noqa: BLE001 - any parse error is the peer's data
            raise StoreRefused(CANNOT_UNDERSTAND, f"dataset cannot be decoded: {exc}") from None
        return ds

    def _check_identity(self, event: evt.Event, ds: Dataset) -> tuple[str, str, str]:
        try:
            sop_uid = check_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
            series_uid = check_uid(ds.get("SeriesInstanceUID"), "Series Instance UID")
            study_uid = check_uid(ds.get("StudyInstanceUID"), "Study Instance UID")
        except InvalidUID as exc:
            raise StoreRefused(DOES_NOT_MATCH_SOP_CLASS, str(exc)) from None
        if str(ds.get("SOPClassUID", "")) != event.context.abstract_syntax:
            raise StoreRefused(
                DOES_NOT_MATCH_SOP_CLASS,
                f"SOP Class UID {ds.get('SOPClassUID')} does not match the presentation "
                f"context's {event.context.abstract_syntax}",
            )
        affected = str(event.request.AffectedSOPInstanceUID or "")
        if affected and affected != sop_uid:
            raise StoreRefused(
                DOES_NOT_MATCH_SOP_CLASS,
                "SOP Instance UID in the data set differs from the C-STORE request's",
            )
        return sop_uid, series_uid, study_uid

    def _check_image(self, ds: Dataset) -> None:
        limits = self.settings.limits
        if "PixelData" not in ds and "FloatPixelData" not in ds:
            raise StoreRefused(DOES_NOT_MATCH_SOP_CLASS, "a CT image without Pixel Data")
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
        except (AttributeError, TypeError, ValueError):
            raise StoreRefused(DOES_NOT_MATCH_SOP_CLASS, "Rows or Columns missing") from None
        if not (0 < rows <= limits.max_rows_columns and 0 < cols <= limits.max_rows_columns):
            raise StoreRefused(
                DOES_NOT_MATCH_SOP_CLASS,
                f"image size {rows}x{cols} is outside 1..{limits.max_rows_columns}",
            )
        if str(ds.get("Modality", "CT")) != "CT":
            raise StoreRefused(
                DOES_NOT_MATCH_SOP_CLASS, f"modality {ds.get('Modality')} in a CT image"
            )
        if not ds.file_meta.TransferSyntaxUID.is_compressed:
            expected = _expected_pixel_bytes(ds)
            actual = len(ds.PixelData)
            if expected is not None and actual < expected:
                raise StoreRefused(
                    CANNOT_UNDERSTAND,
                    f"Pixel Data holds {actual} bytes, the image attributes declare {expected}",
                )


def read_header(data: bytes) -> Dataset:
    """Parse the header of an encoded instance (used when re-indexing the spool)."""
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
