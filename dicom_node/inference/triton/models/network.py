"""A network model: the bundle's network on batches of patches, inside Triton.

Every network model runs this class (the ``model.py`` of each only imports it); its config
names the bundle. It imports ``triton_python_backend_utils``, so it runs only inside
Triton's Python backend.
"""

import contextlib
import json

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

from dicom_node.common.heap import freeze_heap
from dicom_node.inference.triton.models import bundle_path_from_config, instance_device
from dicom_node.pipeline.patches import PatchByPatch, default_patches_at_once
from dicom_node.pipeline.served import load_served_network


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.device = torch.device(instance_device(args))
        bundle = bundle_path_from_config(config, args["model_repository"])
        # Under autocast when the bundle's evaluator says amp. MONAI is imported only when
        # the weights need its network_def (a process per instance: 1.2 s of CPU less each).
        self.network, self.amp = load_served_network(bundle, self.device)
        # On a CPU a batch runs a few patches at a time, as in process: faster per patch
        # there, and the same logits (see default_patches_at_once).
        patches = default_patches_at_once(self.device)
        self.predict = self.network if patches is None else PatchByPatch(self.network, patches)
        freeze_heap()  # what this instance loaded lives as long as it

    def execute(self, requests):
        # The dynamic batcher hands over several requests: run them as one batch.
        batches = [
            torch.from_dlpack(pb_utils.get_input_tensor_by_name(r, "INPUT__0").to_dlpack())
            for r in requests
        ]
        amp = torch.autocast("cuda") if self.amp else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            logits = self.predict(torch.cat(batches).to(self.device)).float()
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
