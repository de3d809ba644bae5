"""SNOMED CT codes and display colours for the structure names segmentation models use.

Multi-organ models (the MONAI zoo's ``wholeBody_ct_segmentation`` with the 104
TotalSegmentator v1 classes, ``swin_unetr_btcv_segmentation`` with 13 BTCV organs) name
their labels in free text. A PACS and a viewer need codes: the Segmented Property Category
and Type, a Type Modifier for laterality, and a colour. Rather than keep a table of our
own, the node reads TotalSegmentator's, which the DICOM community already uses for the
same purpose (170 names, vendored unchanged in ``data/``, Apache-2.0; see its README).
Structures a zoo bundle names that the table lacks are added in a table of the same form,
``data/additional_structures.csv``, each row with its source in the README.

Bundles spell the same structure differently ("Left Kideny", "kidney_left", "IVC",
"Portal and Splenic Veins"), so a name is matched by its words: case, spaces, ``_`` and
``-`` are ignored, word order too ("Left Kidney" = "kidney_left"), plural and a few known
misspellings are folded, and a short list of abbreviations and synonyms found in zoo
bundles names the table entry directly. A name that still matches nothing is for the
caller to describe generically.
"""

from __future__ import annotations

import csv
import functools
import re
from dataclasses import dataclass
from importlib import resources

from pydicom.sr.coding import Code

#: The vendored TotalSegmentator table (package data).
TABLE = "totalsegmentator_snomed_mapping.csv"
#: Structures the zoo's bundles name that TotalSegmentator's table lacks, in its form.
ADDITIONS = "additional_structures.csv"

#: Segmented Property Category "Anatomical Structure". The TotalSegmentator table (like
#: older tools) writes SCT 123037004 for it, which SNOMED CT now calls "Body structure";
#: DICOM CID 7150 lists SCT 91723000 for "Anatomical Structure", so that code is used.
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
_OLD_ANATOMICAL_STRUCTURE = "123037004"

#: Type modifiers that are a laterality (CID 244), as opposed to e.g. "COVID-19".
LATERALITY_CODES = frozenset({"7771000", "24028007", "51440002", "66459002"})

# Word-level folding applied to table names and model names alike: plurals, spellings.
_WORDS = {
    "kideny": "kidney",
    "kidnye": "kidney",
    "kidneys": "kidney",
    "veins": "vein",
    "arteries": "artery",
    "vertebra": "vertebrae",
    "ribs": "rib",
    "glands": "gland",
    "lobes": "lobe",
    "lungs": "lung",
    "oesophagus": "esophagus",
    "esophagous": "esophagus",
    "oesophagous": "esophagus",
    "adrenals": "adrenal",
    "suprarenal": "adrenal",
    "l": "left",
    "lt": "left",
    "r": "right",
    "rt": "right",
}

# Names that no word folding turns into a table name: abbreviations and synonyms found in
# zoo bundles and common in radiology. Keys are matched after the same normalisation.
_ALIASES = {
    "ivc": "inferior_vena_cava",
    "postcava": "inferior_vena_cava",
    "svc": "superior_vena_cava",
    "gall bladder": "gallbladder",
    "bladder": "urinary_bladder",
    "small intestine": "small_bowel",
    "large bowel": "colon",
    "large intestine": "colon",
    "portal vein splenic vein": "portal_vein_and_splenic_vein",
    "portal splenic vein": "portal_vein_and_splenic_vein",
    "left adrenal": "adrenal_gland_left",
    "right adrenal": "adrenal_gland_right",
    "adrenal": "adrenal_gland",
    "myocardium": "heart_myocardium",
    "lumbar vertebrae": "vertebrae_lumbar",
    "thoracic vertebrae": "vertebrae_thoracic",
    "cervical vertebrae": "vertebrae_cervical",
}


@dataclass(frozen=True)
class StructureCodes:
    """One row of the table: how DICOM codes a structure and how it is shown.

    Attributes
    ----------
    structure:
        The TotalSegmentator name, e.g. ``kidney_left``.
    category, type:
        Segmented Property Category and Type (SCT).
    type_modifier:
        Segmented Property Type Modifier, e.g. SCT 7771000 "Left"; None where there is none.
    anatomic_region, anatomic_region_modifier:
        Where a finding lies (a kidney cyst: "Kidney", "Left"); None for anatomy.
    color_rgb:
        Recommended display colour, 8-bit RGB.
    """

    structure: str
    category: Code
    type: Code
    type_modifier: Code | None
    anatomic_region: Code | None
    anatomic_region_modifier: Code | None
    color_rgb: tuple[int, int, int]

    @property
    def laterality(self) -> Code | None:
        """The type modifier when it is a laterality (left, right...), else None."""
        modifier = self.type_modifier
        return modifier if modifier is not None and modifier.value in LATERALITY_CODES else None


def name_key(name: str) -> frozenset[str]:
    """The words of ``name``, folded: what two spellings of one structure share.

    ``"Left Kideny"``, ``"kidney_left"`` and ``"KIDNEY-LEFT"`` all give
    ``{"kidney", "left"}``. camelCase is split; a letter glued to digits (the L1 of
    "vertebrae_L1") stays one word, so that it is not read as "left" and "1".
    """
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    words = re.findall(r"[a-z]\d+|[a-z]+|\d+", spaced.lower())
    return frozenset(_WORDS.get(w, w) for w in words if w != "and")


def _code(row: dict[str, str], prefix: str) -> Code | None:
    value = row[f"{prefix}.CodeValue"].strip()
    if not value:
        return None
    return Code(
        value, row[f"{prefix}.CodingSchemeDesignator"].strip(), row[f"{prefix}.CodeMeaning"].strip()
    )


def _row_codes(row: dict[str, str]) -> StructureCodes:
    category = _code(row, "SegmentedPropertyCategoryCodeSequence")
    if category is None or category.value == _OLD_ANATOMICAL_STRUCTURE:
        category = ANATOMICAL_STRUCTURE
    kind = _code(row, "SegmentedPropertyTypeCodeSequence")
    if kind is None:
        raise ValueError(f"{TABLE}: {row['Structure']!r} has no Segmented Property Type")
    r, g, b = (int(v) for v in row["DicomRGBColor"].split(","))
    return StructureCodes(
        structure=row["Structure"].strip(),
        category=category,
        type=kind,
        type_modifier=_code(row, "SegmentedPropertyTypeModifierCodeSequence"),
        anatomic_region=_code(row, "AnatomicRegionSequence"),
        anatomic_region_modifier=_code(row, "AnatomicRegionModifierSequence"),
        color_rgb=(r, g, b),
    )


def read_table_rows(table: str = TABLE) -> list[dict[str, str]]:
    """A table of ``data/`` (the vendored one by default) as CSV rows (column name ->
    text), in file order."""
    text = resources.files("dicom_node.encode").joinpath("data", table).read_text("utf-8")
    return list(csv.DictReader(text.splitlines()))


@functools.cache
def structures() -> dict[str, StructureCodes]:
    """Every structure of the two tables by its name (read once)."""
    table = {entry.structure: entry for entry in map(_row_codes, read_table_rows())}
    for entry in map(_row_codes, read_table_rows(ADDITIONS)):
        if entry.structure in table:
            raise ValueError(f"{ADDITIONS}: {entry.structure!r} is in {TABLE} already")
        table[entry.structure] = entry
    return table


@functools.cache
def _by_key() -> dict[frozenset[str], str]:
    index: dict[frozenset[str], str] = {}
    for structure in structures():
        key = name_key(structure)
        if key in index:  # two table names one spelling could mean: a bug in the folding
            raise ValueError(f"{structure!r} and {index[key]!r} have the same words")
        index[key] = structure
    for alias, structure in _ALIASES.items():
        index.setdefault(name_key(alias), structure)
    return index


def canonical_structure(name: str) -> str | None:
    """The TotalSegmentator name ``name`` means, or None when it matches none."""
    return _by_key().get(name_key(name))


def lookup(name: str) -> StructureCodes | None:
    """Codes and colour of the structure a model calls ``name``, or None when unknown."""
    structure = canonical_structure(name)
    return None if structure is None else structures()[structure]
