"""``python -m bench multiorgan`` keeps working: the 104-label benchmark at a tiny size.

The figures themselves are the benchmark's business; here the label map must hold all 104
classes as compact blobs (not speckle) and every row must carry a number. The end-to-end
case (the zoo's wholeBody network through the node into a real Orthanc) is in
``tests/slow/test_bench_multiorgan_e2e.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from bench import multiorgan
from bench.__main__ import BENCHMARKS

pytestmark = pytest.mark.cost(8)


def test_multiorgan_is_a_benchmark() -> None:
    assert "multiorgan" in BENCHMARKS


def test_the_label_map_is_104_organ_blobs() -> None:
    shape = (40, 96, 96)
    spacing = tuple(f / n for f, n in zip(multiorgan.FIELD_MM, shape, strict=True))
    labels = multiorgan.wholebody_labels(shape, spacing)
    assert labels.dtype == np.uint8 and labels.shape == shape
    counts = np.bincount(labels.ravel(), minlength=105)
    assert (counts[1:] > 0).all() and labels.max() == 104
    # realistic sizes: the liver is the largest organ, adrenal glands among the smallest
    assert counts[5] == counts[1:].max()
    assert counts[11] < np.median(counts[1:])
    # compact: most labels are one connected piece, the rest cut by smaller organs painted
    # over them (a speckled map has hundreds)
    pieces = [ndi.label(labels == v)[1] for v in range(1, 105)]
    assert np.median(pieces) == 1 and max(pieces) < 40, pieces
    assert np.array_equal(labels, multiorgan.wholebody_labels(shape, spacing))  # seeded


def test_encode_rows_at_a_tiny_size(tmp_path) -> None:
    rows = multiorgan.encode_rows(tmp_path, (24, 48, 48), runs=1, ingest=False)
    figures = {r["figure"]: r for r in rows}
    assert rows[0]["figure"].startswith("multiorgan 48x48x24: 104 of 104 wholeBody labels")
    measured = [r for r in rows if r["this_project"] is not None]
    # binary, three label-map formats, RTSTRUCT, SR: size and time each; all three together
    # in the encoder processes and in the node's process
    assert len(measured) == 2 * 6 + 2
    assert all(r["this_project"] > 0 and r["ratio"] is not None for r in measured)
    rle = figures["SEG 104 labels 48x48x24 labelmap rle (peer: binary) size (MB)"]
    assert rle["this_project"] < rle["peer"]  # a compressed label map beats 104 binary masks
    together = [r for r in measured if "as the node makes them" in r["figure"]]
    assert len(together) == 1 and together[0]["peer"] > 0


def test_ingest_while_encoding_at_a_tiny_size(tmp_path) -> None:
    shape = (8, 32, 32)
    spacing = tuple(f / n for f, n in zip(multiorgan.FIELD_MM, shape, strict=True))
    # a dozen organs, the fewest the encoder processes take: quick to encode over and over
    labels = np.zeros(shape, np.uint8)
    for value in range(1, 13):
        labels[:, 2 * value : 2 * value + 2, 4:28] = value
    source = multiorgan._series(shape, spacing, tmp_path / "ct")
    segments = [
        multiorgan.segment_info_for(v, n)
        for v, n in enumerate(multiorgan.WHOLEBODY_LABELS[:12], start=1)
    ]
    rows = multiorgan.ingest_while_encoding_rows(
        tmp_path / "ingest", source, labels, segments, runs=1, slices=4
    )
    assert ["processes" in rows[0]["figure"], "threads" in rows[1]["figure"]] == [True, True]
    assert all(r["this_project"] > 0 and r["peer"] > 0 for r in rows)
