"""Preview images of a finished job: key CT slices with the segmentation's outline drawn on.

An operator checks at a glance that the node segmented the right organ in the right place.
The previews are drawn from what the node actually sends (the stored CT and the SEG read
back with highdicom), not from the model's in-memory output, so a preview that looks right
means the SEG file is right. Each segment is outlined in the colour the SEG recommends for
it, which is also the RTSTRUCT's ROI Display Color.

Previews are cached as PNGs next to the results, in ``results/<series>/previews/``, with an
index naming the SEG they were made from, so a series processed again gets new ones.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import scipy.ndimage
from PIL import Image

from dicom_node.series.volume import SeriesVolume, VolumeError, assemble_series

__all__ = [
    "ABDOMEN_WINDOW",
    "Preview",
    "PreviewError",
    "draw_slice",
    "key_slices",
    "load_previews",
    "make_previews",
    "outline",
    "segment_masks",
]

#: (centre, width) in HU of the abdominal soft-tissue window.
ABDOMEN_WINDOW = (40.0, 400.0)

#: Names of preview files; anything else asked of the preview folder is refused.
PREVIEW_NAME = re.compile(r"^slice-[0-9]{1,5}\.png$")

_INDEX = "index.json"


class PreviewError(Exception):
    """A job's results cannot be previewed (CT or SEG missing or unreadable); says why."""


@dataclass(frozen=True)
class Preview:
    """One preview image: which slice it shows and how large it is in millimetres."""

    filename: str
    slice_index: int
    source_sop_uid: str
    #: Labelled pixels on the slice, per segment number.
    pixels: dict[int, int]
    width_mm: float
    height_mm: float


def key_slices(mask: np.ndarray, count: int = 3) -> list[int]:
    """Indices of ``count`` slices that show a (slices, rows, cols) mask best, in order.

    The slice with the largest labelled area, and the slices at the first and third
    quartile of the labelled extent, so the previews show the middle of the organ and both
    of its ends. Fewer labelled slices give fewer previews; an empty mask gives the middle
    slice, so an operator still sees what the node was sent.
    """
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    labelled = np.flatnonzero(areas)
    if labelled.size == 0:
        return [mask.shape[0] // 2]
    picks = [int(np.argmax(areas))]
    for q in np.linspace(0.25, 0.75, max(count - 1, 1)):
        picks.append(int(labelled[round(q * (labelled.size - 1))]))
    chosen = list(dict.fromkeys(picks))
    for k in labelled:  # a series with few labelled slices: fill up from those there are
        if len(chosen) >= count:
            break
        if int(k) not in chosen:
            chosen.append(int(k))
    return sorted(chosen[:count])


def outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of a 2-D mask that touch the outside (4-neighbourhood): its contour."""
    # The image edge counts as outside, so an organ cut by the field of view stays closed.
    return mask & ~scipy.ndimage.binary_erosion(mask, border_value=0)


def draw_slice(
    hu: np.ndarray,
    masks: Sequence[tuple[np.ndarray, tuple[int, int, int]]],
    window: tuple[float, float] = ABDOMEN_WINDOW,
) -> Image.Image:
    """An RGB image of one (rows, cols) CT slice in ``window``, each mask outlined in colour."""
    centre, width = window
    low = centre - width / 2
    grey = np.clip((hu.astype(np.float64) - low) / width * 255.0, 0, 255).round()
    rgb = np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
    for mask, color in masks:
        rgb[outline(mask.astype(bool))] = color
    return Image.fromarray(rgb, "RGB")


def segment_masks(seg: hd.seg.Segmentation, source: SeriesVolume) -> dict[int, np.ndarray]:
    """Each segment of ``seg`` as a boolean mask on ``source``'s (slices, rows, cols) grid.

    highdicom pairs SEG frames with the source images they reference; slices the SEG does
    not reference (empty slices are left out of it) stay empty.
    """
    numbers = [int(n) for n in seg.segment_numbers]
    out = {n: np.zeros(source.array.shape, bool) for n in numbers}
    referenced = {
        (str(ref.ReferencedSOPInstanceUID), int(ref.get("ReferencedFrameNumber", 0) or 0))
        for frame in seg.get("PerFrameFunctionalGroupsSequence", [])
        for der in frame.get("DerivationImageSequence", [])
        for ref in der.get("SourceImageSequence", [])
    }
    frames = source.frame_numbers or [0] * len(source.source_uids)
    present = [k for k, uid in enumerate(source.source_uids) if (uid, frames[k]) in referenced]
    if not present or not numbers:
        return out
    if source.frame_numbers is None:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[source.source_uids[k] for k in present],
            segment_numbers=numbers,
            assert_missing_frames_are_empty=True,
        )
    else:
        pixels = seg.get_pixels_by_source_frame(
            source_sop_instance_uid=source.source_uids[0],
            source_frame_numbers=[frames[k] for k in present],
            segment_numbers=numbers,
            assert_missing_frames_are_empty=True,
        )
    for i, n in enumerate(numbers):
        out[n][present] = pixels[..., i] > 0
    return out


def _segment_colors(seg: hd.seg.Segmentation) -> dict[int, tuple[int, int, int]]:
    colors = {}
    for item in seg.SegmentSequence:
        lab = item.get("RecommendedDisplayCIELabValue")
        if lab is not None:
            r, g, b = hd.color.CIELabColor.from_dicom_value(tuple(lab)).to_rgb()
            colors[int(item.SegmentNumber)] = (int(r), int(g), int(b))
    return colors


# A segment without a recommended colour (a SEG from elsewhere) is drawn in yellow, which
# no CT grey level takes.
_FALLBACK_COLOR = (255, 255, 0)


def make_previews(
    ct_paths: Sequence[Path], seg_path: Path, out_dir: Path, count: int = 3
) -> list[Preview]:
    """Draw ``count`` key slices of the CT with the SEG's outlines into ``out_dir``.

    Returns the previews in slice order; they and an index are written to ``out_dir``,
    replacing any made from an earlier SEG of the series.
    """
    try:
        source = assemble_series(list(ct_paths), min_slices=1)
    except (VolumeError, OSError) as exc:
        raise PreviewError(f"the stored CT cannot be read: {exc}") from None
    try:
        seg = hd.seg.segread(seg_path)
    except (OSError, ValueError, AttributeError, pydicom.errors.InvalidDicomError) as exc:
        raise PreviewError(f"the SEG {Path(seg_path).name} cannot be read: {exc}") from None
    masks = segment_masks(seg, source)
    colors = _segment_colors(seg)
    union = np.zeros(source.array.shape, bool)
    for m in masks.values():
        union |= m
    # Row and column spacing: the length of the affine's row and column steps (LPS mm).
    row_mm = float(np.linalg.norm(source.affine[:3, 1]))
    col_mm = float(np.linalg.norm(source.affine[:3, 2]))
    rows, cols = source.array.shape[1:]
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for old in out_dir.glob("slice-*.png"):
        old.unlink(missing_ok=True)
    previews = []
    for k in key_slices(union, count):
        image = draw_slice(
            source.array[k],
            [(m[k], colors.get(n, _FALLBACK_COLOR)) for n, m in sorted(masks.items())],
        )
        name = f"slice-{k:05d}.png"
        _write_atomically(out_dir / name, _png(image))
        previews.append(
            Preview(
                filename=name,
                slice_index=k,
                source_sop_uid=source.source_uids[k],
                pixels={n: int(m[k].sum()) for n, m in sorted(masks.items())},
                width_mm=cols * col_mm,
                height_mm=rows * row_mm,
            )
        )
    index = {"seg_sop_uid": str(seg.SOPInstanceUID), "previews": [asdict(p) for p in previews]}
    _write_atomically(out_dir / _INDEX, json.dumps(index, indent=1).encode())
    return previews


def load_previews(out_dir: Path, seg_sop_uid: str) -> list[Preview] | None:
    """The cached previews in ``out_dir`` if they were made from SEG ``seg_sop_uid``."""
    try:
        index = json.loads((out_dir / _INDEX).read_text())
    except (FileNotFoundError, ValueError):
        return None
    if index.get("seg_sop_uid") != seg_sop_uid:
        return None
    previews = []
    for p in index.get("previews", []):
        p["pixels"] = {int(n): int(v) for n, v in p["pixels"].items()}
        previews.append(Preview(**p))
    if not all((out_dir / p.filename).is_file() for p in previews):
        return None
    return previews


def _png(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _write_atomically(path: Path, data: bytes) -> None:
    """Write by rename, so a page loaded meanwhile never sees half a PNG (a cache: no fsync)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
