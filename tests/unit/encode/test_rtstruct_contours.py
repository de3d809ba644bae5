"""The RTSTRUCT's contours: traced in arrays, the polygons of scikit-image's marching squares.

``trace_contours`` chains marching-squares segments into polygons with array operations;
the reference is :func:`skimage.measure.find_contours` itself (level 0.5, background fully
connected, counter-clockwise around the label), slice by slice: the same polygons, vertex
for vertex once both drop the vertices where they do not turn.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
import scipy.ndimage as ndi
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian
from skimage.measure import find_contours

from dicom_node.encode.rtstruct import (
    _CONTOUR_DATA,
    _encoded,
    _item,
    selected_contours,
    trace_contours,
)


def canonical(polygon: np.ndarray) -> tuple:
    """A polygon without straight-run vertices, starting at its first vertex in raster order."""
    before = polygon - np.roll(polygon, 1, axis=0)
    after = np.roll(polygon, -1, axis=0) - polygon
    polygon = polygon[np.abs(before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) > 1e-9]
    first = np.lexsort((polygon[:, 1], polygon[:, 0]))[0]
    return tuple(map(tuple, np.roll(polygon, -first, axis=0)))


def signed_area(polygon: np.ndarray) -> float:
    rows, cols = polygon[:, 0], polygon[:, 1]
    return 0.5 * float(np.dot(rows, np.roll(cols, -1)) - np.dot(cols, np.roll(rows, -1)))


def masks(seed: int) -> np.ndarray:
    """Slices of blobs with holes, islands, one-pixel necks and diagonal touches."""
    rng = np.random.default_rng(seed)
    out = np.zeros((5, 37, 53), dtype=bool)
    for k in range(len(out)):
        sigma = 0.6 + 0.5 * k
        out[k] = ndi.gaussian_filter(rng.standard_normal(out.shape[1:]), sigma) > 0.1
    out[0, 0, :] = True  # touching the edge
    out[1] = False  # an empty slice
    out[2, 10:13, 10:13] = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]  # diagonal only: three islands
    return out


@pytest.mark.parametrize("seed", range(4))
def test_the_polygons_are_find_contours_own(seed):
    mask = masks(seed)
    polygons = trace_contours(mask)
    assert len(polygons) > 20
    for k in range(len(mask)):
        padded = np.pad(mask[k], 1).astype(np.float32)
        theirs = [
            c[:-1] - 1
            for c in find_contours(padded, 0.5, fully_connected="low", positive_orientation="high")
        ]
        ours = [polygons.vertices_of(i) for i in np.flatnonzero(polygons.slices == k)]
        assert sorted(map(canonical, ours)) == sorted(map(canonical, theirs)), k
        # counter-clockwise around the label, clockwise around a hole: the signs agree
        assert sorted(signed_area(p) for p in ours) == pytest.approx(
            sorted(signed_area(p) for p in theirs)
        )
        np.testing.assert_allclose(
            sorted(polygons.areas()[polygons.slices == k]),
            sorted(abs(signed_area(p)) for p in theirs),
        )


def test_no_label_no_polygon():
    polygons = trace_contours(np.zeros((3, 8, 8), dtype=bool))
    assert len(polygons) == 0 and polygons.vertices.shape == (0, 2)


def test_selection_keeps_the_largest_per_slice_above_the_minimum():
    rng = np.random.default_rng(0)
    slices = rng.integers(0, 6, 300)
    areas = rng.choice([1.0, 2.0, 5.0, 9.0, 30.0], 300)  # ties: the first traced wins
    for minimum, cap in ((0.0, 3), (4.0, 0), (4.0, 2), (0.0, 0)):
        keep = selected_contours(slices, areas, minimum, cap)
        expected = np.zeros(300, dtype=bool)
        for k in range(6):
            on = [i for i in np.flatnonzero(slices == k) if areas[i] >= minimum]
            on.sort(key=lambda i: (-areas[i], i))
            expected[on[:cap] if cap else on] = True
        assert np.array_equal(keep, expected), (minimum, cap)


def test_contour_data_longer_than_64_kb_is_written_as_un_and_reads_back():
    """PS3.5 6.2.2: a value too long for an explicit VR's 16-bit length is written UN, as
    pydicom itself writes it; the text reads back unchanged."""
    values = np.round(np.linspace(-400, 400, 3 * 4000), 4)
    text = "\\".join(repr(v) for v in values).encode()
    assert len(text) > 0xFFFF
    element = _encoded(_CONTOUR_DATA, "DS", text)
    assert element[4:6] == b"UN"
    roi = Dataset()
    roi.ReferencedROINumber = 1
    contours = _item(element + _encoded(0x30060046, "IS", b"4000"))
    roi.add(pydicom.dataelem.RawDataElement(
        pydicom.tag.Tag(0x30060040), "SQ", len(contours), contours, 0, False, True
    ))  # fmt: skip
    roi.set_original_encoding(False, True, "iso8859")
    ds = Dataset()
    ds.ROIContourSequence = Sequence([roi])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    read = pydicom.dcmread(io.BytesIO(buffer.getvalue()), force=True)
    (contour,) = read.ROIContourSequence[0].ContourSequence
    assert contour.NumberOfContourPoints == 4000
    data = contour[_CONTOUR_DATA]
    assert data.VR == "UN"
    read_back = np.array(data.value.decode().strip().split("\\"), dtype=float)
    np.testing.assert_array_equal(read_back, values)
