"""A damaged job database (truncated, overwritten, not a database at all) is refused by
``dicom-node serve`` and ``dicom-node jobs`` in one sentence saying what to do, the spool
untouched; moved aside as that sentence says, the next start registers the spool anew."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dicom_node.cli import main
from dicom_node.config import load_settings
from dicom_node.intake.spool import Spool
from dicom_node.node import Node
from dicom_node.state import DatabaseError, JobDatabase, NewInstance
from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series
from tests.peers import ROOT, free_port

pytestmark = pytest.mark.cost(4)


def _truncated(db: Path) -> None:
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])


def _page_overwritten(db: Path) -> None:
    """A page of the instances table overwritten whole (its header included), as a torn
    write or a bad sector leaves it; only a check of every page finds it."""
    with open(db, "r+b") as f:
        f.seek(-2 * 4096, os.SEEK_END)
        f.write(os.urandom(4096))


def _not_a_database(db: Path) -> None:
    db.write_bytes(os.urandom(20000))


@pytest.fixture
def node_dir(tmp_path) -> tuple[Path, Path, list[Path]]:
    """A configuration, and a data directory whose database knows a spooled series."""
    data = tmp_path / "var"
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\ndata_dir = "{data}"\nport = {free_port()}\n'
        '[limits]\nmin_free_disk_mb = 1\n[inference]\nbackend = "local"\n'
    )
    spool = Spool(data / "spool")
    attrs = SeriesAttributes()
    files = []
    jobs = JobDatabase(data / "jobs.sqlite")
    for path in write_ct_series(np.zeros((3, 8, 8), np.int16), tmp_path / "ct", attrs=attrs):
        target = spool.path_for(attrs.study_instance_uid, attrs.series_instance_uid, path.stem)
        spool.write(target, path.read_bytes())
        files.append(target)
    for k in range(300):  # rows enough for pages beyond the schema's
        jobs.instances.add(
            NewInstance(f"9.{k}", "1.2.840.10008.5.1.4.1.1.2", "9", "9.1", "CT", "A",
                        data / "x" / f"{k}.dcm", 1, "d" * 64)
        )  # fmt: skip
    jobs.close()
    return config, data, files


@pytest.mark.parametrize("damage", [_truncated, _page_overwritten, _not_a_database])
def test_jobs_refuses_a_damaged_database_in_one_sentence(damage, node_dir, capsys):
    config, data, files = node_dir
    damage(data / "jobs.sqlite")
    assert main(["jobs", "--config", str(config)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"dicom-node: the job database {data / 'jobs.sqlite'} is damaged (")
    assert "move jobs.sqlite and its -wal and -shm files aside" in line
    assert "the spool is kept" in line
    assert all(f.is_file() for f in files)


def test_serve_refuses_it_and_a_start_without_it_registers_the_spool(node_dir):
    config, data, files = node_dir
    _truncated(data / "jobs.sqlite")
    r = subprocess.run(
        [sys.executable, "-m", "dicom_node", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("dicom-node: the job database ")
    assert "Traceback" not in r.stderr
    assert all(f.is_file() for f in files)
    with pytest.raises(DatabaseError):
        Node(load_settings(config))
    # as the sentence says: moved aside, and the node started again
    for name in ("jobs.sqlite", "jobs.sqlite-wal", "jobs.sqlite-shm"):
        if (data / name).exists():
            (data / name).rename(data / f"{name}.damaged")
    node = Node(load_settings(config))
    try:
        node.start(serve=False)
        assert sorted(
            node.jobs.instances.paths(node.jobs.series.records()[0].series_uid)
        ) == sorted(files)
    finally:
        node.stop()
