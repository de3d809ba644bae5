"""The synthetic phantom: anatomy on the right side, plausible densities, reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node_testing.phantom import SPLEEN_LABEL, make_phantom

SHAPE = (40, 96, 96)
SPACING = (5.0, 3.5, 3.5)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(SHAPE, SPACING, seed=3)


def _centroid_lps(phantom, mask: np.ndarray) -> np.ndarray:
    """Centre of ``mask`` in LPS mm, through the affine the DICOM files are written with."""
    index = np.argwhere(mask).mean(axis=0)
    return (phantom.affine @ np.append(index, 1.0))[:3]


def test_arrays_have_the_grid_and_types(phantom):
    assert phantom.hu.shape == SHAPE and phantom.hu.dtype == np.int16
    assert phantom.labels.shape == SHAPE and phantom.labels.dtype == np.uint8
    assert set(np.unique(phantom.labels)) == {0, SPLEEN_LABEL}
    assert np.array_equal(phantom.spleen, phantom.organs["spleen"])
    assert phantom.spacing == SPACING


def test_organs_lie_where_they_belong_in_patient_coordinates(phantom):
    # LPS: +x is the patient's left, +y posterior, +z superior.
    body = _centroid_lps(phantom, phantom.organs["body"])
    spleen = _centroid_lps(phantom, phantom.spleen)
    liver = _centroid_lps(phantom, phantom.organs["liver"])
    left_kidney = _centroid_lps(phantom, phantom.organs["kidney_left"])
    right_kidney = _centroid_lps(phantom, phantom.organs["kidney_right"])
    spine = _centroid_lps(phantom, phantom.organs["spine"])
    stomach = _centroid_lps(phantom, phantom.organs["stomach"])

    assert spleen[0] > body[0] + 40, "spleen on the patient's left"
    assert liver[0] < body[0] - 20, "liver on the patient's right"
    assert spleen[1] > body[1], "spleen posterior"
    assert left_kidney[0] > body[0] > right_kidney[0]
    assert left_kidney[1] > body[1] and right_kidney[1] > body[1], "kidneys posterior"
    assert abs(spine[0] - body[0]) < 10 and spine[1] > left_kidney[1], "spine midline, back"
    assert stomach[1] < spleen[1], "stomach anterior to the spleen"
    assert spleen[2] > right_kidney[2], "spleen above the right kidney"
    # In the array: the spleen at high column indices, the liver at low ones.
    cols = np.arange(SHAPE[2])
    assert cols[np.argwhere(phantom.spleen)[:, 2]].mean() > SHAPE[2] / 2
    assert cols[np.argwhere(phantom.organs["liver"])[:, 2]].mean() < SHAPE[2] / 2


def test_densities_are_those_of_abdominal_ct(phantom):
    hu = phantom.hu.astype(float)

    def median(name: str) -> float:
        return float(np.median(hu[phantom.organs[name]]))

    assert abs(float(np.median(hu[~phantom.organs["body"]])) + 1000) < 25
    assert 35 <= median("spleen") <= 55
    assert 50 <= median("liver") <= 70
    assert median("liver") > median("spleen")
    assert 25 <= median("paraspinal_muscle") <= 50
    assert median("kidney_left") > 100  # enhancing cortex dominates
    assert float(np.percentile(hu[phantom.organs["spine"]], 90)) > 400
    fat = (hu < -40) & phantom.organs["body"]
    assert -130 <= float(np.median(hu[fat])) <= -70
    assert phantom.spleen.sum() * np.prod(SPACING) > 60_000, "a spleen of realistic volume (mm3)"


def test_noise_is_gaussian_of_the_requested_level():
    quiet = make_phantom(SHAPE, SPACING, seed=3, noise=0.0)
    noisy = make_phantom(SHAPE, SPACING, seed=3, noise=10.0)
    diff = noisy.hu.astype(float) - quiet.hu
    inside = quiet.organs["liver"]
    assert np.ptp(quiet.hu[inside]) == 0
    assert 9.0 < diff[inside].std() < 11.0
    assert np.array_equal(quiet.labels, noisy.labels)


def test_same_seed_same_phantom_other_seed_other_phantom():
    a = make_phantom(SHAPE, SPACING, seed=11)
    b = make_phantom(SHAPE, SPACING, seed=11)
    c = make_phantom(SHAPE, SPACING, seed=12)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)
    assert not np.array_equal(a.hu, c.hu)


def test_anatomy_is_in_millimetres_not_voxels():
    coarse = make_phantom((40, 96, 96), (5.0, 3.5, 3.5), seed=5)
    fine = make_phantom((80, 168, 168), (2.5, 2.0, 2.0), seed=5)
    volume_coarse = coarse.spleen.sum() * np.prod(coarse.spacing)
    volume_fine = fine.spleen.sum() * np.prod(fine.spacing)
    assert abs(volume_coarse / volume_fine - 1) < 0.1


def test_invalid_shape_is_refused():
    with pytest.raises(ValueError, match="three positive sizes"):
        make_phantom((10, 0, 10), SPACING)
