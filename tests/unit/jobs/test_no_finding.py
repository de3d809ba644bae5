"""A series in which the model finds nothing ends "done" saying so: the job's reason is
"no finding", the SR says of the label that it is absent (no 0 mL that reads as a
measurement), and the SEG and RTSTRUCT that describe what was looked for are still made,
valid, to supersede an earlier run's at a destination."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from dicom_node.config import settings_from_dict
from dicom_node.encode.sr import ABSENT, PRESENCE
from dicom_node.inference import BACKENDS
from dicom_node.intake.spool import Spool
from dicom_node.node import Node
from dicom_node.state import SeriesState
from dicom_node_testing import threshold
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.checks import dciodvfy_errors
from tests.peers import SPLEEN_BUNDLE, wait_for


@pytest.fixture
def node(tmp_path, monkeypatch):
    monkeypatch.setitem(BACKENDS, "threshold", threshold.create_backends)
    settings = settings_from_dict(
        {
            "node": {"data_dir": str(tmp_path / "var"), "settle_seconds": 0.2},
            "limits": {"min_free_disk_mb": 1},
            "inference": {"backend": "threshold"},
            "models": [{"name": "spleen", "bundle": str(SPLEEN_BUNDLE)}],
        }
    )
    node = Node(settings)
    yield node
    node.stop()


def _spooled(node: Node, hu: np.ndarray, tmp_path: Path) -> str:
    """A series put in the node's spool as a crash would leave it (registered at start)."""
    attrs = SeriesAttributes()
    spool = Spool(node.settings.data_dir / "spool")
    for path in write_ct_series(hu, tmp_path / "ct", spacing=(2.0, 1.0, 1.0), attrs=attrs):
        target = spool.path_for(attrs.study_instance_uid, attrs.series_instance_uid, path.stem)
        spool.write(target, path.read_bytes())
    return attrs.series_instance_uid


def test_a_series_without_the_organ_is_done_with_no_finding(node, tmp_path):
    # water and fat only: nothing above the threshold backend's 40 HU
    uid = _spooled(node, np.full((4, 24, 24), -50, np.int16), tmp_path)
    node.start(serve=False)
    wait_for(
        lambda: (r := node.jobs.series.get(uid)) is not None and r.state == SeriesState.DONE,
        30,
        "the series done",
    )
    record = node.jobs.series.get(uid)
    assert record.reason == "no finding: the model found none of spleen"
    (model,) = record.results
    assert model.volumes_ml == {"spleen": 0.0}
    assert sorted(model.files) == ["RTSTRUCT", "SEG", "SR"]
    for kind, info in model.files.items():
        assert dciodvfy_errors(Path(info.path)) == [], kind
    report = hd.sr.srread(model.files["SR"].path).content
    assert report.get_volumetric_roi_measurement_groups() == []
    (group,) = report.get_image_measurement_groups()
    assert group.get_qualitative_evaluations(name=PRESENCE)[0].value == ABSENT
    assert group.get_measurements() == []


def test_a_series_with_the_organ_has_no_such_reason(node, tmp_path):
    hu = np.full((4, 24, 24), -50, np.int16)
    hu[1:3, 8:16, 8:16] = 60
    uid = _spooled(node, hu, tmp_path)
    node.start(serve=False)
    wait_for(
        lambda: (r := node.jobs.series.get(uid)) is not None and r.state == SeriesState.DONE,
        30,
        "the series done",
    )
    record = node.jobs.series.get(uid)
    assert record.reason == ""
    assert record.results.models[0].volumes_ml["spleen"] == pytest.approx(2 * 8 * 8 * 2 / 1000)
