"""A volume handed over to the pipeline is gone by the time the network runs; the node hands
its volume over to an in-process backend, and the labels are the same."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from dicom_node.config import PROJECT_ROOT
from dicom_node.inference.local import LocalBackend
from dicom_node.phantom import make_phantom
from dicom_node.pipeline import HandOver

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
