"""The plug-in points end to end: a backend, an encoder and a transport each added through its
registry (one class and one registration each) and used by a real node for a pushed series.

The backend thresholds the CT (:mod:`dicom_node_testing.threshold`, no network), the encoder
adds a fourth object that names the SEG, and the transport keeps what it is sent in memory
and acknowledges it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicom_node.config import Destination, ResultSettings, settings_from_dict
from dicom_node.encode import EncodeContext, register, series_number, unregister
from dicom_node.export import transport
from dicom_node.export.transport import OnAck, Outcome, Outgoing, SegChoice
from dicom_node.inference import BACKENDS
from dicom_node.node import Node
from dicom_node.state import JobDatabase, OutboxState, SeriesState
from dicom_node_testing import threshold
from dicom_node_testing.phantom import make_phantom
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.peers import SPLEEN_BUNDLE, free_port, storescu, wait_for


class NoteEncoder:
    """A fourth result object: a one-line note that names the SEG it accompanies."""

    kind = "NOTE"
    requires: tuple[str, ...] = ("SEG",)
    references: tuple[str, ...] = ("SEG",)  # of the SEG, only its UID: built beside it
    first_series_number = 9004

    def enabled(self, settings: ResultSettings) -> bool:
        return True

    def build(self, context: EncodeContext, built: Mapping[str, Dataset]) -> Dataset:
        seg, first = built["SEG"], context.source.first
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = first.StudyInstanceUID
        ds.SeriesInstanceUID = generate_uid()
        ds.SeriesNumber = series_number(self.kind, context.model_index)
        ds.Modality = "OT"
        ds.ImageComments = f"segmented as {seg.SOPInstanceUID}"
        ds.DeviceSerialNumber = str(os.getpid())  # where it was built
        return ds


@dataclass(frozen=True)
class MemoryDestination(Destination):
    """A destination that keeps what it receives (``type = "memory"``)."""

    type: str = "memory"
    label: str = ""


class MemoryTransport:
    """Keeps each object it is sent in :data:`RECEIVED`, under the destination's label."""

    settings = MemoryDestination
    protocol = "memory"

    def __init__(self, settings, destination: MemoryDestination) -> None:
        self.destination = destination

    def send(self, items: list[Outgoing], choice: SegChoice, on_ack: OnAck) -> dict[int, Outcome]:
        out = {}
        for item in items:
            RECEIVED.setdefault(self.destination.label, []).append(pydicom.dcmread(item.path))
            out[item.key] = Outcome(True, 0)
            on_ack(item, out[item.key])
        return out


RECEIVED: dict[str, list[Dataset]] = {}


@pytest.fixture
def plugins(monkeypatch):
    monkeypatch.setitem(BACKENDS, "threshold", threshold.create_backends)
    monkeypatch.setitem(transport.TRANSPORTS, "memory", MemoryTransport)
    register(NoteEncoder())
    RECEIVED.clear()
    yield
    unregister("NOTE")


def test_a_backend_an_encoder_and_a_transport_added_through_their_registries(plugins, tmp_path):
    settings = settings_from_dict(
        {
            "node": {"data_dir": str(tmp_path / "var"), "host": "127.0.0.1", "port": free_port()},
            "limits": {"min_free_disk_mb": 1},
            "inference": {"backend": "threshold"},
            "models": [{"name": "spleen", "bundle": str(SPLEEN_BUNDLE)}],
            "destinations": [{"name": "archive", "type": "memory", "label": "archive"}],
            # its one label encoded in the encoder processes, as 104 organs would be: the
            # NOTE encoder, registered in the node alone, is built in a worker
            "results": {"encode_processes_min_labels": 1},
        }
    )
    node = Node(settings)
    node.start()
    try:
        phantom = make_phantom(shape=(12, 48, 48), spacing=(5.0, 7.0, 7.0), seed=9)
        attrs = SeriesAttributes()
        write_ct_series(phantom.hu, tmp_path / "ct", spacing=phantom.spacing, attrs=attrs)
        assert storescu(settings.node.port, tmp_path / "ct").returncode == 0
        uid = attrs.series_instance_uid
        wait_for(
            lambda: (r := node.jobs.series.get(uid)) is not None and r.state == SeriesState.DONE,
            60,
            "the series processed",
        )
        wait_for(
            lambda: [i.state for i in node.jobs.outbox.items(uid)] == [OutboxState.SENT] * 4,
            30,
            "every result acknowledged by the memory transport",
        )
    finally:
        node.stop()
    (model,) = _results(tmp_path, uid)
    assert model.kinds() == ["SEG", "RTSTRUCT", "SR", "NOTE"]
    received = {ds.Modality: ds for ds in RECEIVED["archive"]}
    assert set(received) == {"SEG", "RTSTRUCT", "SR", "OT"}
    assert received["OT"].ImageComments == f"segmented as {received['SEG'].SOPInstanceUID}"
    assert received["OT"].SeriesNumber == 9004
    assert received["OT"].DeviceSerialNumber != str(os.getpid())  # in an encoder process


def _results(tmp_path: Path, uid: str) -> list:
    """The series' results as the job database keeps them (read after the node stopped)."""
    jobs = JobDatabase(tmp_path / "var" / "jobs.sqlite")
    try:
        return list(jobs.series.get(uid).results)
    finally:
        jobs.close()
