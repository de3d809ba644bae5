"""``python -m bench gpu`` runs without a GPU: CPU figures measured, GPU ones said missing."""

from __future__ import annotations

import pytest
import torch

import bench.gpu as gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_bench_gpu_measures_the_cpu_and_says_why_the_gpu_figures_are_missing(monkeypatch):
    monkeypatch.setattr(gpu, "SLICES", (12,))
    monkeypatch.setattr(gpu, "MATRIX", 64)
    monkeypatch.setattr(gpu, "RUNS", 1)
    rows = gpu.run()
    figures = [r["figure"] for r in rows]
    assert figures[0].startswith("machine: ")
    measured = [r for r in rows if r["this_project"] is not None]
    assert {r["figure"].split(" on the CPU")[0] for r in measured} == {
        "64x64x12 pre-processing",
        "64x64x12 post-processing",
    }
    assert all(r["this_project"] > 0 for r in measured)
    missing = [f for f in figures if "not measured" in f]
    assert len(missing) == 4 and all("(no CUDA device)" in f for f in missing)
    assert not any("failed" in f for f in figures)
