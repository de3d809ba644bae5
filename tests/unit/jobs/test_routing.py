"""Routing: which series go to which models, and the one clear error of a bad rule."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from dicom_node.config import PROJECT_ROOT, ConfigError, settings_from_dict
from dicom_node.jobs.routing import select_models

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
