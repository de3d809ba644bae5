"""A segmentation model: dicom_node's segmentation pipeline on Triton.

Every segmentation model runs this class (the ``model.py`` of each only imports it): the
bundle it serves and the network model it sends the patches to come from its config
(``bundle``, ``network_model``), so another organ is another config, not another program.
It imports ``triton_python_backend_utils``, so it runs only inside Triton's Python backend.

Tensors move between Triton and torch through DLPack, so a volume that arrives in GPU
memory is never copied to the host, and patches reach the network model the same way.
"""

import json
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

from dicom_node.common.heap import freeze_heap
from dicom_node.inference.triton.models import bundle_path_from_config, instance_device
from dicom_node.pipeline import SegmentationPipeline, load_bundle


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.device = torch.device(instance_device(args))
        bundle = load_bundle(bundle_path_from_config(config, args["model_repository"]))
        self.pipeline = SegmentationPipeline(bundle, device=self.device)
        if not parameters.get("network_model"):
            raise ValueError(f"model {config['name']} has no network_model parameter")
        self.network_model = parameters["network_model"]
        self.max_batch = int(parameters.get("network_max_batch_size", "8"))
        freeze_heap()  # what this instance loaded lives as long as it

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._segment(request))
            except ValueError as exc:  # a malformed request: tell the client why
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses

    def _segment(self, request):
        t0 = time.perf_counter()
        names = ("HU_INT16", "HU_FP32")
        given = [pb_utils.get_input_tensor_by_name(request, n) for n in names]
        given = [t for t in given if t is not None]
        if len(given) != 1:
            raise ValueError("give the volume as exactly one of HU_INT16 and HU_FP32")
        hu = _from_triton(given[0]).to(self.device)
        affine = _from_triton(pb_utils.get_input_tensor_by_name(request, "AFFINE")).cpu().numpy()
        # Only what the client asked for (all when it named none): an output nobody reads is
        # volume-sized work and a copy into the response for nothing.
        wanted = set(request.requested_output_names()) or {"LABELS", "CONTOURS", "TIMINGS"}
        result = self.pipeline.run(
            hu, affine, predictor=self._predict, contours="CONTOURS" in wanted
        )
        timings = dict(result.timings, server=time.perf_counter() - t0)
        outputs = {
            "LABELS": lambda: _to_triton("LABELS", result.labels),
            "CONTOURS": lambda: _to_triton("CONTOURS", result.contours),
            "TIMINGS": lambda: _to_triton(
                "TIMINGS", np.frombuffer(json.dumps(timings).encode(), np.uint8)
            ),
        }
        return pb_utils.InferenceResponse(
            output_tensors=[make() for n, make in outputs.items() if n in wanted]
        )

    def _predict(self, patches):
        """Logits of a batch of patches, computed by the network model through BLS."""
        patches = patches.as_subclass(torch.Tensor)  # a MONAI MetaTensor: plain data only
        logits = []
        if patches.is_cuda:
            # DLPack carries no stream: the patches must be computed before Triton reads them.
            torch.cuda.current_stream(patches.device).synchronize()
        for chunk in patches.split(self.max_batch):
            request = pb_utils.InferenceRequest(
                model_name=self.network_model,
                requested_output_names=["OUTPUT__0"],
                inputs=[pb_utils.Tensor.from_dlpack("INPUT__0", to_dlpack(chunk.contiguous()))],
            )
            response = request.exec()
            if response.has_error():
                raise RuntimeError(f"{self.network_model}: {response.error().message()}")
            output = pb_utils.get_output_tensor_by_name(response, "OUTPUT__0")
            logits.append(torch.from_dlpack(output.to_dlpack()).to(self.device))
        return torch.cat(logits)


# Numeric tensors cross between Triton and torch through DLPack only: no copy, and no use of
# the stub's own numpy bindings, which read numpy 2 arrays wrongly (the stub is built
# against numpy 1's array layout).
def _from_triton(tensor):
    return torch.from_dlpack(tensor.to_dlpack())


def _to_triton(name, array):
    data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8))
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(data))
