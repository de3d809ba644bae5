"""Sanity of the values a CT image's pixels and geometry hang on.

A header can be well formed and still meaningless: a Rescale Slope of 0 or 1e308, a Pixel
Spacing of 0 or NaN, 1 or 64 Bits Allocated. Unchecked, such values reach inference and give a
"done" series with an empty segmentation, or fail later as an internal error. The checks
here name the attribute and say what is wrong with it, and run twice:

* at C-STORE (:func:`dicom_node.intake.checks.check_image`), on each instance, which is
  refused with 0xA900 (Data Set does not match SOP Class: the CT Image IOD does not allow
  the value);
* at assembly (:mod:`dicom_node.series.volume`), on every instance of a series, so that files
  registered from the spool after a crash, or under other limits, fail their job with the same reason before inference.

What only a series can show (two Frames of Reference, mixed sizes) is checked at assembly.

Beyond finite, the geometry and rescale values must be physically possible, or a series of
them gives a volume of nothing (a Pixel Spacing of 1e30 mm makes every organ 0.0 mL, one of
1e-30 mm a volume no network sees anything in). The bounds, and what they rest on:

* a length (Pixel Spacing, Slice Thickness, Spacing Between Slices) from 1 µm, the finest
  micro-CT voxels, to 1 m: no CT reconstructs a field of view, nor covers along the table
  in one slice, anything near it (clinical fields of view reach 700 mm, wide detectors
  160 mm);
* a position within 100 m of the Frame of Reference's origin: scanners put that origin at
  the table or the isocentre, a few metres at most from any slice, and at 100 m a float32
  (as MONAI keeps an affine) still resolves 0.008 mm;
* a modality LUT that spans at least 1 HU over the stored range: the Hounsfield scale puts
  air at -1000 and water at 0 and CT noise is several HU, so an image whose every stored
  value rescales into less than one HU (a Rescale Slope of 1e-300) carries no CT at all;
  and none beyond 1,000,000 HU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from pydicom.dataset import Dataset

#: A rescaled CT value beyond this is no Hounsfield unit (metal artefact reduction and
#: extended scales reach some 30,000 HU).
MAX_ABS_HU = 1_000_000.0
#: The least span, in HU, of a stored range's rescaled values (see the module).
MIN_RESCALED_SPAN_HU = 1.0
#: Pixel Spacing, Slice Thickness and Spacing Between Slices, in mm (see the module).
MIN_LENGTH_MM = 1e-3
MAX_LENGTH_MM = 1000.0
#: Image Position (Patient): no coordinate beyond this, in mm (see the module).
MAX_POSITION_MM = 100_000.0
#: Image Orientation (Patient): direction cosines unit length and orthogonal within this.
_COSINE_TOLERANCE = 1e-3


class InvalidValue(ValueError):
    """An attribute value that makes no sense in a CT image; the message names it."""


def _number(value: object, keyword: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidValue(f"{keyword} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise InvalidValue(f"{keyword} {value} is not a finite number")
    return number


def _numbers(value: object, keyword: str, count: int) -> list[float]:
    iterable = hasattr(value, "__iter__") and not isinstance(value, (str, bytes))
    values = list(value) if iterable else [value]  # type: ignore[call-overload]
    if len(values) != count:
        raise InvalidValue(f"{keyword} has {len(values)} values, not {count}")
    return [_number(v, keyword) for v in values]


def _item(seq_owner: Dataset, keyword: str) -> Dataset | None:
    seq = seq_owner.get(keyword)
    return seq[0] if seq else None


def _groups(ds: Dataset) -> Iterator[Dataset]:
    """The data set itself, then its shared and per-frame functional groups (multi-frame)."""
    yield ds
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        yield from ds.get(keyword) or []


def check_pixel_values(ds: Dataset) -> None:
    """Bits Allocated, Bits Stored, Pixel Representation, Samples per Pixel and the
    modality LUT (Rescale Slope and Intercept, top level or in the functional groups)."""
    if "BitsAllocated" in ds:
        bits = ds.BitsAllocated
        if bits != 16:
            raise InvalidValue(f"BitsAllocated {bits} is not 16, as a CT image requires")
    if "BitsStored" in ds:
        stored = ds.BitsStored
        if stored is None or not 1 <= int(stored) <= 16:
            raise InvalidValue(f"BitsStored {stored} is outside 1..BitsAllocated (16)")
    representation = ds.get("PixelRepresentation") or 0
    if representation not in (0, 1):
        raise InvalidValue(f"PixelRepresentation {representation} is not 0 or 1")
    samples = ds.get("SamplesPerPixel", 1)
    if samples not in (1, None):
        raise InvalidValue(f"SamplesPerPixel {samples} is not 1, as a CT image requires")
    stored = int(ds.get("BitsStored") or 16)
    if representation == 1:
        low, high = -(2 ** (stored - 1)), 2 ** (stored - 1) - 1
    else:
        low, high = 0, 2**stored - 1
    for group in _groups(ds):
        lut = _item(group, "PixelValueTransformationSequence") if group is not ds else ds
        if lut is None:
            continue
        slope = intercept = None
        if lut.get("RescaleSlope") is not None:
            slope = _number(lut.RescaleSlope, "RescaleSlope")
            if slope == 0:
                raise InvalidValue("RescaleSlope 0 maps every pixel to one value")
        if lut.get("RescaleIntercept") is not None:
            intercept = _number(lut.RescaleIntercept, "RescaleIntercept")
        s, b = (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)
        extreme = max(abs(s * low + b), abs(s * high + b))
        if not extreme <= MAX_ABS_HU:
            raise InvalidValue(
                f"RescaleSlope {s:g}, RescaleIntercept {b:g}: {stored}-bit pixels "
                f"rescale beyond {MAX_ABS_HU:g} HU"
            )
        span = abs(s) * (high - low)
        if span < MIN_RESCALED_SPAN_HU:
            raise InvalidValue(
                f"RescaleSlope {s:g}: every {stored}-bit pixel rescales into {span:.2g} HU, "
                f"less than {MIN_RESCALED_SPAN_HU:g} HU"
            )


def check_geometry_values(ds: Dataset) -> None:
    """Pixel Spacing, Slice Thickness, Spacing Between Slices, Image Orientation (Patient)
    and Image Position (Patient), where present (top level or in the functional groups):
    finite, lengths and positions within physical bounds (see the module), orientation two
    orthogonal unit vectors."""
    for group in _groups(ds):
        measures = _item(group, "PixelMeasuresSequence") if group is not ds else ds
        if measures is not None and measures.get("PixelSpacing") is not None:
            spacing = _numbers(measures.PixelSpacing, "PixelSpacing", 2)
            if min(spacing) <= 0:
                raise InvalidValue(f"PixelSpacing ({spacing[0]:g}, {spacing[1]:g}) is not positive")
            if not all(MIN_LENGTH_MM <= v <= MAX_LENGTH_MM for v in spacing):
                raise InvalidValue(
                    f"PixelSpacing ({spacing[0]:g}, {spacing[1]:g}) is outside "
                    f"{MIN_LENGTH_MM:g}..{MAX_LENGTH_MM:g} mm"
                )
        if measures is not None:
            for keyword in ("SliceThickness", "SpacingBetweenSlices"):
                if measures.get(keyword) not in (None, ""):
                    _check_length(measures.get(keyword), keyword)
        plane = _item(group, "PlaneOrientationSequence") if group is not ds else ds
        if plane is not None and plane.get("ImageOrientationPatient") is not None:
            cosines = _numbers(plane.ImageOrientationPatient, "ImageOrientationPatient", 6)
            row, col = cosines[:3], cosines[3:]
            norms = [math.sqrt(sum(v * v for v in u)) for u in (row, col)]
            dot = sum(a * b for a, b in zip(row, col, strict=True))
            if max(abs(n - 1) for n in norms) > _COSINE_TOLERANCE or abs(dot) > _COSINE_TOLERANCE:
                raise InvalidValue("ImageOrientationPatient is not two orthogonal unit vectors")
        position = _item(group, "PlanePositionSequence") if group is not ds else ds
        if position is not None and position.get("ImagePositionPatient") is not None:
            xyz = _numbers(position.ImagePositionPatient, "ImagePositionPatient", 3)
            if max(abs(v) for v in xyz) > MAX_POSITION_MM:
                raise InvalidValue(
                    f"ImagePositionPatient ({xyz[0]:g}, {xyz[1]:g}, {xyz[2]:g}) lies beyond "
                    f"{MAX_POSITION_MM:g} mm of the origin"
                )


def _check_length(value: object, keyword: str) -> None:
    """A slice thickness or spacing: finite, within MIN_LENGTH_MM..MAX_LENGTH_MM."""
    length = _number(value, keyword)
    if not MIN_LENGTH_MM <= length <= MAX_LENGTH_MM:
        raise InvalidValue(
            f"{keyword} {length:g} is outside {MIN_LENGTH_MM:g}..{MAX_LENGTH_MM:g} mm"
        )


def check_image_values(ds: Dataset) -> None:
    """Both checks above; raises :class:`InvalidValue` naming the first bad attribute."""
    check_pixel_values(ds)
    check_geometry_values(ds)
