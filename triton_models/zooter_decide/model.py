"""Triton python model `zooter_decide`: the router's logits and reward scores -> the decision.

The rule is zooter.runtime.decision.Rule with the bundle's settings (router.json, beside this file)
and the repository's cost knobs (routing.json, written by `zooter triton build`), so Triton decides
exactly like the in-process Router. Outputs: candidate, probabilities, expected_rewards,
confidence, ranking (candidate names best first, the fallback order) and router (the id of the router
whose router.json this version holds: a reload pins the ensemble's three steps to one version, so it
names the router whose logits it decided on).
"""

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from zooter.runtime.bundle import MANIFEST, Manifest
from zooter.runtime.decision import softmax
from zooter.runtime.routing import RoutingConfig


class TritonPythonModel:
    def initialize(self, args):
        folder = Path(args["model_repository"]) / args["model_version"]
        routing = RoutingConfig.read(folder)
        manifest = Manifest.read_file(folder / MANIFEST)
        self.rule = manifest.rule(routing.lam, routing.tolerance)
        self.router_id = np.array([manifest.router_id.encode()], dtype=object)
        self.names = np.array([s.encode() for s in self.rule.labels] + [b""], dtype=object)   # -1 ranks nothing

    def execute(self, requests):
        logits = [pb_utils.get_input_tensor_by_name(r, "logits").as_numpy() for r in requests]
        rewards = np.concatenate([pb_utils.get_input_tensor_by_name(r, "rewards").as_numpy() for r in requests])
        probs = softmax(np.concatenate(logits))
        made = self.rule.decide(probs, rewards)
        responses, start = [], 0
        for part in logits:
            n = part.shape[0]
            rows = slice(start, start + n)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("candidate", self.names[made.choice[rows]].reshape(n, 1)),
                pb_utils.Tensor("probabilities", probs[rows].astype(np.float32)),
                pb_utils.Tensor("expected_rewards", made.expected[rows].astype(np.float32)),
                pb_utils.Tensor("confidence", made.confidence[rows].astype(np.float32).reshape(n, 1)),
                pb_utils.Tensor("ranking", self.names[made.ranking[rows]]),
                pb_utils.Tensor("router", np.repeat(self.router_id, n).reshape(n, 1))]))
            start += n
        return responses
