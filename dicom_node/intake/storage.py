"""What a C-STORE does with its data set, between receiving it and answering.

:meth:`InstanceStorage.store` takes the received data set and the request's negotiated
values and either returns a :class:`StoreOutcome` (the instance is in the spool, fsynced,
and its row queued for the job database) or raises
:class:`~dicom_node.intake.checks.StoreRefused`: limits first (size, free disk, a deflate
bomb), then the parse and the identity checks of :mod:`dicom_node.intake.checks`, then,
under a per-UID lock, the duplicate rule (the same content again is a success and stores
nothing; other content under a stored SOP Instance UID is refused), the series limit, the
image checks while the file is written and synced, and the database row. An ``OSError``
(the disk) or ``sqlite3.Error`` (the database, read for the duplicate rule and the series
limit) propagates: nothing was acknowledged and the SCP answers 0xA700.

The row is written behind (:meth:`InstanceRepository.record
<dicom_node.state.instances.InstanceRepository.record>`): the spool is the source of truth,
the file is synced before the answer, and the rows of several C-STOREs are committed in one
transaction off the answer's way. Every other reader of the database commits them first,
and the duplicate rule and the series limit count the rows still queued. The data set's
digest, which only the duplicate rule needs, is computed when a second C-STORE of the same
SOP Instance UID arrives, not for every instance.

It knows no pynetdicom events or associations: :mod:`dicom_node.intake.scp` hands it plain
values.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicom_node.config import Settings
from dicom_node.intake.checks import (
    OUT_OF_RESOURCES,
    SUCCESS,
    TOO_LARGE,
    TOO_MANY_INSTANCES,
    UID_CONFLICT,
    StoreRefused,
    check_identity,
    check_image,
    check_inflated_size,
)
from dicom_node.intake.geometry import slice_geometry
from dicom_node.intake.received import Received, decode_received, part10_header
from dicom_node.intake.spool import Spool, dataset_digest
from dicom_node.state import JobDatabase, NewInstance, SeriesState, StoredInstance

# The SCP's logger: these lines are part of what a C-STORE logs.
log = logging.getLogger("dicom_node.intake.scp")

#: Attributes that must agree for two encodings of one SOP Instance UID to be "the same".
_IDENTITY_KEYWORDS = (
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "RescaleSlope",
    "RescaleIntercept",
    "InstanceNumber",
)


@dataclass
class StoreOutcome:
    """What happened to one C-STORE; passed to observers (metrics, the streaming
    assembler, tests).

    For a new instance, ``path`` is its spool file, ``size`` that file's size, ``meta`` the
    Part 10 header written at its start and ``dataset`` the data set the handler parsed
    (with its transfer syntax in ``file_meta``): an observer that decodes the pixels off the
    acknowledgement path need not read the file. Observers run before the response is sent,
    so they only hand work on.

    Every instance stored (new or a duplicate, held in memory or spilled) names its study,
    SOP class and patient (:meth:`patient`), for the audit trail; ``association`` is set by
    the SCP to the key of the association that carried it.
    """

    status: int
    series_uid: str = ""
    sop_uid: str = ""
    new: bool = False
    reason: str = ""
    path: str = ""
    dataset: Dataset | None = field(default=None, repr=False)
    study_uid: str = ""
    sop_class: str = ""
    patient_id: str = field(default="", repr=False)
    patient_name: str = field(default="", repr=False)
    association: int = 0
    meta: bytes = field(default=b"", repr=False)
    size: int = 0
    #: The data set :meth:`patient` reads the patient from, the first time it is asked: a
    #: Person Name costs pydicom a tenth of a millisecond to decode, on the C-STORE's way,
    #: for an audit trail that is off by default.
    subject: Dataset | None = field(default=None, repr=False)

    def patient(self) -> tuple[str, str]:
        """The instance's Patient ID and Patient's Name ("" where it has none)."""
        if self.subject is not None:
            self.patient_id = str(self.subject.get("PatientID", "") or "")
            self.patient_name = str(self.subject.get("PatientName", "") or "")
            self.subject = None
        return self.patient_id, self.patient_name


class _Subject(TypedDict):
    """The :class:`StoreOutcome` fields an audit message reads (the patient on demand)."""

    study_uid: str
    sop_class: str
    subject: Dataset


def _subject(ds: Dataset, study_uid: str, sop_class: str) -> _Subject:
    """What an instance's audit message names: its study, SOP class and patient."""
    return {"study_uid": study_uid, "sop_class": str(sop_class), "subject": ds}


def same_image(stored_path: str, ds: Dataset) -> bool:
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


class InstanceStorage:
    """Validates, writes durably and records received instances.

    Parameters
    ----------
    settings:
        The node's typed settings (limits, ``log_patient_identifiers``).
    spool, jobs:
        Where instances are written and recorded.
    """

    def __init__(self, settings: Settings, spool: Spool, jobs: JobDatabase) -> None:
        self.settings = settings
        self.spool = spool
        self.jobs = jobs
        self._locks = [threading.Lock() for _ in range(64)]
        #: "patient NAME (ID)" of instances whose row is queued, for the log line of a
        #: series' first instance (only with ``log_patient_identifiers``).
        self._patients: dict[str, str] = {}
        jobs.instances.on_recorded = self._recorded

    def close(self) -> None:
        """Commit the rows still written behind."""
        self.jobs.instances.close()

    def store(
        self,
        received: Received,
        sop_class: str,
        syntax: UID,
        affected_uid: str,
        calling_ae: str,
    ) -> StoreOutcome:
        """Validate, write durably and record one instance.

        ``sop_class`` and ``syntax`` are the presentation context's, ``affected_uid`` the
        request's Affected SOP Instance UID ("" when it has none), ``calling_ae`` the
        peer's AE title as recorded with the instance. A file the data set was written
        through to (``received.streamed``) is the spool file's, or removed.
        """
        try:
            return self._store(received, sop_class, syntax, affected_uid, calling_ae)
        finally:
            received.discard()

    def _store(
        self,
        received: Received,
        sop_class: str,
        syntax: UID,
        affected_uid: str,
        calling_ae: str,
    ) -> StoreOutcome:
        limits = self.settings.limits
        if received.size > limits.max_instance_bytes:
            raise StoreRefused(
                TOO_LARGE,
                f"instance of {received.size} bytes exceeds {limits.max_instance_bytes}",
            )
        # The instance must fit above the watermark, so a burst of large instances cannot
        # take the disk below it between two checks.
        if self.spool.free_bytes() - received.size < limits.min_free_disk_mb * 1024 * 1024:
            raise StoreRefused(
                OUT_OF_RESOURCES,
                f"free disk space is below the {limits.min_free_disk_mb} MB watermark",
            )
        if syntax == DeflatedExplicitVRLittleEndian:
            check_inflated_size(received.chunks(), limits.max_instance_bytes)
        ds = decode_received(received, syntax)
        sop_uid, series_uid, study_uid = check_identity(ds, sop_class, affected_uid)
        modality = str(ds.get("Modality", ""))
        # the UIDs checked above: the request's Affected UIDs, or the data set's in their place
        header = part10_header(sop_class, sop_uid, syntax)
        path = self.spool.path_for(study_uid, series_uid, sop_uid)
        with self._locks[hash(sop_uid) % len(self._locks)]:
            existing = self.jobs.instances.find(sop_uid)  # committed or queued
            if existing is not None:
                check_image(ds, limits.max_rows_columns)
                if not self._same_content(existing, received, ds):
                    raise StoreRefused(
                        UID_CONFLICT,
                        f"other content is already stored under SOP Instance UID {sop_uid}",
                    )
                return StoreOutcome(
                    SUCCESS, series_uid, sop_uid, new=False, **_subject(ds, study_uid, sop_class)
                )
            if self.jobs.instances.count(series_uid) >= limits.max_instances_per_series:
                raise StoreRefused(
                    TOO_MANY_INSTANCES,
                    f"series already holds {limits.max_instances_per_series} instances",
                )
            size, geometry = self._write_checked(path, header, received, ds)
            if self.settings.node.log_patient_identifiers:
                self._patients[sop_uid] = self._patient(ds)
            # durable now: the row may follow the answer (the spool is the source of truth)
            self.jobs.instances.record(
                NewInstance(
                    sop_uid=sop_uid,
                    sop_class=sop_class,
                    series_uid=series_uid,
                    study_uid=study_uid,
                    modality=modality,
                    calling_ae=calling_ae,
                    path=path,
                    size=size,
                    digest="",  # computed if a second C-STORE of this UID comes
                    geometry=geometry,
                )
            )
        # A data set parsed from its file (values deferred) is not handed on: the file has
        # moved, and decoding it whole is what its size forbids; its job reads the spool.
        keep = received.data is not None
        return StoreOutcome(
            SUCCESS,
            series_uid,
            sop_uid,
            new=True,
            path=str(path),
            dataset=ds if keep else None,
            meta=header if keep else b"",
            size=size,
            **_subject(ds, study_uid, sop_class),
        )

    def _same_content(self, existing: StoredInstance, received: Received, ds: Dataset) -> bool:
        """The duplicate rule: whether ``received`` is the stored instance ``existing``
        again (the same data set bytes, or the same image in another encoding)."""
        stored = existing.digest
        if not stored:  # not computed when it was stored: from its spool file, once
            try:
                stored = dataset_digest(Path(existing.path).read_bytes())
            except OSError:
                return False
            self.jobs.instances.set_digest(existing.sop_uid, stored)
        return received.digest() == stored or same_image(existing.path, ds)

    def _recorded(self, instance: NewInstance, previous: SeriesState | None) -> None:
        """A queued row committed: the series' state change, as the log tells it."""
        patient = self._patients.pop(instance.sop_uid, "")
        if previous is None:
            log.info("series %s: receiving (first instance)%s", instance.series_uid, patient)
        elif previous not in (SeriesState.RECEIVING, SeriesState.PROCESSING):
            log.info("series %s: receiving again (was %s)", instance.series_uid, previous)

    def _write_checked(
        self, path: Path, header: bytes, received: Received, ds: Dataset
    ) -> tuple[int, str]:
        """Check the image and write the instance durably; its size and geometry JSON.

        The checks come first, so a refused image is never written. The write and its
        ``fdatasync`` are this thread's own: they release the interpreter, and handing them
        to a thread of the spool's, to overlap the disk's wait with the checks, cost each
        C-STORE two wake-ups and two turns of the interpreter between threads, more than
        the overlap saved (four associations at once were a tenth slower for it, one no
        faster).
        """
        check_image(ds, self.settings.limits.max_rows_columns)
        geometry = slice_geometry(ds).to_json()
        return self._write(path, header, received), geometry

    def _write(self, path: Path, header: bytes, received: Received) -> int:
        """Put the received data set in the spool durably, behind ``header``; its size.

        A data set held in memory that was written through to a file as it arrived, behind
        exactly this header, is renamed into place and synced: its bytes are on their way
        to the disk already, and the answer waits for the last of them only (CT slices: 0.2
        to 0.3 ms, where writing and syncing the slice here took 0.6 to 0.75 ms). Otherwise
        it is written (one ``writev``, one ``fdatasync``). A large one is renamed into
        place if pynetdicom's file has exactly this header, else copied a piece at a time.
        """
        if received.data is not None:
            if received.streamed is not None and received.meta == header:
                size = self.spool.adopt(received.streamed, path)
                received.adopted()
                return size
            return self.spool.write(path, header, received.data)
        if received.file is not None and received.meta == header:
            return self.spool.adopt(received.file, path)
        assert received.file is not None
        return self.spool.copy_in(path, header, received.file, received.offset)

    def _patient(self, ds: Dataset) -> str:
        """ ", patient NAME (ID)" for a log line, only with ``log_patient_identifiers``.

        Logs are shipped, rotated and read by people who may see no patient data; by
        default the node names series by UID only.
        """
        if not self.settings.node.log_patient_identifiers:
            return ""
        return f", patient {ds.get('PatientName', '')} ({ds.get('PatientID', '')})"
