"""highdicom's tables of the DICOM standard, as a long-running node wants them.

highdicom answers "which attributes does this module hold?" and "is this attribute in that
IOD?" from tables of the standard it reads from JSON on first use and keeps for the life of
the process. Two things about that cost a node, and both are settled here, once, rather
than changed in highdicom:

- The module table is a 22 MB JSON file (~100,000 attribute entries) that highdicom keeps
  as 60 MiB of Python objects. Read on first use, that falls in the middle of the first
  series' assembly: 0.2 to 0.4 s on the way to its results, and the file's text and objects on
  top of a whole volume at the series' memory peak. The node calls
  :func:`load_standard_tables` when it starts instead (0.3 s, before it listens), which also
  shares the table's repeated strings: each keyword, type and path element becomes one
  interned string rather than one per module that lists it, 27 MiB in all. (Sharing them
  only after the first series would free little: the freed strings' memory stays with the
  objects around it.)
- ``is_attribute_in_iod`` walks those tables for every source image, through
  ``is_multiframe_image``, when a volume is planned and again when a SEG is built: 0.3 ms
  a time, some 0.12 s for a 200-slice series, for an answer that depends only on its
  arguments. :func:`remember_iod_lookups` makes it remember its answers.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

__all__ = ["load_standard_tables", "remember_iod_lookups"]

#: Whether :func:`load_standard_tables` has run in this process.
_shared = False


def remember_iod_lookups() -> None:
    """Make highdicom's "is this attribute in that IOD?" lookup remember its answers.

    The wrapped function is kept as ``__wrapped__``; calling this again does nothing.
    """
    from highdicom import _standard_utils as std

    lookup = std.is_attribute_in_iod
    if hasattr(lookup, "__wrapped__"):
        return

    @functools.lru_cache(maxsize=1024)
    def cached(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
        return lookup(attribute, sop_class_uid, list(exclude) if exclude is not None else None)

    @functools.wraps(lookup)
    def is_attribute_in_iod(
        attribute: str, sop_class_uid: str, exclude_path_elements: Sequence[str] | None = None
    ) -> bool:
        exclude = tuple(exclude_path_elements) if exclude_path_elements is not None else None
        return cached(attribute, str(sop_class_uid), exclude)

    std.is_attribute_in_iod = is_attribute_in_iod


def load_standard_tables() -> None:
    """Read highdicom's tables of the standard now, the module table's strings shared.

    The tables are highdicom's own cached objects (``get_module_attribute_map`` and
    friends); only their strings are swapped for equal, interned ones, so every lookup
    answers as before. Calling this again does nothing.
    """
    global _shared
    if _shared:
        return
    _shared = True
    from highdicom import _standard_utils as std

    std.get_sop_class_iod_map()
    std.get_iod_module_map()
    intern = sys.intern
    for attributes in std.get_module_attribute_map().values():
        for attribute in attributes:
            for key, value in attribute.items():
                if isinstance(value, str):
                    attribute[key] = intern(value)
                elif isinstance(value, list):
                    value[:] = [intern(v) if isinstance(v, str) else v for v in value]
