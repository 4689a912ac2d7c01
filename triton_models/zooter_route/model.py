"""Triton python model `zooter_route` (CPU repositories): text -> the decision, in one stub round trip.

It runs the in-process Router itself (zooter.runtime.router.Router on the bundle's files in this
folder): the same tokenizer, the same session options (zooter.runtime.session.open_session), the
same decision rule (zooter.runtime.decision), so a query is routed here exactly as in an app. One
python step instead of tokenize -> router -> decide saves two process round trips a request
(docs/triton.md, "What each lever gave").

Dynamic batching only gathers requests into one execute(): every row of every request still runs
alone at its own width (Router.route_batch), so a decision here is the one Router.route gives the
query in an app, whatever arrived with it (a dynamic int8 model takes its activation scales from the
whole input, so padded rows would change each other's decisions: issue 20). Optional `lambda`, `tolerance` and `candidates`
inputs are Router.route's per-request knobs. Bad input fails only its request, with INVALID_ARG
(HTTP 400) naming the row or the knob.
"""

import json
import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from zooter.runtime.routing import RoutingConfig
from zooter.runtime.tokenize import EmptyQueryError, clean_query
from zooter.triton_models.stub_router import KNOB_ARGS, StubRouter, knobs


def decision_tensors(decisions, labels, allowed=None):
    """The outputs every routing model answers with, from zooter.runtime.router.Decision objects; `allowed`
    keeps `ranking` (the fallback order) within the client's subset."""
    n = len(decisions)
    rankings = [[x for x in d.ranking if allowed is None or x in allowed] for d in decisions]
    return [pb_utils.Tensor("candidate", np.array([[d.candidate.encode()] for d in decisions], dtype=object)),
            pb_utils.Tensor("probabilities", np.array([[d.probabilities[x] for x in labels] for d in decisions], dtype=np.float32)),
            pb_utils.Tensor("expected_rewards", np.array([[d.expected_rewards[x] for x in labels] for d in decisions], dtype=np.float32)),
            pb_utils.Tensor("confidence", np.array([[d.confidence] for d in decisions], dtype=np.float32).reshape(n, 1)),
            pb_utils.Tensor("ranking", np.array([[x.encode() for x in r] + [b""] * (len(labels) - len(r))
                                                 for r in rankings], dtype=object))]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"]
        # The Router itself, with a one-thread twin for requests that queued (zooter.triton_models.stub_router).
        self.routers = StubRouter(folder, RoutingConfig.read(folder), params.get("intra_op_threads"))
        self.router = self.routers.router
        self.max_text_bytes = int(params["max_text_bytes"])
        # Every answer names the router that chose it, and so do the decision counts, one series a router.
        self.router_id = self.routers.router_id
        self.decisions_family = pb_utils.MetricFamily(
            name="zooter_route_decisions_total", kind=pb_utils.MetricFamily.COUNTER,
            description="queries routed by zooter_route, by the router (bundle manifest id) that chose")
        self.decisions = self.decisions_family.Metric(labels={"router": self.router_id})
        # A python-backend metric update is one shared-memory message; two threads at once corrupt it.
        self.metrics_lock = threading.Lock()

    def _count(self, n):
        with self.metrics_lock:
            if self.decisions is not None:              # gone once finalize ran
                self.decisions.increment(n)

    def finalize(self):
        # Metric families must go while the server still listens (the stub's exit would crash them, Triton 2.51).
        with self.metrics_lock:
            self.decisions = self.decisions_family = None

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

    @staticmethod
    def _knobs(request) -> dict:
        """The request's optional knobs as Router.route_batch arguments; ValueError names a bad one."""
        return knobs({name: tensor.as_numpy() for name in KNOB_ARGS
                      if (tensor := pb_utils.get_input_tensor_by_name(request, name)) is not None})

    def execute(self, requests):
        E = pb_utils.TritonError       # the stub adds its classes to pb_utils after importing this file
        responses = []
        router = self.routers.pick(busy=len(requests) > 1)
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1).tolist()
            problem = self._problem(rows)
            if problem is None:
                try:
                    knobs = self._knobs(request)
                    decisions = router.route_batch(rows, batch_size=max(1, len(rows)), **knobs)
                except ValueError as err:     # SettingError: a knob this router cannot take
                    problem = str(err)
            if problem:
                responses.append(pb_utils.InferenceResponse(error=E(f"zooter_route: {problem}", E.INVALID_ARG)))
                continue
            router_ids = np.array([[self.router_id.encode()]] * len(decisions), dtype=object)
            responses.append(pb_utils.InferenceResponse(
                decision_tensors(decisions, router.labels, knobs.get("candidates"))
                + [pb_utils.Tensor("router", router_ids)]))
            self._count(len(decisions))
        return responses
