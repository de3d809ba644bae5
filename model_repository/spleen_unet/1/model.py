"""A network model: the bundle's TorchScript network on batches of patches (see config.pbtxt).

Every network model of the repository runs this file (liver_unet links to it); its config
names the bundle.
"""

import json
import os
import sys

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

# The backend stub imports from the site-packages of the python3 first on PATH and ignores
# PYTHONPATH: the server hands over the node's own import path (TritonServer).
sys.path[:0] = [
    p for p in os.environ.get("DICOM_NODE_PYTHONPATH", "").split(os.pathsep) if p not in sys.path
]

from dicom_node.inference.server import bundle_path_from_config, instance_device  # noqa: E402
from dicom_node.pipeline import load_bundle  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.device = torch.device(instance_device(args))
        bundle = load_bundle(bundle_path_from_config(config, args["model_repository"]))
        self.network = bundle.load_network(self.device)

    def execute(self, requests):
        # The dynamic batcher hands over several requests: run them as one batch.
        batches = [
            torch.from_dlpack(pb_utils.get_input_tensor_by_name(r, "INPUT__0").to_dlpack())
            for r in requests
        ]
        with torch.inference_mode():
            logits = self.network(torch.cat(batches).to(self.device))
            if logits.is_cuda:
                # DLPack carries no stream: finish the kernels before Triton reads the output.
                torch.cuda.current_stream(logits.device).synchronize()
        outputs = logits.split([len(b) for b in batches])
        return [
            pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor.from_dlpack("OUTPUT__0", to_dlpack(o.contiguous()))]
            )
            for o in outputs
        ]
