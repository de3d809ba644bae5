"""highdicom's tables of the standard, as the node keeps them: lookups remembered, the module
table read at start with its strings shared, every answer highdicom's own."""

from __future__ import annotations

import json
import pkgutil

from highdicom import _standard_utils as std

from dicom_node.common.standard_tables import load_standard_tables, remember_iod_lookups


def test_remembered_iod_lookups_answer_as_highdicom_does():
    remember_iod_lookups()
    remember_iod_lookups()  # twice: wrapped once
    original = std.is_attribute_in_iod.__wrapped__
    assert not hasattr(original, "__wrapped__")
    ct, seg = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.66.4"
    for args in [
        ("NumberOfFrames", ct, None),
        ("NumberOfFrames", seg, None),
        ("PixelData", ct, ["IconImageSequence"]),
        ("SegmentSequence", ct, None),
    ]:
        for _ in range(2):  # the second answer comes from memory
            assert std.is_attribute_in_iod(*args) == original(*args), args
    assert std.is_attribute_in_iod("NumberOfFrames", seg) is True
    assert std.is_attribute_in_iod("NumberOfFrames", ct) is False


def test_the_module_table_is_highdicoms_own_with_its_strings_shared():
    load_standard_tables()
    load_standard_tables()  # again: nothing changes
    table = std.get_module_attribute_map()
    published = json.loads(pkgutil.get_data("highdicom", "_standard/module_attribute_map.json"))
    assert table == published  # the same table, value for value
    # one string object for each keyword, however many modules list it
    keywords = [a["keyword"] for attrs in table.values() for a in attrs]
    paths = [p for attrs in table.values() for a in attrs for p in a["path"]]
    assert len({id(k) for k in keywords}) == len(set(keywords)) < len(keywords)
    assert len({id(p) for p in paths}) == len(set(paths)) < len(paths)
