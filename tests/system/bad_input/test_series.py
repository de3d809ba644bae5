"""Bad series: stored, then their jobs fail with a reason a radiographer can act on."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEGLosslessSV1,
    generate_uid,
)

from dicom_node_testing.synthetic import SeriesAttributes
from tests.peers import storescu
from tests.system.bad_input.crafting import (
    association,
    comment_of,
    ct_series,
    ct_slice_ds,
    enhanced_ct,
    job_of,
    push,
    status_of,
)

pytestmark = [
    pytest.mark.cost(3),
    pytest.mark.filterwarnings(
        "ignore:Invalid value for VR UI",
        "ignore:The value length",
        "ignore:Expected explicit VR",
        "ignore:Invalid value for VR DS",
    ),
]


# -- series the node stores, whose jobs fail with a reason ---------------------------------
def _mixed_sizes() -> list[Dataset]:
    s = ct_series(3)
    big = ct_slice_ds(z=4.0, rows=20, cols=20, number=3)
    big.SeriesInstanceUID, big.StudyInstanceUID = s[0].SeriesInstanceUID, s[0].StudyInstanceUID
    big.FrameOfReferenceUID = s[0].FrameOfReferenceUID
    return [s[0], s[1], big]


def _mixed_orientations() -> list[Dataset]:
    s = ct_series(3)
    s[2].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    return s


def _gantry_tilt() -> list[Dataset]:
    s = ct_series(4)
    for k, ds in enumerate(s):
        ds.GantryDetectorTilt = 20
        ds.ImagePositionPatient = [0.0, 2.0 * k * np.tan(np.radians(20)), 2.0 * k]
    return s


def _gap() -> list[Dataset]:
    s = ct_series(5)
    for ds, z in zip(s, (0, 2, 4, 8, 10), strict=True):
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    return s


def _enhanced_inconsistent() -> list[Dataset]:
    return [enhanced_ct(4, 4, 4, [0.0, 5.0, 5.0, 30.0])]


def _undecodable_jpeg() -> list[Dataset]:
    s = ct_series(3)
    for ds in s:
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = encapsulate([b"\xff\xd8" + bytes(range(200)) + b"\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    return s


def _two_frames_of_reference() -> list[Dataset]:
    s = ct_series(3)
    s[2].FrameOfReferenceUID = generate_uid()
    return s


JOB_CASES = [
    (
        "two frames of reference",
        _two_frames_of_reference,
        "not a volume: slices have 2 different FrameOfReferenceUID values",
    ),
    ("single slice", lambda: ct_series(1), "not a volume: only 1 slice(s); at least 3 are needed"),
    ("mixed sizes", _mixed_sizes, "not a volume: slices have mixed sizes: 16x16, 20x20"),
    (
        "mixed orientations",
        _mixed_orientations,
        "not a volume: slices have 2 different orientations",
    ),
    ("gantry tilt", _gantry_tilt, "not a volume: gantry tilt of 20.0 degrees"),
    ("a gap of one slice", _gap, "not a volume: 1 slice(s) missing: gap of 4.00 mm"),
    (
        "Enhanced CT, frames at repeated positions",
        _enhanced_inconsistent,
        "not a volume: frames do not form a volume",
    ),
    (
        "JPEG Lossless that does not decode",
        _undecodable_jpeg,
        "not a volume: pixel data cannot be decoded",
    ),
]


@pytest.mark.parametrize(("case", "build", "reason"), JOB_CASES, ids=[c[0] for c in JOB_CASES])
def test_series_job_fails_with_reason(node, ledger, served, case, build, reason):
    datasets = build()
    statuses = push(node, ledger, datasets)
    assert statuses == ["0x0000"] * len(datasets)
    job = job_of(node, datasets[0].SeriesInstanceUID, "failed")
    ledger.check(f"job: {case}", f"failed: {reason}", f"{job['state']}: {job['reason']}")
    assert job["instance_count"] == len(datasets)


def test_gap_series_from_dcmtk_fails_with_reason(node, ledger, served, tmp_path):
    paths = []
    for k, ds in enumerate(_gap()):
        paths.append(tmp_path / f"{k}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    r = storescu(node.port, paths)
    assert r.returncode == 0, r.stderr
    ledger.acked.update(str(pydicom.dcmread(p).SOPInstanceUID) for p in paths)
    job = job_of(node, str(pydicom.dcmread(paths[0]).SeriesInstanceUID), "failed")
    reason = "not a volume: 1 slice(s) missing"
    ledger.check(
        "job: a gap, pushed by DCMTK storescu",
        f"failed: {reason}",
        f"{job['state']}: {job['reason']}",
    )


def test_series_over_the_instance_limit(node, ledger, served):
    attrs = SeriesAttributes()
    datasets = [ct_slice_ds(z=0.0, attrs=attrs, number=k + 1) for k in range(7)]  # one position
    with association(node.port) as assoc:
        statuses = [
            status_of(assoc.send_c_store(ds), ledger, ds.SOPInstanceUID) for ds in datasets[:6]
        ]
        rsp = assoc.send_c_store(datasets[6])
    ledger.check(
        "7th instance of a series limited to 6",
        "0xA701 series already holds 6",
        f"{status_of(rsp, ledger, datasets[6].SOPInstanceUID)} {comment_of(rsp)}",
    )
    assert statuses == ["0x0000"] * 6
    job = job_of(node, attrs.series_instance_uid, "failed")
    ledger.check(
        "job: six slices at one position",
        "failed: not a volume: two or more slices share the same position",
        f"{job['state']}: {job['reason']}",
    )
