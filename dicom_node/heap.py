"""Exempt a long-running process's start-up objects from the cyclic garbage collector.

The node, and each Triton model instance, import and build at start what they keep until
they end: torch, MONAI, pydicom's and highdicom's dictionaries, hundreds of thousands of
objects. Each full collection walked them all again, tens of milliseconds that fell in the
middle of a series' preprocessing or encoding. Frozen (:func:`gc.freeze`), they are left
out of collections; garbage made later is collected as before.
"""

from __future__ import annotations

import gc

__all__ = ["freeze_heap"]


def freeze_heap() -> None:
    """Collect what start-up left over, then freeze everything still alive."""
    gc.collect()
    gc.freeze()
