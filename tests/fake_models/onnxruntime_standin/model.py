"""A stand-in for Triton's onnxruntime backend, which nvidia-pytriton's Triton does not ship: a python model that
runs its version folder's ONNX file (the `onnx_file` parameter) with onnxruntime, with the inputs and outputs
of zooter_router's onnxruntime config (the token ids in, logits and rewards out). tests/triton_helpers.py
`onnxruntime_standin` puts it in place of a built repository's zooter_router; everything else in the
repository (the ensemble, tokenize, decide, zooter) is the real thing."""

import json
from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        onnx_file = config["parameters"]["onnx_file"]["string_value"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(folder / onnx_file), options, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
            logits, rewards = self.session.run(["logits", "rewards"], feeds)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("logits", logits),
                                                         pb_utils.Tensor("rewards", rewards)]))
        return responses
