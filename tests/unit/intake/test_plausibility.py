"""Pixel and geometry sanity at assembly: series spooled before the C-STORE checks existed
fail before inference, with the attribute named (the C-STORE side is in test_bad_input)."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.intake.plausibility import InvalidValue, check_image_values
from dicom_node.series.volume import VolumeError, plan_single_frame
from dicom_node_testing.synthetic import SeriesAttributes, ct_slice

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR DS")


def _series(n: int = 3) -> list[Dataset]:
    attrs = SeriesAttributes()
    hu = np.zeros((8, 8), np.int16)
    return [
        ct_slice(hu, (0.0, 0.0, 2.0 * k), (1, 0, 0, 0, 1, 0), (0.7, 0.7), 2.0, k + 1, attrs)
        for k in range(n)
    ]


CASES = [
    ("RescaleSlope", "1e308", "RescaleSlope 1e+308, RescaleIntercept -1024"),
    ("RescaleSlope", "0", "RescaleSlope 0 maps every pixel to one value"),
    ("RescaleSlope", "NaN", "RescaleSlope NaN is not a finite number"),
    ("RescaleIntercept", "inf", "RescaleIntercept inf is not a finite number"),
    ("BitsAllocated", 8, "BitsAllocated 8 is not 16"),
    ("BitsAllocated", 64, "BitsAllocated 64 is not 16"),
    ("BitsStored", 0, "BitsStored 0 is outside"),
    ("PixelSpacing", ["0", "0.7"], "PixelSpacing (0, 0.7) is not positive"),
    ("PixelSpacing", ["NaN", "0.7"], "PixelSpacing NaN is not a finite number"),
    ("PixelSpacing", ["0.7"], "PixelSpacing has 1 values, not 2"),
    (
        "ImageOrientationPatient",
        [1, 0, 0, 1, 0, 0],
        "ImageOrientationPatient is not two orthogonal unit vectors",
    ),
    ("ImagePositionPatient", ["0", "nan", "0"], "ImagePositionPatient nan is not a finite"),
    # physically impossible, though finite (the series would end "done" with 0.0 mL)
    ("PixelSpacing", ["1e30", "1e30"], "PixelSpacing (1e+30, 1e+30) is outside 0.001..1000 mm"),
    ("PixelSpacing", ["1e-30", "1e-30"], "PixelSpacing (1e-30, 1e-30) is outside 0.001..1000"),
    ("RescaleSlope", "1e-300", "RescaleSlope 1e-300: every 12-bit pixel rescales into"),
    ("SliceThickness", "NaN", "SliceThickness NaN is not a finite number"),
    ("SliceThickness", "-2", "SliceThickness -2 is outside 0.001..1000 mm"),
    ("SpacingBetweenSlices", "1e30", "SpacingBetweenSlices 1e+30 is outside 0.001..1000 mm"),
    (
        "ImagePositionPatient",
        ["0", "0", "1e300"],
        "ImagePositionPatient (0, 0, 1e+300) lies beyond 100000 mm of the origin",
    ),
]


@pytest.mark.parametrize(
    ("keyword", "value", "reason"), CASES, ids=[f"{c[0]} {c[1]}" for c in CASES]
)
def test_meaningless_value_fails_assembly_naming_it(keyword, value, reason):
    datasets = _series()
    setattr(datasets[1], keyword, value)
    with pytest.raises(VolumeError, match="^instance [0-9.]+: ") as info:
        plan_single_frame(datasets)
    assert reason in str(info.value)
    with pytest.raises(InvalidValue):
        check_image_values(datasets[1])


def test_two_frames_of_reference_fail_before_inference():
    datasets = _series()
    datasets[2].FrameOfReferenceUID = generate_uid()
    with pytest.raises(VolumeError, match="2 different FrameOfReferenceUID values"):
        plan_single_frame(datasets)
    del datasets[2].FrameOfReferenceUID
    with pytest.raises(VolumeError, match="an instance has no FrameOfReferenceUID"):
        plan_single_frame(datasets)


def test_a_sane_series_passes():
    plan = plan_single_frame(_series())
    assert plan.shape == (3, 8, 8)
