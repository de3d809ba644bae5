"""The package's shape: stages import downwards, and nothing but the command builds a node.

Read from the source with ``ast``: the imports a module makes when it is imported (top-level
statements, not those under ``TYPE_CHECKING`` nor inside functions). The configuration reads
the settings of its plug-ins (destinations, sources) through imports made when a file is
parsed, so those are not edges here; an import-time cycle would make the import order matter.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.peers import ROOT

PACKAGE = ROOT / "dicom_node"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _import_time_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules ``path`` imports when it is imported."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:  # top level only
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("dicom_node"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in modules else resolve(node.module) or "")
        elif isinstance(node, ast.Import):
            found |= {resolve(a.name) or "" for a in node.names if a.name.startswith("dicom_node")}
    found.discard("")
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {t for t in _import_time_imports(path, modules) if t != name}
        for name, path in modules.items()
    }


def test_no_module_but_the_command_builds_a_node():
    """``node.py`` builds and wires the stages; none of them reaches back up to it, at
    import time or later (the command imports it when it serves)."""
    importers = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "dicom_node.node":
                importers.append(name)
            elif isinstance(node, ast.ImportFrom) and node.module == "dicom_node":
                importers += [name for a in node.names if a.name == "node"]
            elif isinstance(node, ast.Import):
                importers += [name for a in node.names if a.name == "dicom_node.node"]
    assert sorted(set(importers)) == ["dicom_node.cli"]


def test_no_import_cycle():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_state_and_the_pipeline_know_no_stage_above_them():
    """The job database and the MONAI pipeline are the bottom of the house: they import
    ``common`` only (the pipeline runs in Triton's stubs without the node)."""
    graph = _graph()
    for package in ("dicom_node.state", "dicom_node.pipeline"):
        above = {
            t
            for m, targets in graph.items()
            if m == package or m.startswith(package + ".")
            for t in targets
            if not t.startswith((package, "dicom_node.common"))
        }
        assert above == set(), package
