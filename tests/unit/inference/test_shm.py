"""Volumes in shared memory (dicom_node.inference.triton.shm): named while a server may open them,
freed with the last array viewing them, and never left behind by a node that died."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dicom_node.inference.triton import shm


def test_a_shared_array_is_named_until_its_last_view_goes():
    array = shm.shared_empty((3, 4, 5), np.int16)
    region = shm.region_of(array)
    assert region is not None and region.path.exists() and region.nbytes == array.nbytes
    assert region.key == f"/{region.name}"
    flat = array.reshape(-1)  # a view of the whole region is the region too
    assert shm.region_of(flat) == region
    assert shm.region_of(array[1:]) is None  # a part of it is not
    assert shm.region_of(np.zeros((3, 4, 5), np.int16)) is None
    del array
    assert region.path.exists()  # the view still holds it
    del flat
    assert not region.path.exists()


def test_unlinked_memory_stays_usable():
    array = shm.shared_empty((8,), np.uint8)
    region = shm.region_of(array)
    shm.unlink(region)
    assert not region.path.exists()
    array[:] = 7
    assert int(array.sum()) == 56


def test_without_shared_memory_the_volume_goes_to_ordinary_memory(monkeypatch, tmp_path):
    monkeypatch.setattr(shm, "SHM_DIR", tmp_path / "missing")
    array = shm.allocate((2, 3, 4), np.int16)
    assert array.shape == (2, 3, 4) and shm.region_of(array) is None


def test_regions_of_dead_processes_are_removed():
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = shm.SHM_DIR / f"{shm.PREFIX}_{int(dead.stdout)}_0123456789ab"
    stale.write_bytes(b"left by a killed node")
    mine = shm.shared_empty((4,), np.uint8)
    try:
        assert shm.remove_stale() >= 1
        assert not stale.exists()
        assert shm.region_of(mine).path.exists()  # this process's own are kept
    finally:
        stale.unlink(missing_ok=True)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_a_region_that_does_not_fit_fails_cleanly():
    free = os.statvfs("/dev/shm")
    too_big = free.f_bavail * free.f_frsize + 2**30
    with pytest.raises(OSError):
        shm.shared_empty((too_big,), np.uint8)
    assert shm.named_regions(os.getpid()) == []
