"""Print the torch requirement pinned in pyproject.toml, its one place.

torch is installed on its own, before the project, so that nothing pulls a multi-gigabyte
build of another version: the Makefile and the deploy Dockerfiles ask this script for the pin
rather than repeating it. Plain text scanning, so that it runs on any Python 3 without tomllib.
"""

from __future__ import annotations

import sys
from pathlib import Path


def torch_pin(pyproject: Path) -> str:
    """The ``torch==...`` requirement among the project's dependencies."""
    for line in pyproject.read_text().splitlines():
        text = line.strip().strip(",")
        if text.startswith('"torch=='):
            return text.split('"')[1]
    raise SystemExit(f"{pyproject}: no pinned torch among the dependencies")


if __name__ == "__main__":
    default = Path(__file__).resolve().parent.parent / "pyproject.toml"
    print(torch_pin(Path(sys.argv[1]) if len(sys.argv) > 1 else default))
