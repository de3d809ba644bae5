"""Label counts: a read-only map is counted once for all encoders; a writable one every time."""

import gc

import numpy as np

from dicom_node.encode import labels as labels_module
from dicom_node.encode.labels import label_counts


def _map() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 4, (6, 32, 32)).astype(np.uint8)


def test_read_only_map_is_counted_once_and_forgotten_with_it(monkeypatch):
    labels = _map()
    expected = np.bincount(labels.ravel(), minlength=256)
    labels.flags.writeable = False
    calls = []
    real = labels_module._slice_counts
    monkeypatch.setattr(
        labels_module, "_slice_counts", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    first = label_counts(labels)
    second = label_counts(labels)
    assert len(calls) == 1  # the second call counted nothing
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(second, expected)
    second[1] = -5  # a caller's copy: the cache is not changed through it
    np.testing.assert_array_equal(label_counts(labels), expected)
    key = id(labels)
    del labels
    gc.collect()
    assert key not in labels_module._COUNTED


def test_writable_map_is_counted_afresh():
    labels = _map()
    before = label_counts(labels)
    labels[labels == 1] = 2
    after = label_counts(labels)
    assert after[1] == 0 and after[2] == before[1] + before[2]


def test_slices_are_counted_alike_with_few_values_and_many():
    rng = np.random.default_rng(1)
    for values in ([0, 1], [0, 2, 4], [3], [0, 1, 5, 200], list(range(105))):
        labels = rng.choice(np.array(values, dtype=np.uint8), (5, 16, 24))
        expected = np.stack([np.bincount(p.ravel(), minlength=256) for p in labels])
        np.testing.assert_array_equal(labels_module._slice_counts(labels), expected)
