"""Triton python model `zooter_router` (python variant): token ids -> logits with onnxruntime.

The same ONNX file and the same onnxruntime as the in-process Router. Requests batched together by
Triton have different widths; they are right-padded to the widest (attention_mask 0, so mean
pooling ignores the padding) and run as one batch, then split back per request.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"]
        options = ort.SessionOptions()
        threads = int(params.get("intra_op_threads") or 0)
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / params["model_file"]), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def execute(self, requests):
        parts = [{name: pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs}
                 for r in requests]
        width = max(p["input_ids"].shape[1] for p in parts)
        feed = {}
        for name in self.inputs:
            feed[name] = np.concatenate(
                [np.pad(p[name], ((0, 0), (0, width - p[name].shape[1]))) for p in parts]).astype(np.int64)
        logits = self.session.run(["logits"], feed)[0].astype(np.float32)
        responses, start = [], 0
        for p in parts:
            n = p["input_ids"].shape[0]
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("logits", logits[start:start + n])]))
            start += n
        return responses
