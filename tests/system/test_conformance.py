"""The conformance statement (``docs/conformance-statement.md``) against the code and
against a running node, both ways.

The committed file must be what :mod:`dicom_node.conformance` renders from the code, so it
cannot go stale. Then a real node (``dicom-node serve``), with each value of
``unsupported_sop_class``, is asked over real associations: every (SOP class, transfer
syntax) the statement lists as accepted is accepted, one presentation context each; and
every SOP class pynetdicom knows (and a private one), offered with every transfer syntax
pydicom knows (and a private one), is accepted only where the statement lists it, and
then only in a transfer syntax listed for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pydicom.uid
import pytest
from pynetdicom import AE, build_context
from pynetdicom import sop_class as pynetdicom_sop_classes

from dicom_node.conformance import DOCUMENT, parse_accepted, render
from tests.peers import NodeProcess

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
        "docs/conformance-statement.md is stale: run `python -m dicom_node.conformance`"
    )


@pytest.fixture(scope="module", params=["refuse", "fail"])
def node(request, tmp_path_factory) -> Iterator[tuple[str, NodeProcess]]:
    """The node with each ``unsupported_sop_class``; no job runs (a long settle time)."""
    mode = request.param
    n = NodeProcess(
        tmp_path_factory.mktemp(f"node-{mode}"),
        node={"unsupported_sop_class": mode, "settle_seconds": 3600, "complete_on_release": False},
    ).start()
    yield mode, n
    n.stop()


def _listed(statement: str, mode: str) -> dict[str, set[str]]:
    listed = parse_accepted(statement, "default")
    if mode == "fail":
        for sop_class, syntaxes in parse_accepted(statement, "fail").items():
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
    # each accepted SOP class, with each transfer syntax alone
    alone = _accepted(n.port, [(sop, [ts]) for sop in sorted(listed) for ts in syntaxes])
    extra = {(sop, ts) for sop, ts in alone if ts not in listed[sop]}
    assert not extra, f"accepted in a transfer syntax the statement does not list: {sorted(extra)}"
    assert PRIVATE_SOP_CLASS not in {sop for sop, _ in offered}
