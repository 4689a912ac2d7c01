"""Triton python model `zooter_decide`: logits -> candidate name and probabilities.

Labels, costs and the decision rule come from the bundle (routing.json, written by
`zooter triton build`) and zooter.runtime.decision, so Triton decides exactly like the Router.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from zooter.runtime.decision import check_weight, choose, softmax


class TritonPythonModel:
    def initialize(self, args):
        routing = json.loads((Path(args["model_repository"]) / args["model_version"] / "routing.json").read_text())
        self.labels = np.array([s.encode() for s in routing["labels"]], dtype=object)
        self.costs = routing.get("costs")
        self.lam = check_weight(routing["decision"]["lambda"], "routing.json decision.lambda")
        if self.lam and self.costs is None:
            raise pb_utils.TritonModelException("routing.json: lambda is set but the bundle/candidates give no costs")

    def execute(self, requests):
        logits = [pb_utils.get_input_tensor_by_name(r, "logits").as_numpy() for r in requests]
        probs = softmax(np.concatenate(logits)).astype(np.float32)
        chosen = choose(probs, self.costs, self.lam)
        responses, start = [], 0
        for part in logits:
            n = part.shape[0]
            names = self.labels[chosen[start:start + n]].reshape(n, 1)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("candidate", names),
                                                         pb_utils.Tensor("probabilities", probs[start:start + n])]))
            start += n
        return responses
