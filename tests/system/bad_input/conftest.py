"""The bad-input catalogue's one node, its ledger and the check after each case.

Every module of the catalogue (one per layer: transport, association, instances, series)
runs against the same node process, in one worker (``tests/conftest.py`` keeps the package
together); once the last case ran, the summary checks that no acknowledged instance was lost.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import SPLEEN_BUNDLE, NodeProcess
from tests.system.bad_input.crafting import (
    LIMITS,
    Ledger,
    echo,
    spooled_uids,
)


@pytest.fixture(scope="package")
def ledger(request, node) -> Iterator[Ledger]:
    """The module's ledger; once its last test ran, whatever the order, the summary: every
    acknowledged instance is in the spool, nothing was written outside it."""
    book = Ledger()
    yield book
    _summary(node, book, whole=_whole_module_ran(request))


def _whole_module_ran(request) -> bool:
    """Whether the catalogue ran whole (the count is checked only then, not for ``-k``)."""
    package = Path(__file__).parent
    return sum(i.path.parent == package for i in request.session.items) >= 100


def _summary(node: NodeProcess, ledger: Ledger, whole: bool) -> None:
    if whole:
        assert len(ledger.rows) >= 100, f"the catalogue has {len(ledger.rows)} cases, not 100"
    spooled = spooled_uids(node)
    lost = ledger.acked - set(spooled)
    strays = [p for p in node.workdir.parent.rglob("*pwned*")]
    spool = node.data_dir / "spool"
    outside = [p for p in node.data_dir.rglob("*.dcm") if spool not in p.parents]
    line = (
        f"bad-input catalogue: {len(ledger.rows)} cases, {ledger.as_expected} as expected, "
        f"instances lost = {len(lost)}"
    )
    print("\n" + line)
    assert ledger.as_expected == len(ledger.rows)
    assert not lost, lost
    assert not strays and not outside, (strays, outside)
    # every job here fails before inference: nothing was made to send to a PACS
    assert not list((node.data_dir / "results").rglob("*.dcm"))
    assert echo(node.port)


@pytest.fixture(scope="package")
def node(tmp_path_factory, dcmtk_tools) -> Iterator[NodeProcess]:
    work = tmp_path_factory.mktemp("bad-input")
    n = NodeProcess(
        work / "node",
        node={"settle_seconds": 0.3, "unsupported_sop_class": "refuse"},
        limits=LIMITS,
        # never reached: every series here fails assembly first (the summary checks that no
        # result was made)
        command="dicom_node_testing.cli",
        inference={"backend": "threshold", "bundle": str(SPLEEN_BUNDLE)},
    ).start()
    yield n
    n.stop()


@pytest.fixture(scope="package")
def fail_node(tmp_path_factory, dcmtk_tools) -> Iterator[NodeProcess]:
    """A node that negotiates every storage class and fails non-CT instances (0x0122)."""
    n = NodeProcess(
        tmp_path_factory.mktemp("bad-input-fail") / "node",
        node={
            "settle_seconds": 3600,
            "complete_on_release": False,
            "unsupported_sop_class": "fail",
        },
    ).start()
    yield n
    n.stop()


@pytest.fixture
def served(node: NodeProcess) -> Iterator[None]:
    """After each case: the node answers C-ECHO and has no half-written file."""
    yield
    assert echo(node.port), f"node stopped serving:\n{node.tail()}"
    incoming = node.data_dir / "spool" / ".incoming"
    deadline = time.monotonic() + 5  # a connection's thread removes its partial file as it ends
    while list(incoming.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(incoming.iterdir()) == []
