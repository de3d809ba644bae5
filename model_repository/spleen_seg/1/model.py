"""A segmentation model: dicom_node's segmentation pipeline on Triton (see config.pbtxt).

Every segmentation model of the repository runs this file (liver_seg links to it): the
bundle it serves and the network model it sends the patches to come from its config
(``bundle``, ``network_model``), so another organ is another config, not another program.

Tensors move between Triton and torch through DLPack, so a volume that arrives in GPU
memory is never copied to the host, and patches reach the network model the same way.
"""

import json
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

from dicom_node.inference.server import bundle_path_from_config, instance_device
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
        hu = torch.from_dlpack(given[0].to_dlpack()).to(self.device)
        affine = pb_utils.get_input_tensor_by_name(request, "AFFINE").as_numpy()
        result = self.pipeline.run(hu, affine, predictor=self._predict)
        timings = dict(result.timings, server=time.perf_counter() - t0)
        outputs = {
            "LABELS": lambda: np.ascontiguousarray(result.labels, dtype=np.uint8),
            "CONTOURS": lambda: np.ascontiguousarray(result.contours, dtype=np.uint8),
            "TIMINGS": lambda: np.array([json.dumps(timings).encode()], dtype=object),
        }
        # Only what the client asked for (all when it named none): an output nobody reads is
        # a volume-sized copy into the response for nothing.
        wanted = set(request.requested_output_names()) or set(outputs)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(n, make()) for n, make in outputs.items() if n in wanted]
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
