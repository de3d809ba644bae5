"""When is a series complete? The evidence of its slice headers, checked at a release.

DICOM has no "end of series" message. A sender that pushes a series over one association and
releases it normally has, in practice, sent all it had; if its slices then stack into a
volume without a gap (and match the count the modality wrote, where it wrote one), waiting
any longer only delays the result. So at each normal release (pynetdicom's
``EVT_RELEASED``; never an abort) the node asks :func:`gap_free` of every series the
association carried whole (every instance the series holds came over it), and completes
those that pass. Everything else (a gap, a sender that aborted, a series spread over several
associations) is left to the settle timer: complete ``settle_seconds`` after its last
instance, as before.

The check reads no file: each instance's few geometry attributes are taken from the
dataset the C-STORE handler parsed anyway (:func:`slice_geometry`) and kept beside the
instance in the job database, so a release costs one query and some arithmetic.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.series.volume import VolumeError, check_spacing

#: The rules that complete a series, as recorded on its job (``completed_by``).
RELEASED = "association released"
SETTLE_TIMER = "settle timer"

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
        without one (a database written before this rule existed)."""
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


def gap_free(slices: Sequence[SliceGeometry | None]) -> bool:
    """Whether these instances of one series form a whole volume by their headers alone.

    True for one multi-frame instance (an Enhanced CT carries the whole series), and for
    single-frame slices of one size and orientation whose positions are evenly spaced
    along the slice normal, with as many slices as a stated Images in Acquisition. The
    spacing test is the assembler's own (:func:`dicom_node.series.volume.check_spacing`): a
    series complete by this rule and one assembly accepts agree on what a gap is. Gantry
    tilt is not judged here: a tilted series is complete, and fails at assembly with its
    reason.
    """
    if not slices or any(s is None for s in slices):
        return False
    known: list[SliceGeometry] = [s for s in slices if s is not None]
    if any(s.frames > 1 for s in known):
        return len(known) == 1
    if any(s.position is None or s.orientation is None for s in known):
        return False
    if len({(s.rows, s.columns) for s in known}) > 1:
        return False
    orientations = {tuple(round(v, 4) for v in s.orientation or ()) for s in known}
    if len(orientations) > 1:
        return False
    counts = {s.expected for s in known if s.expected is not None}
    if counts and counts != {len(known)}:
        return False
    orientation = np.array(next(iter(orientations)), dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    along = np.sort(np.array([s.position for s in known], dtype=float) @ normal)
    try:
        check_spacing(np.diff(along))
    except VolumeError:
        return False
    return True
