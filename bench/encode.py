"""Encoding results: SEG formats for many labels, and RTSTRUCTs of fragmented label maps.

SEG: a 104-label result (the wholeBody_ct_segmentation labels: 104 organ-sized ellipsoids,
each on ~40 of the slices) and a 1-label result (one spleen-sized ellipsoid) on a
512x512x200 CT series, encoded as binary Segmentation Storage (native; highdicom writes
1-bit frames only natively or as JPEG 2000) and as Label Map Segmentation Storage native,
RLE Lossless and JPEG-LS Lossless. Rows give the object's size in MB and its encoding time
(build + write) in s; the peer is the binary SEG, one frame per segment and slice.

RTSTRUCT: a speckled label map (smoothed noise, thresholded: what an untrained network
gives) on 160x160x40 and 512x512x20 grids, without a per-slice contour cap (the peer) and
with the default cap; and on 512x512x200 with the cap only (without it
the object would be hundreds of MB). Medians of ``BENCH_RUNS`` runs; never asserts a time.
"""

from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

from dicom_node.config import ResultSettings
from dicom_node.encode import AlgorithmInfo, build_rtstruct, build_seg, segment_info_for
from dicom_node.series.volume import SeriesVolume, assemble_series
from dicom_node_testing.synthetic import write_ct_series

RUNS = int(os.environ.get("BENCH_RUNS", "1"))
SHAPE = (200, 512, 512)
SPACING = (1.5, 0.78125, 0.78125)
ALGORITHM = AlgorithmInfo("wholeBody_ct_segmentation", "0.2.0")
SEG_FORMATS = [("labelmap", "none"), ("labelmap", "rle"), ("labelmap", "jpegls")]


def _series(shape: tuple[int, int, int], spacing: tuple[float, float, float], tmp: Path):
    paths = write_ct_series(np.zeros(shape, np.int16), tmp, spacing=spacing, origin=(0, 0, 0))
    source = assemble_series(paths)
    source.release_pixels()
    return source


def organs(shape: tuple[int, int, int], count: int) -> np.ndarray:
    """``count`` labelled ellipsoids on a grid, each ~40 slices deep (label k: value k)."""
    slices, rows, cols = shape
    labels = np.zeros(shape, dtype=np.uint8)
    side = int(np.ceil(np.sqrt(count)))
    cell_r, cell_c = rows // side, cols // side
    zz, rr, cc = np.ogrid[:slices, :cell_r, :cell_c]
    for k in range(count):
        z0 = (k * 37) % max(1, slices - 40) + 20
        r0, c0 = (k // side) * cell_r, (k % side) * cell_c
        blob = (
            ((zz - z0) / 20.0) ** 2
            + ((rr - cell_r / 2) / (cell_r * 0.45)) ** 2
            + ((cc - cell_c / 2) / (cell_c * 0.45)) ** 2
        ) <= 1
        region = labels[:, r0 : r0 + cell_r, c0 : c0 + cell_c]
        region[blob] = k + 1
    return labels


def speckle(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty(shape, dtype=np.uint8)
    for k in range(shape[0]):  # slice by slice: a 512x512x200 float volume is 200 MB
        noise = ndi.gaussian_filter(rng.standard_normal(shape[1:]).astype(np.float32), 1)
        out[k] = noise > 0.3
    return out


def _encode(build, *args) -> tuple[float, float]:
    """(MB, s) of building and writing one object; median time over RUNS."""
    times, size = [], 0
    for _ in range(RUNS):
        t0 = time.perf_counter()
        ds = build(*args)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        times.append(time.perf_counter() - t0)
        size = len(buf.getvalue())
    return size / 1e6, statistics.median(times)


def _rows(figure: str, mine: tuple[float, float], peer: tuple[float, float]) -> list[dict]:
    return [
        {"figure": f"{figure} size (MB)", "this_project": round(mine[0], 3),
         "peer": round(peer[0], 3), "ratio": round(mine[0] / peer[0], 4)},
        {"figure": f"{figure} encode (s)", "this_project": round(mine[1], 3),
         "peer": round(peer[1], 3), "ratio": round(mine[1] / peer[1], 3)},
    ]  # fmt: skip


def seg_rows(source: SeriesVolume) -> list[dict]:
    rows = []
    for count in (104, 1):
        labels = organs(source.shape, count)
        segments = [segment_info_for(v, f"label {v}") for v in range(1, count + 1)]
        binary = _encode(build_seg, source, labels, segments, ALGORITHM, ResultSettings())
        rows += _rows(f"SEG {count} labels binary native (peer: same)", binary, binary)
        for seg_type, compression in SEG_FORMATS:
            settings = ResultSettings(seg_type=seg_type, seg_compression=compression)
            got = _encode(build_seg, source, labels, segments, ALGORITHM, settings)
            rows += _rows(f"SEG {count} labels {seg_type} {compression} (peer: binary)",
                          got, binary)  # fmt: skip
        for compression in ("rle", "jpegls"):
            rows.append(
                {
                    "figure": f"SEG {count} labels binary {compression}: not encodable "
                    "(1-bit frames)",
                    "this_project": None,
                    "peer": None,
                    "ratio": None,
                }
            )
    return rows


def rtstruct_rows(tmp: Path) -> list[dict]:
    rows = []
    spleen = [segment_info_for(1, "spleen")]
    capped = ResultSettings()
    uncapped = ResultSettings(rtstruct_max_contours_per_slice=0)
    for shape, spacing in (((40, 160, 160), (2.5, 1.0, 1.0)), ((20, 512, 512), SPACING)):
        source = _series(shape, spacing, tmp / f"rt-{shape[0]}-{shape[1]}")
        labels = speckle(shape)
        before = _encode(build_rtstruct, source, labels, spleen, ALGORITHM, uncapped)
        after = _encode(build_rtstruct, source, labels, spleen, ALGORITHM, capped)
        name = "x".join(map(str, shape[::-1]))
        rows += _rows(f"RTSTRUCT speckle {name} capped (peer: no cap)", after, before)
    return rows


def run() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        rows = rtstruct_rows(tmp_path)
        source = _series(SHAPE, SPACING, tmp_path / "ct")
        labels = speckle(SHAPE)
        after = _encode(
            build_rtstruct, source, labels, [segment_info_for(1, "spleen")], ALGORITHM,
            ResultSettings(),
        )  # fmt: skip
        rows.append(
            {
                "figure": "RTSTRUCT speckle 512x512x200 capped size (MB)",
                "this_project": round(after[0], 3),
                "peer": None,
                "ratio": None,
            }
        )
        rows.append(
            {
                "figure": "RTSTRUCT speckle 512x512x200 capped encode (s)",
                "this_project": round(after[1], 3),
                "peer": None,
                "ratio": None,
            }
        )
        del labels
        rows += seg_rows(source)
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
