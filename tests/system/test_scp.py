"""The C-STORE/C-ECHO SCP against real peers: DCMTK, Orthanc, a crash mid-push."""

from __future__ import annotations

import struct
import threading
import time

import numpy as np
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.sop_class import CTImageStorage

from dicom_node.common.associations import TUNE_REQUESTED
from dicom_node.intake.received import part10_header
from dicom_node.intake.spool import Spool
from dicom_node_testing.synthetic import write_ct_series
from tests.peers import NodeProcess, echoscu, storescu

pytestmark = pytest.mark.cost(95)

#: storescu's option that proposes each transfer syntax
PROPOSE = {
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2": "-xi",
}
CT_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2",
    "1.2.840.10008.5.1.4.1.1.2.1",
    "1.2.840.10008.5.1.4.1.1.2.2",
}


@pytest.fixture
def node(tmp_path, dcmtk_tools):
    # these tests look at storage only: no job runs (no release rule, a long settle time)
    n = NodeProcess(
        tmp_path / "node", node={"settle_seconds": 3600, "complete_on_release": False}
    ).start()
    yield n
    n.stop()


def _spooled(node: NodeProcess) -> dict[str, pydicom.Dataset]:
    return {
        str(ds.SOPInstanceUID): ds
        for ds in (pydicom.dcmread(p) for p in (node.data_dir / "spool").glob("*/*/*.dcm"))
    }


def test_echo_and_real_series_from_storescu(node, data_dir):
    assert echoscu(node.port)
    series = data_dir / "ct" / "lidc-chest" / "LIDC-IDRI-0001"
    files = sorted(series.rglob("*.dcm"))
    r = storescu(node.port, series)
    assert r.returncode == 0, r.stderr
    jobs = node.jobs()
    assert len(jobs) == 1
    assert jobs[0]["instance_count"] == len(files) == 16
    assert jobs[0]["state"] == "receiving"
    # stored bytes decode to what the sender had
    stored = _spooled(node)
    for f in files:
        src = pydicom.dcmread(f)
        assert np.array_equal(stored[str(src.SOPInstanceUID)].pixel_array, src.pixel_array)
    # re-sent instances are de-duplicated by SOP Instance UID
    assert storescu(node.port, series).returncode == 0
    assert node.jobs()[0]["instance_count"] == 16


def test_every_transfer_syntax(node, data_dir):
    """CT files in every transfer syntax are stored and decode to the pixels pydicom gives;
    the other modalities in the folder are refused in negotiation."""
    accepted, refused = [], []
    for f in sorted((data_dir / "transfer-syntaxes").iterdir()):
        if not f.is_file():
            continue
        src = pydicom.dcmread(f, force=True)
        # storescu proposes a compressed syntax only when asked to; it cannot transcode
        option = PROPOSE.get(str(src.file_meta.get("TransferSyntaxUID")), "-xe")
        r = storescu(node.port, f, "DICOM_NODE", "STORESCU", "-v", option)
        is_ct = str(src.SOPClassUID) in CT_CLASSES
        (accepted if is_ct else refused).append((f, src, r))
    assert len(accepted) >= 7, [a[0].name for a in accepted]
    stored = _spooled(node)
    first: dict[str, tuple] = {}
    for f, src, r in accepted:
        uid = str(src.SOPInstanceUID)
        if uid in first:
            # 693_* are one image in three syntaxes with one SOP Instance UID: a re-send with
            # the same pixels is a duplicate (success), other pixels are refused (0xC001)
            same = np.array_equal(first[uid][1].pixel_array, src.pixel_array)
            assert ("Error: CannotUnderstand" in r.stderr) != same, f.name
            assert np.array_equal(stored[uid].pixel_array, first[uid][1].pixel_array)
            continue
        first[uid] = (f, src)
        assert uid in stored, f"{f.name} was not stored: {r.stderr[-500:]}"
        assert stored[uid].file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        assert np.array_equal(stored[uid].pixel_array, src.pixel_array), f.name
    assert len(first) >= 5
    for f, src, r in refused:
        assert str(src.SOPInstanceUID) not in stored, f.name
        assert "No presentation context" in r.stderr or r.returncode != 0, f.name
    assert echoscu(node.port)


def test_orthanc_pushes_a_series_to_the_node(tmp_path, orthanc, data_dir, dcmtk_tools):
    node = NodeProcess(
        tmp_path / "n", node={"settle_seconds": 3600, "complete_on_release": False}
    ).start()
    try:
        orthanc.rest(
            "/modalities/node",
            {"AET": "DICOM_NODE", "Host": "127.0.0.1", "Port": node.port},
            method="PUT",
        )
        series = data_dir / "ct" / "lidc-chest" / "LIDC-IDRI-0002"
        ids = [orthanc.rest("/instances", f.read_bytes())["ID"] for f in series.rglob("*.dcm")]
        result = orthanc.rest("/modalities/node/store", {"Resources": ids, "Synchronous": True})
        assert result.get("FailedInstancesCount", 0) == 0, result
        jobs = node.jobs()
        assert [j["instance_count"] for j in jobs] == [len(ids)]
        assert jobs[0]["calling_ae"] == "ORTHANC"
    finally:
        node.stop()


def test_sigkill_mid_push_loses_no_acknowledged_instance(tmp_path, dcmtk_tools):
    hu = np.random.default_rng(1).integers(-1000, 1000, (60, 64, 64)).astype(np.int16)
    paths = write_ct_series(hu, tmp_path / "series", spacing=(2.0, 1.0, 1.0))
    (tmp_path / "empty").mkdir()  # a folder that holds no bundle: every job fails
    node = NodeProcess(
        tmp_path / "n",
        node={"settle_seconds": 1.0},
        # one attempt: the job's failure is the end of the test, not its retries
        inference={"backend": "local", "bundle": str(tmp_path / "empty"), "attempts": 1},
    )
    node.start()
    try:
        acked: list[str] = []

        def push() -> None:
            ae = AE(ae_title="PUSHER")
            ae.dimse_timeout = ae.network_timeout = 5
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate(
                "127.0.0.1", node.port, ae_title="DICOM_NODE", evt_handlers=[TUNE_REQUESTED]
            )
            assert assoc.is_established
            for p in paths:
                ds = pydicom.dcmread(p)
                try:
                    status = assoc.send_c_store(ds)
                except Exception:  # noqa: BLE001 - the node died under us
                    return
                if status and status.Status == 0:
                    acked.append(str(ds.SOPInstanceUID))
                if not assoc.is_established:
                    return
            assoc.release()

        t = threading.Thread(target=push)
        t.start()
        while len(acked) < 20:
            time.sleep(0.005)
        node.kill()
        t.join(30)
        assert 20 <= len(acked) < 60
        node.start()
        # every acknowledged instance survived the crash
        stored = set(_spooled(node))
        assert set(acked) <= stored
        jobs = node.jobs()
        assert jobs[0]["instance_count"] >= len(acked)
        # the sender retries everything; the node completes the series with each slice once
        assert storescu(node.port, tmp_path / "series").returncode == 0
        jobs = node.wait_for(
            lambda js: js and js[0]["state"] not in ("receiving", "complete", "processing"),
            timeout=60,
            what="series settled",
        )
        assert jobs[0]["instance_count"] == 60
        assert len(_spooled(node)) == 60
        # no bundle is installed in this test: the job fails with that reason, not a traceback
        assert jobs[0]["state"] == "failed"
    finally:
        node.stop()


def test_geometry_failure_is_recorded_on_the_job(tmp_path, data_dir, dcmtk_tools):
    node = NodeProcess(tmp_path / "n", node={"settle_seconds": 0.5}).start()
    try:
        assert storescu(node.port, data_dir / "ct" / "ge-head-gantry-tilt").returncode == 0
        jobs = node.wait_for(lambda js: js and js[0]["state"] == "failed", 60, "failed job")
        assert jobs[0]["reason"].startswith("not a volume: gantry tilt of 18.5 degrees")
        assert jobs[0]["instance_count"] == 28
        assert echoscu(node.port)
    finally:
        node.stop()


def test_push_command_sends_a_folder(node, data_dir):
    import subprocess
    import sys

    series = data_dir / "ct" / "lidc-chest" / "LIDC-IDRI-0003"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "push",
            str(series),
            "--to",
            f"DICOM_NODE@127.0.0.1:{node.port}",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    n = len(list(series.rglob("*.dcm")))
    assert f"sent {n}, failed 0" in r.stdout
    assert node.jobs()[0]["instance_count"] == n
    # an unreachable peer is one sentence, not a traceback
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node",
            "push",
            str(series),
            "--to",
            "NOBODY@127.0.0.1:1",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "refused or cannot be reached" in r.stderr


@pytest.mark.parametrize(
    "sop_class, sop_instance, syntax",
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),  # even lengths
        ("1.2.840.10008.5.1.4.1.1.2.1", "1.2.3", "1.2.840.10008.1.2"),  # odd: padded
        ("1.2.840.10008.5.1.4.1.1.2", "9" * 64, "1.2.840.10008.1.2.4.70"),
    ],
)
def test_part10_header_is_what_pynetdicom_writes(sop_class, sop_instance, syntax):
    """The spool file's header is pynetdicom's ``encoded_dataset`` header, byte for byte."""
    meta = create_file_meta(
        sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax
    )
    expected = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
    assert part10_header(sop_class, sop_instance, syntax) == expected


def test_spool_writes_chunks_in_order(tmp_path):
    spool = Spool(tmp_path / "spool")
    path = spool.path_for("1.2", "1.2.3", "1.2.3.4")
    chunks = [b"head", b"", bytes(range(256)) * 4096, b"tail"]
    assert spool.write(path, *chunks) == sum(map(len, chunks))
    assert path.read_bytes() == b"".join(chunks)


# -- the database refuses: 0xA700, nothing left behind, the node serves on ---------------
def _store_one(port: int, ds: pydicom.Dataset, timeout: float = 30) -> int:
    ae = AE(ae_title="DBLOCK")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert rsp is not None and "Status" in rsp
    return int(rsp.Status)


def test_a_locked_database_delays_the_row_not_the_answer(node, tmp_path):
    """Another process holds the job database's write lock during a C-STORE: the instance
    is acknowledged once its file is synced (the spool is the source of truth, the row is
    written behind), and its row is committed once the lock is gone."""
    import sqlite3

    hu = np.random.default_rng(4).integers(-1000, 1000, (2, 32, 32)).astype(np.int16)
    first, second = write_ct_series(hu, tmp_path / "s", spacing=(2.0, 1.0, 1.0))
    assert _store_one(node.port, pydicom.dcmread(first)) == 0  # the database exists now
    ds = pydicom.dcmread(second)
    lock = sqlite3.connect(node.data_dir / "jobs.sqlite", timeout=10, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        status = _store_one(node.port, ds)
        assert str(ds.SOPInstanceUID) in _spooled(node)  # synced before the answer
        assert [r["instance_count"] for r in node.jobs()] == [1]  # the row waits
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert status == 0
    assert list((node.data_dir / "spool" / ".incoming").iterdir()) == []
    deadline = time.monotonic() + 30
    while node.jobs()[0]["instance_count"] != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.jobs()[0]["instance_count"] == 2
    assert set(_spooled(node)) == {str(pydicom.dcmread(first).SOPInstanceUID), ds.SOPInstanceUID}
    assert _store_one(node.port, ds) == 0  # a copy: no new instance
    assert node.jobs()[0]["instance_count"] == 2


# -- a large instance streams to the spool ------------------------------------------------
def _vm(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status").read().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _large_enhanced_ct(path, frames: int, side: int = 512) -> tuple[str, int]:
    """An Enhanced CT file of ``frames`` frames of ``side``^2 zero pixels, written a frame
    at a time (the test never holds it whole either); returns its SOP Instance UID and the
    size of its data set."""
    import copy

    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from tests.peers import testdata

    ds = pydicom.dcmread(testdata() / "enhanced-ct" / "eCT_Supplemental.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows = ds.Columns = side
    ds.NumberOfFrames = frames
    first = ds.PerFrameFunctionalGroupsSequence[0]
    items = []
    for k in range(frames):
        item = copy.deepcopy(first)
        item.PlanePositionSequence[0].ImagePositionPatient = [0.0, 0.0, float(k)]
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = items
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    frame = bytes(side * side * 2)
    with open(path, "ab") as f:
        f.write(struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OW", frames * len(frame)))
        for _ in range(frames):
            f.write(frame)
    meta_end = 144 + int.from_bytes(open(path, "rb").read(144)[140:144], "little")
    return str(ds.SOPInstanceUID), path.stat().st_size - meta_end


def test_a_large_instance_streams_to_the_spool(tmp_path, dcmtk_tools):
    """A 400 MB Enhanced CT is written to the spool as it arrives and renamed into place:
    the node's peak memory grows by a fraction of it, and the spool holds it byte for byte."""
    import hashlib

    from pynetdicom import _config

    source = tmp_path / "large.dcm"
    sop_uid, size = _large_enhanced_ct(source, frames=800)
    node = NodeProcess(
        tmp_path / "n",
        node={"settle_seconds": 3600, "complete_on_release": False},
        limits={"max_instance_bytes": 1024 * 1024 * 1024},
    ).start()
    try:
        assert echoscu(node.port)
        pid = node.proc.pid
        hwm_before = _vm(pid, "VmHWM")
        ae = AE(ae_title="LARGE")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.1.2.1")
        before = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True  # the sender streams its file too
        try:
            assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
            assert assoc.is_established
            rsp = assoc.send_c_store(source)
            assoc.release()
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = before
        assert rsp.Status == 0, rsp
        growth = _vm(pid, "VmHWM") - hwm_before
        print(
            f"\nlarge instance: {size / 2**20:.0f} MiB data set stored; node peak RSS "
            f"{hwm_before / 2**20:.0f} -> {(hwm_before + growth) / 2**20:.0f} MiB "
            f"(+{growth / 2**20:.0f} MiB)"
        )
        assert growth < size / 4, growth
        [stored] = (node.data_dir / "spool").glob(f"*/*/{sop_uid}.dcm")

        def data_set_digest(path) -> str:
            with open(path, "rb") as f:
                f.seek(144 + int.from_bytes(f.read(144)[140:144], "little"))
                sha = hashlib.sha256()
                while chunk := f.read(1 << 20):
                    sha.update(chunk)
            return sha.hexdigest()

        assert data_set_digest(stored) == data_set_digest(source)
        assert list((node.data_dir / "spool" / ".incoming").iterdir()) == []
        assert node.jobs()[0]["instance_count"] == 1
    finally:
        node.stop()
