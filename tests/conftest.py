"""Shared fixtures: real data, and real peers started once and cleaned up."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.peers import LIVER_BUNDLE, SPLEEN_BUNDLE, Orthanc, testdata, triton_server


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


def _trained(bundle: Path) -> bool:
    return (bundle / "models" / "model.ts").is_file()


@pytest.fixture(scope="session")
def triton(tmp_path_factory):
    """The suite's one Triton server: ``echo``, and the spleen and liver demo models with
    their networks (those whose bundle is trained), each pointed at its bundle the node's
    way. Tests that stop, kill or break a server start servers of their own.

    The modules using it run in one worker (see ``pytest_xdist_make_scheduler``), so that a
    parallel run starts it once."""
    models, env = ["echo"], {}
    for organ, bundle in (("spleen", SPLEEN_BUNDLE), ("liver", LIVER_BUNDLE)):
        if _trained(bundle):
            models += [f"{organ}_unet", f"{organ}_seg"]
            env[f"DICOM_NODE_BUNDLE_{organ.upper()}_SEG"] = str(bundle)
    srv = triton_server(tmp_path_factory.mktemp("triton"), models, env, startup_timeout=240.0)
    srv.start()
    assert 0 not in (srv.grpc_port, srv.http_port, srv.metrics_port)
    yield srv
    pgid = srv.pid
    srv.stop()
    assert not srv.is_alive()
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return
    raise AssertionError("backend stubs outlived the server")


#: Test modules that share the session's Triton server: one unit of work for pytest-xdist.
_TRITON_MODULES = {"test_triton.py", "test_models.py"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Distribute whole modules (``make test`` runs four workers): a module's fixtures are set
    up once, in one worker, and the modules on the shared Triton server share a worker."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "triton" if Path(module).name in _TRITON_MODULES else module

    return ByModule(config, log)


#: Modules that take longest, started first so that no worker is left with one at the end.
_LONGEST_FIRST = [
    "test_zoo_bundles.py",
    "test_triton.py",
    "test_models.py",
    "test_integrity.py",
    "test_load.py",
    "test_scp.py",
    "test_bench_multiorgan.py",
    "test_e2e.py",
    "test_completion.py",
    "test_faults.py",
]


def pytest_collection_modifyitems(config, items):
    """The longest modules first; each module's tests keep their order."""
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
