"""The conformance statement (``docs/conformance-statement.md``) against the code and
against a running node, both ways.

The committed file must be what ``tools/conformance.py`` renders from the code, so it
cannot go stale. Then a running node is asked over real associations,
as configured by default and with ``unsupported_sop_class = "fail"`` and a destination
asking for storage commitment (which adds the report context): every (SOP class, transfer
syntax) the statement lists as accepted in that configuration is accepted, one
presentation context each; and every SOP class pynetdicom knows (and a private one),
offered with every transfer syntax pydicom knows (and a private one), is accepted only
where the statement lists it, and then only in a transfer syntax listed for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pydicom.uid
import pytest
from pynetdicom import AE, build_context, build_role
from pynetdicom import sop_class as pynetdicom_sop_classes
from pynetdicom.sop_class import StorageCommitmentPushModel

from dicom_node.config import settings_from_dict
from dicom_node.node import Node
from tests.peers import free_port
from tools.conformance import DOCUMENT, parse_accepted, render

pytestmark = pytest.mark.cost(7)

#: A private SOP class and transfer syntax: nobody may accept them.
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.8.498.999.1"
PRIVATE_SYNTAX = "1.2.826.0.1.3680043.8.498.999.2"
#: Presentation contexts one association may propose (PS3.8: odd IDs 1-255).
MAX_CONTEXTS = 128


@pytest.fixture(scope="module")
def statement() -> str:
    return DOCUMENT.read_text()


def test_the_statement_is_what_the_code_renders(statement):
    assert statement == render(), (
        "docs/conformance-statement.md is stale: run `python -m tools.conformance`"
    )


#: The tables of accepted contexts each configuration adds to the default's.
TABLES = {"default": (), "fail+commitment": ("fail", "commitment")}


@dataclass(frozen=True)
class Running:
    """A started node and the port its SCP listens on."""

    port: int


@pytest.fixture(scope="module", params=list(TABLES))
def node(request, tmp_path_factory) -> Iterator[tuple[str, Running]]:
    """The node as configured by default, and with every other Storage class negotiated
    and a destination asking for storage commitment; no job runs (a long settle time). In
    this process: the same node ``dicom-node serve`` runs, without a second interpreter's
    start."""
    mode = request.param
    port = free_port()
    config: dict = {
        "node": {
            "host": "127.0.0.1",
            "port": port,
            "data_dir": str(tmp_path_factory.mktemp(f"node-{mode}") / "var"),
            "unsupported_sop_class": "fail" if mode != "default" else "refuse",
            "settle_seconds": 3600,
            "complete_on_release": False,
        },
        "limits": {"min_free_disk_mb": 1},
        "inference": {"backend": "local"},
    }
    if mode != "default":
        config["destinations"] = [
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": free_port(),
                "storage_commitment": True,
            }
        ]
    n = Node(settings_from_dict(config))
    n.start()
    yield mode, Running(port)
    n.stop()


def _listed(statement: str, mode: str) -> dict[str, set[str]]:
    listed = parse_accepted(statement, "default")
    for table in TABLES[mode]:
        for sop_class, syntaxes in parse_accepted(statement, table).items():
            listed.setdefault(sop_class, set()).update(syntaxes)
    return listed


def _accepted(port: int, contexts: Iterable[tuple[str, list[str]]]) -> set[tuple[str, str]]:
    """(SOP class, transfer syntax) of every context the node accepted, proposing
    ``contexts`` over as many associations as it takes."""
    contexts = list(contexts)
    out: set[tuple[str, str]] = set()
    for start in range(0, len(contexts), MAX_CONTEXTS):
        batch = [
            build_context(sop, syntaxes) for sop, syntaxes in contexts[start : start + MAX_CONTEXTS]
        ]
        ae = AE(ae_title="CONFORMANCE")
        assoc = ae.associate("127.0.0.1", port, contexts=batch, ae_title="DICOM_NODE")
        if assoc.is_established:
            out |= {
                (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in assoc.accepted_contexts
            }
            assoc.release()
        else:  # pynetdicom aborts an association without an accepted context
            assert not assoc.is_rejected, "the node rejected the association itself"
    return out


def _every_sop_class() -> list[str]:
    known = {
        str(value)
        for name, value in vars(pynetdicom_sop_classes).items()
        if not name.startswith("_")
        and isinstance(value, str)
        and value.startswith("1.2.840.10008.")
    }
    return sorted(known | {PRIVATE_SOP_CLASS})


def _every_syntax() -> list[str]:
    return sorted({str(u) for u in pydicom.uid.AllTransferSyntaxes} | {PRIVATE_SYNTAX})


def test_everything_listed_is_accepted(node, statement):
    mode, n = node
    listed = _listed(statement, mode)
    assert "1.2.840.10008.5.1.4.1.1.2" in listed  # CT Image Storage
    pairs = {(sop, ts) for sop, syntaxes in listed.items() for ts in syntaxes}
    assert _accepted(n.port, [(sop, [ts]) for sop, ts in sorted(pairs)]) == pairs


def test_nothing_accepted_is_missing_from_the_statement(node, statement):
    mode, n = node
    listed = _listed(statement, mode)
    syntaxes = _every_syntax()
    offered = _accepted(n.port, [(sop, syntaxes) for sop in _every_sop_class()])
    unlisted = {sop for sop, _ in offered} - set(listed)
    assert not unlisted, f"accepted but not in the statement: {sorted(unlisted)}"
    # each accepted SOP class with every transfer syntax not listed for it: a context is
    # accepted when the node takes any one of its syntaxes, so none may be
    unlisted_syntaxes = [
        (sop, [ts for ts in syntaxes if ts not in listed[sop]]) for sop in sorted(listed)
    ]
    assert all(unlisted for _, unlisted in unlisted_syntaxes)
    extra = _accepted(n.port, unlisted_syntaxes)
    assert not extra, f"accepted in a transfer syntax the statement does not list: {sorted(extra)}"
    assert PRIVATE_SOP_CLASS not in {sop for sop, _ in offered}


def test_the_report_context_takes_the_role_a_pacs_proposes(node, statement):
    """A PACS reporting on an association of its own proposes itself as the SCP of Storage
    Commitment (SCP/SCU Role Selection): the node accepts that, as the statement says, and
    only where a destination asks for commitment."""
    mode, n = node
    listed = _listed(statement, mode)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(
        "127.0.0.1",
        n.port,
        ae_title="DICOM_NODE",
        ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True, scu_role=False)],
    )
    accepted = [
        cx for cx in assoc.accepted_contexts if cx.abstract_syntax == StorageCommitmentPushModel
    ]
    if assoc.is_established:
        assoc.release()
    assert bool(accepted) == (StorageCommitmentPushModel in listed)
    if accepted:  # the PACS as SCP (the node as SCU: it only receives reports)
        assert (accepted[0].as_scp, accepted[0].as_scu) == (True, False)
