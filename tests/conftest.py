"""Shared fixtures: real data, and real peers started once and cleaned up."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Four workers, the nodes and Triton backend stubs they start share the machine's cores.
# OpenMP threads (torch's) spin while they wait for work by default, which on an
# oversubscribed machine burnt a seventh of the suite's CPU; passive waiting changes no result.
# Set before anything loads torch, and inherited by every process a test starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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

    # xdist would otherwise hand out the modules with the most tests first, not the order
    # pytest_collection_modifyitems gives (the longest first).
    config.option.loadscopereorder = False

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "triton" if Path(module).name in _TRITON_MODULES else module

        def _reschedule(self, node) -> None:
            """The next module only once the worker is at its module's last test (xdist
            sends it with two still to run): a module queued behind a long test waits while
            other workers run dry."""
            if node not in self.registered_collections:
                return  # a worker that replaces a crashed one: scheduled once it collected
            if node.shutting_down or not self.workqueue:
                super()._reschedule(node)
            elif self._pending_of(self.assigned_work[node]) <= 1:
                self._assign_work_unit(node)

    return ByModule(config, log)


#: Modules by the time they take, the longest first (a module of a few seconds is not
#: listed), so that no worker is left with a long one at the end.
_LONGEST_FIRST = [
    "test_zoo_bundles.py",
    "test_triton.py",
    "test_models.py",
    "test_scp.py",
    "test_completion.py",
    "test_integrity.py",
    "test_load.py",
    "test_faults.py",
    "test_security.py",
    "test_bad_input.py",
    "test_e2e.py",
    "test_bench_multiorgan.py",
    "test_routing.py",
    "test_export.py",
    "test_viewer.py",
    "test_patch_batches.py",
    "test_pressure.py",
    "test_encode_multiorgan.py",
    "test_bundles.py",
    "test_dicomweb.py",
    "test_balancing.py",
    "test_status.py",
]


def pytest_collection_modifyitems(config, items):
    """The longest modules first; each module's tests keep their order."""
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
