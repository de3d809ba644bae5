"""A segmentation model: dicom_node's segmentation pipeline on Triton (see config.pbtxt).

Every segmentation model of the repository runs this file (liver_seg links to it), and the
class it imports (:mod:`dicom_node.inference.triton.models.segmentation`) is the one the node
also uses for the models it writes itself: the bundle served and the network model the
patches go to come from the config (``bundle``, ``network_model``).
"""

import os
import sys

# The backend stub imports from the site-packages of the python3 first on PATH and ignores
# PYTHONPATH: the server hands over the node's own import path (TritonServer).
sys.path[:0] = [
    p for p in os.environ.get("DICOM_NODE_PYTHONPATH", "").split(os.pathsep) if p not in sys.path
]

from dicom_node.inference.triton.models.segmentation import TritonPythonModel  # noqa: E402, F401
