"""Routing: which series go to which models; a series no rule matches is kept, "no model"."""

from __future__ import annotations

import io

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.config import PROJECT_ROOT, ConfigError, settings_from_dict
from dicom_node.phantom import make_phantom
from dicom_node.routing import select_models
from dicom_node.synthetic import SeriesAttributes, write_ct_series
from tests.peers import NodeProcess, storescu

SPLEEN = str(PROJECT_ROOT / "bundles" / "spleen_ct_demo")
LIVER = str(PROJECT_ROOT / "bundles" / "liver_ct_demo")


def _settings(routes):
    return settings_from_dict(
        {
            "models": [
                {"name": "spleen", "triton_model": "spleen_seg", "bundle": SPLEEN},
                {"name": "liver", "triton_model": "liver_seg", "bundle": LIVER},
            ],
            "routes": routes,
        }
    )


def _header(**kw) -> Dataset:
    ds = Dataset()
    ds.Modality = kw.get("modality", "CT")
    ds.BodyPartExamined = kw.get("body_part", "ABDOMEN")
    ds.SeriesDescription = kw.get("description", "Abdomen 5mm portal venous")
    ds.SliceThickness = kw.get("thickness", "5")
    return ds


def _names(models):
    return [m.name for m in models]


def test_no_routes_sends_everything_to_the_first_model():
    s = _settings([])
    assert _names(select_models(s, _header(body_part="HEAD"), 30, "ANY")) == ["spleen"]


def test_each_condition_matches_and_refuses():
    s = _settings(
        [
            {
                "models": ["spleen"],
                "modality": ["ct"],
                "body_part": ["ABDOMEN", "CHEST_TO_PELVIS"],
                "series_description": "portal|venous",
                "calling_ae": ["SCANNER1"],
                "slice_thickness": [0.5, 5.0],
                "slice_count": [20, 1000],
            },
        ]
    )
    ok = _header()
    assert _names(select_models(s, ok, 40, "scanner1")) == ["spleen"]
    assert select_models(s, _header(modality="MR"), 40, "SCANNER1") == []
    assert select_models(s, _header(body_part="HEAD"), 40, "SCANNER1") == []
    assert select_models(s, _header(description="Lung 1mm"), 40, "SCANNER1") == []
    assert select_models(s, ok, 40, "OTHER") == []
    assert select_models(s, _header(thickness="7.5"), 40, "SCANNER1") == []
    assert select_models(s, ok, 10, "SCANNER1") == []


def test_one_series_can_go_to_two_models_each_once():
    s = _settings(
        [
            {"models": ["spleen"], "body_part": ["ABDOMEN"]},
            {"models": ["liver", "spleen"], "series_description": "abdomen"},
        ]
    )
    assert _names(select_models(s, _header(), 40, "X")) == ["spleen", "liver"]
    assert _names(select_models(s, _header(body_part="CHEST"), 40, "X")) == ["liver", "spleen"]


@pytest.mark.parametrize(
    "route, message",
    [
        ({"models": ["kidney"]}, "'kidney' is not a configured model"),
        ({"models": []}, "name at least one model"),
        ({"models": ["spleen"], "series_description": "("}, "not a regular expression"),
        ({"models": ["spleen"], "slice_count": [10]}, "must be [min, max]"),
    ],
)
def test_bad_routes_are_one_clear_error(route, message):
    with pytest.raises(ConfigError) as err:
        _settings([route])
    assert message in str(err.value)


def test_a_series_no_rule_matches_is_kept_as_no_model(tmp_path, dcmtk_tools):
    node = NodeProcess(
        tmp_path / "node",
        node={"settle_seconds": 0.5},
        models=[{"name": "spleen", "triton_model": "spleen_seg", "bundle": SPLEEN}],
        routes=[{"models": ["spleen"], "body_part": ["ABDOMEN"]}],
    ).start()
    try:
        ph = make_phantom(shape=(40, 96, 96), spacing=(5.0, 3.5, 3.5), seed=21)
        chest = SeriesAttributes(body_part_examined="CHEST")
        abdomen = SeriesAttributes(body_part_examined="ABDOMEN")
        write_ct_series(ph.hu, tmp_path / "chest", spacing=ph.spacing, attrs=chest)
        write_ct_series(ph.hu, tmp_path / "abdomen", spacing=ph.spacing, attrs=abdomen)
        assert storescu(node.port, tmp_path / "chest").returncode == 0
        assert storescu(node.port, tmp_path / "abdomen").returncode == 0
        jobs = node.wait_for(
            lambda js: len(js) == 2 and all(j["state"] in ("done", "no_model") for j in js),
            180,
            "both series finished",
            failures_allowed=False,
        )
        by_uid = {j["series_uid"]: j for j in jobs}
        kept = by_uid[chest.series_instance_uid]
        assert kept["state"] == "no_model"
        assert kept["reason"].startswith("no routing rule matched (modality CT, body part CHEST")
        assert kept["instance_count"] == 40
        assert len(list((node.data_dir / "spool").glob(f"*/{chest.series_instance_uid}/*"))) == 40
        done = by_uid[abdomen.series_instance_uid]
        assert done["state"] == "done" and done["model"] == "spleen"
    finally:
        node.stop()


def test_one_series_to_two_models_gives_two_result_sets(tmp_path, orthanc, dcmtk_tools):
    node = NodeProcess(
        tmp_path / "node",
        node={"settle_seconds": 0.5},
        models=[
            {"name": "spleen", "triton_model": "spleen_seg", "bundle": SPLEEN},
            {"name": "liver", "triton_model": "liver_seg", "bundle": LIVER},
        ],
        routes=[{"models": ["spleen", "liver"], "body_part": ["ABDOMEN"]}],
        destinations=[
            {
                "name": "pacs",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        ],
    ).start()
    try:
        ph = make_phantom(shape=(40, 96, 96), spacing=(5.0, 3.5, 3.5), seed=23)
        attrs = SeriesAttributes(body_part_examined="ABDOMEN")
        write_ct_series(ph.hu, tmp_path / "ct", spacing=ph.spacing, attrs=attrs)
        assert storescu(node.port, tmp_path / "ct").returncode == 0
        (job,) = node.wait_for(
            lambda js: (
                js
                and js[0]["state"] == "done"
                and len(js[0]["outbox"]) == 6
                and all(o["state"] == "sent" for o in js[0]["outbox"])
            ),
            300,
            "both models' results sent",
            failures_allowed=False,
        )
        assert job["model"] == "spleen, liver"
        assert set(job["results"]["models"]) == {"spleen", "liver"}
        segs = [
            i
            for i in orthanc.rest(
                "/tools/find",
                {
                    "Level": "Instance",
                    "Expand": True,
                    "Query": {"StudyInstanceUID": attrs.study_instance_uid, "Modality": "SEG"},
                },
            )
        ]
        labels = set()
        for inst in segs:
            seg = hd.seg.Segmentation.from_dataset(
                pydicom.dcmread(io.BytesIO(orthanc.file(inst["ID"])))
            )
            labels.add(tuple(d.segment_label for d in seg.SegmentSequence))
        assert labels == {("spleen",), ("liver",)}
        volumes = job["results"]["models"]
        assert volumes["spleen"]["volumes_ml"]["spleen"] > 0
        assert volumes["liver"]["volumes_ml"]["liver"] > volumes["spleen"]["volumes_ml"]["spleen"]
    finally:
        node.stop()
