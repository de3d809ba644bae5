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


#: Units of work for pytest-xdist that are more than one module: the modules sharing the
#: session's Triton server, and the bad-input catalogue's modules sharing one node.
_SHARED_UNITS = {
    "tests/system/test_triton.py": "triton",
    "tests/system/test_models.py": "triton",
}
_PACKAGE_UNITS = ("tests/system/bad_input/",)


def _unit(nodeid: str) -> str:
    """The unit of work a test belongs to: its module, or the group its module shares."""
    module = nodeid.split("::", 1)[0]
    for package in _PACKAGE_UNITS:
        if module.startswith(package):
            return package
    return _SHARED_UNITS.get(module, module)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Distribute whole units (``make test`` runs four workers): a module's fixtures are set
    up once, in one worker, and the modules sharing a peer share a worker."""
    from xdist.scheduler import LoadScopeScheduling

    # xdist would otherwise hand out the units with the most tests first, not the order
    # pytest_collection_modifyitems gives (the costliest first).
    config.option.loadscopereorder = False

    class ByUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

        def _reschedule(self, node) -> None:
            """The next unit only once the worker is at its unit's last test (xdist sends
            it with two still to run): a unit queued behind a long test waits while other
            workers run dry."""
            if node not in self.registered_collections:
                return  # a worker that replaces a crashed one: scheduled once it collected
            if node.shutting_down or not self.workqueue:
                super()._reschedule(node)
            elif self._pending_of(self.assigned_work[node]) <= 1:
                self._assign_work_unit(node)

    return ByUnit(config, log)


def pytest_collection_modifyitems(config, items):
    """The costliest units first, so that no worker is left with a long one at the end;
    each unit's tests keep their order.

    A module states what it costs, in seconds on the two cores of CI beside the other
    workers, with ``pytestmark = pytest.mark.cost(seconds)``; a unit costs what its
    modules do together; a module that states nothing costs little.
    """
    modules: dict[str, dict[str, float]] = {}
    for item in items:
        marker = item.get_closest_marker("cost")
        module = item.nodeid.split("::", 1)[0]
        modules.setdefault(_unit(item.nodeid), {})[module] = marker.args[0] if marker else 0.0
    cost = {unit: sum(per_module.values()) for unit, per_module in modules.items()}
    items.sort(key=lambda item: -cost[_unit(item.nodeid)])
