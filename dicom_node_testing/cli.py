"""The ``dicom-node`` command with the tests' backends registered: ``python -m
dicom_node_testing.cli serve --config ...`` runs a node whose ``[inference] backend =
"threshold"`` (:mod:`dicom_node_testing.threshold`), for tests and benchmarks that need a
node in a process of its own (one they kill) but not a model."""

from __future__ import annotations

import sys

from dicom_node.cli import main
from dicom_node.inference import BACKENDS

BACKENDS.setdefault("threshold", "dicom_node_testing.threshold:create_backends")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
