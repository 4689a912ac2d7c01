"""Triton python model `zooter_router` (python variant): token ids -> logits with onnxruntime.

The same ONNX file, opened by the same zooter.runtime.session.open_session as the in-process Router. Requests that Triton hands
over together are run one by one, each at its own width, never padded to each other:
  - padding to the widest request costs compute on CPU (attention grows with the square of the
    width) for little gain, since one request already keeps the cores busy;
  - a dynamic int8 model scales its activations over the whole batch, padding included, so a
    request merged with others could get (slightly) different probabilities than in-process.
Triton's onnxruntime backend behaves alike: without ragged batching it only batches requests of
the same shape. Dynamic batching still pays: one round trip to this process for many requests.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from zooter.runtime.session import open_session


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"]
        threads = int(params.get("intra_op_threads") or 0) or None
        # The Router's own session options: no spinning (the next step, zooter_decide, and the next
        # request's zooter_tokenize are other processes that need these cores right away).
        self.session = open_session(folder / params["model_file"], ["CPUExecutionProvider"], threads)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            feed = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
            logits = self.session.run(["logits"], feed)[0].astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("logits", logits)]))
        return responses
