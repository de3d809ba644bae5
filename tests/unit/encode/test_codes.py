"""Label names to SNOMED CT codes: the vendored TotalSegmentator table, and the names the
MONAI zoo's multi-organ bundles really use (read from their published configs)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from dicom_node.encode import segment_info_for
from dicom_node.encode.codes import (
    TABLE,
    canonical_structure,
    lookup,
    name_key,
    read_table_rows,
    structures,
)
from tests.peers import ROOT

REPO = ROOT
SHARED = REPO.parent / "shared"
BODY_STRUCTURE = "123037004"


def _data_root() -> Path:
    env = os.environ.get("DICOM_NODE_TESTDATA")
    return Path(env) if env else SHARED / "data"


def _zoo_labels(bundle: str) -> dict[int, str]:
    """Label value -> name, as the bundle's metadata.json declares its output channels."""
    path = SHARED / "zoo" / bundle / "configs" / "metadata.json"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    meta = json.loads(path.read_text())
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    return {int(k): v for k, v in channels.items() if int(k) != 0}


def test_vendored_table_equals_the_shared_copy_row_for_row() -> None:
    shared = _data_root() / "codes" / TABLE
    if not shared.exists():
        pytest.skip(f"{shared} is absent")
    with shared.open(newline="", encoding="utf-8") as f:
        expected = list(csv.DictReader(f))
    rows = read_table_rows()
    assert len(rows) == len(expected) == 170
    for got, want in zip(rows, expected, strict=True):
        assert got == want


def test_every_table_name_finds_itself_and_no_two_collide() -> None:
    table = structures()
    assert len(table) == 170 + 1  # TotalSegmentator's, and the additions
    for name in table:
        assert canonical_structure(name) == name
    keys = [name_key(name) for name in table]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize(
    "bundle",
    ["wholeBody_ct_segmentation", "swin_unetr_btcv_segmentation", "spleen_ct_segmentation"],
)
def test_every_label_of_the_zoo_bundles_gets_a_specific_code(bundle: str) -> None:
    labels = _zoo_labels(bundle)
    expected = {
        "wholeBody_ct_segmentation": 104,
        "swin_unetr_btcv_segmentation": 13,
        "spleen_ct_segmentation": 1,
    }[bundle]
    assert len(labels) == expected
    for value, name in labels.items():
        info = segment_info_for(value, name)
        assert info.code.value != BODY_STRUCTURE, name
        assert info.code.scheme_designator == "SCT"
        assert info.name == name  # the model's own text stays the label
        entry = lookup(name)
        assert entry is not None and info.color_rgb == entry.color_rgb


def test_btcv_spellings() -> None:
    labels = _zoo_labels("swin_unetr_btcv_segmentation")
    got = {name: canonical_structure(name) for name in labels.values()}
    assert got == {
        "spleen": "spleen",
        "Right Kidney": "kidney_right",
        "Left Kideny": "kidney_left",
        "Gallbladder": "gallbladder",
        "Esophagus": "esophagus",
        "Liver": "liver",
        "Stomach": "stomach",
        "Aorta": "aorta",
        "IVC": "inferior_vena_cava",
        "Portal and Splenic Veins": "portal_vein_and_splenic_vein",
        "Pancreas": "pancreas",
        "Right adrenal gland": "adrenal_gland_right",
        "Left adrenal gland": "adrenal_gland_left",
    }


@pytest.mark.parametrize(
    ("name", "structure"),
    [
        ("Left Kidney", "kidney_left"),
        ("kidney_left", "kidney_left"),
        ("KIDNEY-LEFT", "kidney_left"),
        ("left  kidney", "kidney_left"),
        ("Left Kideny", "kidney_left"),
        ("LeftKidney", "kidney_left"),
        ("kidney_right", "kidney_right"),
        ("ivc", "inferior_vena_cava"),
        ("Inferior Vena Cava", "inferior_vena_cava"),
        ("gall bladder", "gallbladder"),
        ("portal vein and splenic vein", "portal_vein_and_splenic_vein"),
        ("L1 vertebra", "vertebrae_L1"),
        ("vertebrae_L1", "vertebrae_L1"),
        ("Rib left 11", "rib_left_11"),
        ("left rib 1", "rib_left_1"),
        ("Oesophagus", "esophagus"),
        ("urinary bladder", "urinary_bladder"),
    ],
)
def test_tolerant_spellings(name: str, structure: str) -> None:
    assert canonical_structure(name) == structure


def test_lateral_structures_carry_a_laterality_modifier() -> None:
    left = segment_info_for(3, "Left Kideny")
    assert (left.code.value, left.modifier.value, left.modifier.meaning) == (
        "64033007",
        "7771000",
        "Left",
    )
    assert left.laterality == left.modifier
    right = segment_info_for(2, "Right Kidney")
    assert right.modifier.value == "24028007"
    assert segment_info_for(1, "spleen").modifier is None
    # a modifier that is no laterality is kept, but is not a laterality
    covid = segment_info_for(1, "lung_covid_infiltrate")
    assert covid.modifier.value == "840539006" and covid.laterality is None
    # a finding keeps where it lies
    cyst = segment_info_for(1, "kidney_cyst_left")
    assert cyst.anatomic_region.value == "64033007"
    assert cyst.anatomic_region_modifier.value == "7771000"
    assert cyst.category.value == "49755003"  # Morphologically Altered Structure


def test_category_is_the_current_anatomical_structure_code() -> None:
    # the table writes SCT 123037004 for "Anatomical Structure"; CID 7150 has 91723000
    assert {e.category.value for e in structures().values()} == {
        "91723000",
        "49755003",
        "85756007",
        "260787004",
    }


@pytest.mark.parametrize("name", ["tumour", "lesion 3", "left thing", "kidney stone"])
def test_unknown_names_stay_body_structure_with_their_own_label(name: str) -> None:
    info = segment_info_for(7, name)
    assert info.code.value == BODY_STRUCTURE
    assert info.name == name
    assert info.modifier is None


def test_the_unest_bundles_kidney_cortex_is_coded_from_the_additions() -> None:
    info = segment_info_for(1, "kidney cortex")
    assert (info.code.value, info.code.meaning) == ("50403003", "Cortex of kidney")
    assert info.category.value == "91723000"
    # no source gives these a code: they stay generic, with their own text
    for name in ("medulla", "pelvicalyceal system"):
        assert segment_info_for(2, name).code.value == BODY_STRUCTURE
