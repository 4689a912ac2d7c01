"""Triton python model `zooter_route` (CPU repositories): text -> the decision, in one stub round trip.

It runs the in-process Router itself (zooter.runtime.router.Router on the bundle's files in this
folder): the same tokenizer, the same session options (zooter.runtime.session.open_session), the
same decision rule (zooter.runtime.decision), so a query is routed here exactly as in an app. One
python step instead of tokenize -> router -> decide saves two process round trips a request
(docs/triton.md, "What each lever gave").

Dynamic batching only gathers requests into one execute(): each request still runs on its own, at
its own width, never padded with another (a dynamic int8 model takes its activation scales from the
whole batch, so merging requests could change decisions). The rows of one request are routed
together, as Router.route_batch routes a list. Bad input fails only its request, with INVALID_ARG
(HTTP 400) naming the row.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from zooter.runtime.router import Router
from zooter.runtime.tokenize import EmptyQueryError, clean_query


def decision_tensors(decisions, labels):
    """The outputs every routing model answers with, from zooter.runtime.router.Decision objects."""
    n = len(decisions)
    return [pb_utils.Tensor("candidate", np.array([[d.candidate.encode()] for d in decisions], dtype=object)),
            pb_utils.Tensor("probabilities", np.array([[d.probabilities[x] for x in labels] for d in decisions], dtype=np.float32)),
            pb_utils.Tensor("expected_rewards", np.array([[d.expected_rewards[x] for x in labels] for d in decisions], dtype=np.float32)),
            pb_utils.Tensor("confidence", np.array([[d.confidence] for d in decisions], dtype=np.float32).reshape(n, 1)),
            pb_utils.Tensor("ranking", np.array([[x.encode() for x in d.ranking] + [b""] * (len(labels) - len(d.ranking))
                                                 for d in decisions], dtype=object))]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"]
        decision = json.loads((folder / "routing.json").read_text())["decision"]
        threads = int(params.get("intra_op_threads") or 0) or None
        self.router = Router.load(folder, providers=["CPUExecutionProvider"], threads=threads,
                                  lam=decision["lambda"], tolerance=decision["tolerance"])
        self.max_text_bytes = int(params["max_text_bytes"])

    def _problem(self, rows):
        for i, raw in enumerate(rows):
            if len(raw) > self.max_text_bytes:
                return (f"row {i}: text of {len(raw)} bytes is over the {self.max_text_bytes}-byte limit "
                        f"(the router reads only the first {self.router.max_length} tokens; send less)")
            try:
                clean_query(raw)
            except EmptyQueryError:
                return f"row {i}: empty text: give the query to route"
        return None

    def execute(self, requests):
        E = pb_utils.TritonError       # the stub adds its classes to pb_utils after importing this file
        responses = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1).tolist()
            problem = self._problem(rows)
            if problem:
                responses.append(pb_utils.InferenceResponse(error=E(f"zooter_route: {problem}", E.INVALID_ARG)))
                continue
            decisions = self.router.route_batch(rows, batch_size=max(1, len(rows)))
            responses.append(pb_utils.InferenceResponse(decision_tensors(decisions, self.router.labels)))
        return responses
