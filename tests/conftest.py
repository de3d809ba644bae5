"""Shared fixtures: real data, and real peers started once and cleaned up."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.peers import Orthanc, testdata


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = testdata()
    if not d.is_dir():
        pytest.skip(f"real test data not found at {d} (set DICOM_NODE_TESTDATA)")
    return d


def require(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: `make install` installs it")


@pytest.fixture(scope="session")
def dcmtk_tools() -> None:
    for tool in ("storescu", "echoscu", "storescp"):
        require(tool)


@pytest.fixture
def orthanc(tmp_path_factory) -> Orthanc:
    require("Orthanc")
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield pacs
    pacs.stop()
