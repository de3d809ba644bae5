"""What the C-STORE handler records of each instance's geometry, for completion.

Read from the data set the handler parsed anyway and kept beside the instance in the job
database, so that the completion check at an association's release reads no file
(:mod:`dicom_node.series.completion`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
from pydicom.dataset import Dataset

__all__ = ["SliceGeometry", "slice_geometry"]

#: Attributes in which a modality states how many images make the set: Images in
#: Acquisition (0020,1002) for CT, Number of Slices (0054,0081) in the NM/PET style.
_COUNT_KEYWORDS = ("ImagesInAcquisition", "NumberOfSlices")


@dataclass(frozen=True)
class SliceGeometry:
    """What the completion rule needs of one instance; ``None`` where it is absent or
    unreadable (such an instance never counts as evidence of completeness).

    Attributes
    ----------
    position, orientation:
        Image Position (Patient) and Image Orientation (Patient).
    rows, columns:
        The image matrix.
    expected:
        The number of images the modality says the set holds (:data:`_COUNT_KEYWORDS`).
    frames:
        Number of Frames: more than one for an Enhanced CT, which is whole in itself.
    """

    position: tuple[float, ...] | None = None
    orientation: tuple[float, ...] | None = None
    rows: int | None = None
    columns: int | None = None
    expected: int | None = None
    frames: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SliceGeometry | None:
        """The geometry stored by :meth:`to_json`; ``None`` for an instance recorded
        without one."""
        if not text:
            return None
        d = json.loads(text)
        for key in ("position", "orientation"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


def _numbers(ds: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    try:
        value = ds.get(keyword)
        numbers = tuple(float(v) for v in value) if value is not None else ()
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


def _integer(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def slice_geometry(ds: Dataset) -> SliceGeometry:
    """The geometry of one received instance, from its header; never raises.

    Called in the C-STORE handler on the dataset it has already parsed: a handful of
    attribute reads, no pixel data. An attribute pydicom cannot convert makes the whole
    geometry unknown, which only means the settle timer decides for that series.
    """
    try:
        expected = None
        for keyword in _COUNT_KEYWORDS:
            expected = _integer(ds, keyword)
            if expected:
                break
        return SliceGeometry(
            position=_numbers(ds, "ImagePositionPatient", 3),
            orientation=_numbers(ds, "ImageOrientationPatient", 6),
            rows=_integer(ds, "Rows"),
            columns=_integer(ds, "Columns"),
            expected=expected or None,
            frames=_integer(ds, "NumberOfFrames") or 1,
        )
    except Exception:  # noqa: BLE001 - the peer's data; the instance is stored regardless
        return SliceGeometry()
