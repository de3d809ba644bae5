"""Identity model for transport measurements: OUTPUT is INPUT, byte for byte."""

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            volume = pb_utils.get_input_tensor_by_name(request, "INPUT")
            # DLPack hands the input buffer to the output without a copy inside the stub.
            output = pb_utils.Tensor.from_dlpack("OUTPUT", volume.to_dlpack())
            responses.append(pb_utils.InferenceResponse(output_tensors=[output]))
        return responses
