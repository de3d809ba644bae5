"""A volume handed over to the pipeline is gone by the time the network runs; the node hands
its volume over to an in-process backend, and the labels are the same."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from dicom_node.common.heap import discard_leading, empty_volume
from dicom_node.config import PROJECT_ROOT
from dicom_node.inference.local import LocalBackend
from dicom_node.pipeline import HandOver
from dicom_node_testing.phantom import make_phantom

BUNDLE = PROJECT_ROOT / "bundles" / "spleen_ct_demo"


@pytest.fixture(scope="module")
def backend():
    return LocalBackend(BUNDLE, "cpu")


def test_a_handed_over_volume_is_freed_before_inference(backend):
    ph = make_phantom(shape=(24, 64, 64), spacing=(5.0, 4.0, 4.0), seed=2)
    expected = backend.segment(ph.hu.copy(), ph.affine).labels
    volume = ph.hu.copy()
    alive = weakref.ref(volume)
    network = backend.pipeline.network
    seen = []

    def predictor(patches):
        gc.collect()
        seen.append(alive() is None)  # the volume, during inference
        return network(patches)

    handed = HandOver(volume)
    del volume
    result = backend.pipeline.run(handed, ph.affine, predictor=predictor, contours=False)
    assert seen and all(seen)
    np.testing.assert_array_equal(result.labels, expected)
    with pytest.raises(RuntimeError, match="handed over already"):
        handed.take()


def test_a_volume_passed_as_an_array_stays_with_its_caller(backend):
    ph = make_phantom(shape=(24, 64, 64), spacing=(5.0, 4.0, 4.0), seed=2)
    volume = ph.hu.copy()
    backend.segment(volume, ph.affine)
    np.testing.assert_array_equal(volume, ph.hu)  # untouched, still usable for a retry


def test_a_handed_over_volume_of_its_own_pages_is_given_back_as_it_is_read(backend):
    """In the node's own allocation (heap.empty_volume) the handed-over volume's pages go
    slab by slab during the preprocessing; the labels are those of an untouched copy."""
    import dicom_node.pipeline.preprocess as preprocess

    ph = make_phantom(shape=(150, 32, 32), spacing=(1.0, 6.0, 6.0), seed=3)
    expected = backend.segment(ph.hu.copy(), ph.affine).labels
    volume = empty_volume(ph.hu.shape, ph.hu.dtype)
    volume[:] = ph.hu
    given_back: list[tuple[int, int]] = []
    real = preprocess.discard_leading

    def watching(array, count):
        given_back.append((count, real(array, count)))
        return given_back[-1][1]

    slab = preprocess._SLAB_BYTES
    preprocess.discard_leading = watching
    preprocess._SLAB_BYTES = 4 * 32 * 32 * 50  # three slabs of 50 slices
    try:
        result = backend.pipeline.run(HandOver(volume), ph.affine, contours=False)
    finally:
        preprocess.discard_leading, preprocess._SLAB_BYTES = real, slab
    assert [count for count, _ in given_back] == [50, 100, 150]
    assert all(nbytes > 0 for _, nbytes in given_back)
    assert expected.any()  # the spleen is found: the labels compared say something
    np.testing.assert_array_equal(result.labels, expected)
    assert not volume.any()  # read as zeros: the pages went back


def test_empty_volume_and_discard_leading():
    volume = empty_volume((6, 256, 256), np.int16)  # 128 KiB a slice, whole pages
    assert volume.shape == (6, 256, 256) and volume.dtype == np.int16
    volume[:] = 7
    assert discard_leading(volume, 2) == 2 * 256 * 256 * 2
    assert not volume[:2].any() and (volume[2:] == 7).all()
    # a view that starts mid-way gives back only its own whole pages
    assert discard_leading(volume[3:], 1) == 256 * 256 * 2
    assert (volume[2] == 7).all() and not volume[3].any() and (volume[4:] == 7).all()
    # memory of another kind is left alone
    ordinary = np.full((6, 256, 256), 7, np.int16)
    assert discard_leading(ordinary, 6) == 0 and (ordinary == 7).all()
