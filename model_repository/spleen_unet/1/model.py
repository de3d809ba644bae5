"""A network model: the bundle's network on batches of patches (see config.pbtxt).

Every network model of the repository runs this file (liver_unet links to it); the class it
imports (:mod:`dicom_node.inference.triton.models.network`) is the one the node also uses for
the models it writes itself. Its config names the bundle.
"""

import os
import sys

# The backend stub imports from the site-packages of the python3 first on PATH and ignores
# PYTHONPATH: the server hands over the node's own import path (TritonServer).
sys.path[:0] = [
    p for p in os.environ.get("DICOM_NODE_PYTHONPATH", "").split(os.pathsep) if p not in sys.path
]

from dicom_node.inference.triton.models.network import TritonPythonModel  # noqa: E402, F401
