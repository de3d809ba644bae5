"""Results built in worker processes: the same objects the node's own process makes, each SR
naming the SEG of its own request, errors that reach the caller, encoders that cannot go to
a worker built here, and a worker that dies costing no result."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.common.pids import runs
from dicom_node.config import ResultSettings
from dicom_node.encode import (
    AlgorithmInfo,
    EncodeContext,
    EncodeError,
    encoders,
    processes,
    register,
    requiring,
    segment_info_for,
    series_number,
    unregister,
)
from dicom_node.encode.processes import EncodeRequest, EncoderProcesses, encode_in_process
from dicom_node.series.volume import assemble_series
from dicom_node_testing.synthetic import write_ct_series
from tests.checks import sr_evidence_segs

LABEL_MAP = ResultSettings(seg_type="labelmap")


@pytest.fixture(scope="module")
def pool() -> Iterator[EncoderProcesses]:
    workers = EncoderProcesses(2)
    yield workers
    workers.close()


@pytest.fixture
def shm(tmp_path, monkeypatch):
    """Where the label maps are shared, to see that each is removed."""
    (where := tmp_path / "shm").mkdir()
    monkeypatch.setattr(processes, "SHARED_MEMORY_DIR", where)
    return where


@pytest.fixture
def context(tmp_path) -> EncodeContext:
    hu = np.full((6, 24, 24), -100, np.int16)
    volume = assemble_series(write_ct_series(hu, tmp_path / "ct", spacing=(2.0, 1.0, 1.0)), 3)
    labels = np.zeros(volume.shape, np.uint8)
    labels[1:4, 4:12, 4:12] = 1
    labels[2:6, 14:20, 10:22] = 3
    labels.flags.writeable = False  # as the node hands a result to the encoders
    return EncodeContext(
        source=volume,
        labels=labels,
        segments=[segment_info_for(v, n) for v, n in ((1, "spleen"), (2, "liver"), (3, "kidney"))],
        algorithm=AlgorithmInfo("test", "1"),
        settings=LABEL_MAP,
    )


def _tiny(sop_instance_uid: str) -> Dataset:
    """A data set that can be written as a Part 10 file, and nothing more."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document
    ds.SOPInstanceUID = sop_instance_uid
    ds.ContentLabel = f"P{os.getpid()}"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _read(encoded) -> Dataset:
    return pydicom.dcmread(io.BytesIO(encoded.data))


def _requests() -> list[EncodeRequest]:
    binary = ResultSettings(seg_type="binary")
    seg = [e for e in encoders() if e.kind == "SEG"]
    return [EncodeRequest(encoders(), LABEL_MAP), EncodeRequest(seg + requiring("SEG"), binary)]


def test_the_workers_make_what_the_node_makes(pool, context, shm):
    away = pool.encode(context, _requests())
    here = encode_in_process(context, _requests())
    assert [list(r) for r in away] == [["SEG", "RTSTRUCT", "SR"], ["SEG", "SR"]]
    for made_away, made_here in zip(away, here, strict=True):
        seg, seg_here = _read(made_away["SEG"]), _read(made_here["SEG"])
        assert seg.SOPInstanceUID == made_away["SEG"].sop_instance_uid
        assert np.array_equal(seg.pixel_array, seg_here.pixel_array)
        # each SR names the SEG of its own request
        assert sr_evidence_segs(_read(made_away["SR"])) == {seg.SOPInstanceUID}
    rt, rt_here = _read(away[0]["RTSTRUCT"]), _read(here[0]["RTSTRUCT"])
    assert [[c.ContourData for c in roi.ContourSequence] for roi in rt.ROIContourSequence] == [
        [c.ContourData for c in roi.ContourSequence] for roi in rt_here.ROIContourSequence
    ]
    assert list(shm.iterdir()) == []  # the shared map is gone


class _Refuses:
    """An encoder that a worker can be sent, and that refuses every map."""

    kind = "REFUSES"
    requires: tuple[str, ...] = ()
    first_series_number = 9006

    def enabled(self, settings: ResultSettings) -> bool:
        return True

    def build(self, context: EncodeContext, built: Mapping[str, Dataset]) -> Dataset:
        raise EncodeError(f"refused in process {os.getpid()}")


def test_an_encode_error_in_a_worker_reaches_the_caller(pool, context, shm):
    chosen = [*encoders(), _Refuses()]  # the SEG stays here, the REFUSES goes away
    with pytest.raises(EncodeError, match="refused in process") as raised:
        pool.encode(context, [EncodeRequest(chosen, LABEL_MAP)])
    assert str(os.getpid()) not in str(raised.value)
    assert list(shm.iterdir()) == []


def test_an_encoder_a_worker_cannot_be_sent_is_built_here(pool, context, shm):
    class Local:
        kind = "LOCAL"
        requires: tuple[str, ...] = ()
        first_series_number = 9007

        def enabled(self, settings: ResultSettings) -> bool:
            return True

        def build(self, context: EncodeContext, built: Mapping[str, Dataset]) -> Dataset:
            return _tiny("1.2.3")

    (made,) = pool.encode(context, [EncodeRequest([*encoders(), Local()], LABEL_MAP)])
    assert list(made) == ["SEG", "RTSTRUCT", "SR", "LOCAL"]
    assert _read(made["LOCAL"]).ContentLabel == f"P{os.getpid()}"


class _DiesAway:
    """An encoder that ends any process but the one that made it."""

    kind = "DIES"
    requires: tuple[str, ...] = ()
    first_series_number = 9008

    def __init__(self) -> None:
        self.home = os.getpid()

    def enabled(self, settings: ResultSettings) -> bool:
        return True

    def build(self, context: EncodeContext, built: Mapping[str, Dataset]) -> Dataset:
        if os.getpid() != self.home:
            os._exit(3)
        return _tiny("1.2.4")


def test_a_worker_that_dies_costs_no_result(pool, context, shm, caplog):
    (made,) = pool.encode(context, [EncodeRequest([*encoders(), _DiesAway()], LABEL_MAP)])
    assert list(made) == ["SEG", "RTSTRUCT", "SR", "DIES"]
    assert "an encoder process ended unexpectedly" in caplog.text
    # and the next series gets new workers
    (again,) = pool.encode(context, [EncodeRequest(encoders(), LABEL_MAP)])
    assert sr_evidence_segs(_read(again["SR"])) == {again["SEG"].sop_instance_uid}


def test_a_worker_killed_while_idle_costs_no_result(pool, context, shm, caplog):
    pool.encode(context, [EncodeRequest(encoders(), LABEL_MAP)])  # workers forked
    executor = pool._executor()
    (victim, *_) = list(executor._processes)  # pid -> process
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while executor._broken is False:  # until its manager thread has noticed
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (made,) = pool.encode(context, [EncodeRequest(encoders(), LABEL_MAP)])
    assert list(made) == ["SEG", "RTSTRUCT", "SR"]
    assert sr_evidence_segs(_read(made["SR"])) == {made["SEG"].sop_instance_uid}
    assert "an encoder process had ended" in caplog.text
    (again,) = pool.encode(context, [EncodeRequest(encoders(), LABEL_MAP)])  # new workers
    assert pool._executor() is not executor and list(again) == ["SEG", "RTSTRUCT", "SR"]


def test_the_maps_of_a_node_no_longer_running_are_removed(shm):
    gone = subprocess.Popen(["true"])  # noqa: S607
    gone.wait()
    stale = shm / f"{processes.LABELS_PREFIX}{gone.pid}-abc"
    running = shm / f"{processes.LABELS_PREFIX}1-abc"  # init runs
    mine = shm / f"{processes.LABELS_PREFIX}{os.getpid()}-abc"
    for path in (stale, running, mine):
        path.write_bytes(b"\0")
    assert processes.remove_stale_labels() >= 1
    assert not stale.exists() and running.exists() and mine.exists()


_KILLED_NODE = """
import os, signal
from dicom_node.encode.processes import EncoderProcesses, _ready

if __name__ == "__main__":
    pool = EncoderProcesses(2)
    pids = {pool._executor().submit(_ready).result() for _ in range(4)}
    print(" ".join(map(str, pids)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_workers_of_a_node_killed_outright_end(tmp_path):
    script, out = tmp_path / "node.py", tmp_path / "out.txt"
    script.write_text(_KILLED_NODE)
    with out.open("w") as f:
        node = subprocess.Popen([sys.executable, str(script)], stdout=f, stderr=subprocess.STDOUT)
        # not reaped at once: a killed node stays a zombie until its parent waits for it
        time.sleep(1)
        assert node.wait(120) == -signal.SIGKILL, out.read_text()
    workers = [int(p) for p in out.read_text().split()]
    assert workers
    deadline = time.monotonic() + 10 * processes.WATCH_SECONDS + 5
    while any(runs(p) for p in workers):
        assert time.monotonic() < deadline, f"workers {workers} outlived their node"
        time.sleep(0.2)


class _Numbered:
    """A deployment's encoder: registered in the node only, numbered by the registry."""

    kind = "NUMBERED"
    requires: tuple[str, ...] = ()
    first_series_number = 9009

    def enabled(self, settings: ResultSettings) -> bool:
        return True

    def build(self, context: EncodeContext, built: Mapping[str, Dataset]) -> Dataset:
        ds = _tiny("1.2.5")
        ds.SeriesNumber = series_number(self.kind, context.model_index)
        return ds


def test_an_encoder_registered_in_the_node_is_known_to_its_worker(pool, context, shm):
    register(_Numbered())
    try:
        (made,) = pool.encode(context, [EncodeRequest(encoders(), LABEL_MAP)])
    finally:
        unregister("NUMBERED")
    numbered = _read(made["NUMBERED"])
    assert numbered.SeriesNumber == 9009 and numbered.ContentLabel != f"P{os.getpid()}"


def test_a_result_of_few_labels_stays_in_the_node(context, shm):
    few = EncoderProcesses(2, min_labels=3)  # the map holds two
    try:
        (made,) = few.encode(context, [EncodeRequest(encoders(), LABEL_MAP)])
        assert list(made) == ["SEG", "RTSTRUCT", "SR"]
        assert few._pool is None and list(shm.iterdir()) == []  # no worker, nothing shared
    finally:
        few.close()


def _niceness() -> int:
    return os.nice(0)


def test_the_workers_yield_the_cpu_to_the_node(pool):
    worker = pool._executor().submit(_niceness).result()
    assert worker == min(19, os.nice(0) + processes.WORKER_NICENESS)
