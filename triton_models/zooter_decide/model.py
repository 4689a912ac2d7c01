"""Triton python model `zooter_decide`: logits -> candidate name and probabilities.

Labels, costs and the decision rule come from the bundle (routing.json, written by
`zooter triton build`) and zooter.runtime.decision, so Triton decides exactly like the Router.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from zooter.runtime.decision import choose, softmax


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        routing = json.loads((Path(args["model_repository"]) / args["model_version"] / "routing.json").read_text())
        self.labels = np.array([s.encode() for s in routing["labels"]], dtype=object)
        self.costs = routing.get("costs")
        self.cost_lambda = float(config["parameters"]["cost_lambda"]["string_value"] or 0)
        if self.cost_lambda and self.costs is None:
            raise pb_utils.TritonModelException("cost_lambda is set but the bundle/candidates give no costs")

    def execute(self, requests):
        logits = [pb_utils.get_input_tensor_by_name(r, "logits").as_numpy() for r in requests]
        probs = softmax(np.concatenate(logits)).astype(np.float32)
        chosen = choose(probs, self.costs, self.cost_lambda)
        responses, start = [], 0
        for part in logits:
            n = part.shape[0]
            names = self.labels[chosen[start:start + n]].reshape(n, 1)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("candidate", names),
                                                         pb_utils.Tensor("probabilities", probs[start:start + n])]))
            start += n
        return responses
