"""Triton python model `zooter` (BLS, decoupled): route a query, then stream the chosen candidate's answer.

For each request:
  1. call `zooter_route` (tokenize -> router -> decide) for the probabilities;
  2. rank the candidates with zooter.runtime.decision.ranked (the Router's rule, cost-aware when
     lambda is set);
  3. call the first candidate that has a Triton model and is ready, with the TensorRT-LLM ensemble
     inputs the client sent, and stream its `text_output` back with `candidate` set;
  4. if that candidate is not ready, or answers with an error, go on to the next one and say so
     in `note`. A request fails only when no candidate can answer.
Errors are sent as TritonError responses; nothing here raises into the server.
"""

import json
import queue
import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from zooter.runtime.decision import check_weight, ranked

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _str_tensor(name, text):
    return pb_utils.Tensor(name, np.array([[text.encode("utf-8")]], dtype=object))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        routing = json.loads((Path(args["model_repository"]) / args["model_version"] / "routing.json").read_text())
        self.labels = routing["labels"]
        self.costs = routing.get("costs")
        self.serving = routing["candidates"]            # label -> {"model": name or None, "why": str}
        self.lam = check_weight(routing["decision"]["lambda"], "routing.json decision.lambda")
        self.default_max_tokens = int(params.get("default_max_tokens") or 128)
        self.input_names = [i["name"] for i in config["input"]]
        # Threads wait on other models most of the time; 64 bounds the open streams per instance.
        self.slots = threading.BoundedSemaphore(64)

    def execute(self, requests):
        # One daemon thread a request (a pool's workers are joined when the stub exits, so one stuck
        # on a candidate would hold the server's stop until its exit timeout).
        for request in requests:
            threading.Thread(target=self._answer_when_free, args=(request,), name="zooter", daemon=True).start()
        return None

    def _answer_when_free(self, request):
        with self.slots:
            self._answer(request)

    # --- one request ------------------------------------------------------------------------
    def _answer(self, request):
        sender = request.get_response_sender()
        try:
            self._route_and_forward(request, sender)
        except Exception as err:  # a bug must still end the stream with a message, not hang the client
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"zooter: {type(err).__name__}: {err}")),
                        flags=FINAL)

    def _route_and_forward(self, request, sender):
        text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()
        if text.shape[0] != 1:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"zooter: send one query per request (got a batch of {text.shape[0]}); streams are per query")),
                flags=FINAL)
            return
        query = text.reshape(-1)[:1].astype(object)
        routed = pb_utils.InferenceRequest(
            model_name="zooter_route", requested_output_names=["candidate", "probabilities"],
            inputs=[pb_utils.Tensor("text", query.reshape(1, 1))]).exec()
        if routed.has_error():
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(routed.error().message())), flags=FINAL)
            return
        probs = pb_utils.get_output_tensor_by_name(routed, "probabilities").as_numpy()[0]
        order = [self.labels[i] for i in ranked(probs, self.costs, self.lam)]

        forwarded = self._candidate_inputs(request)
        skipped = []
        for label in order:
            model = self.serving.get(label, {}).get("model")
            if not model:
                skipped.append(f"{label}: {self.serving.get(label, {}).get('why', 'no Triton model')}")
                continue
            if not self._ready(model):
                skipped.append(f"{label}: model {model} is not ready")
                continue
            note = "" if not skipped else f"fallback to {label}, the next most probable candidate; " + "; ".join(skipped)
            error = self._stream_from(label, model, forwarded, note, sender)
            if error is None:
                sender.send(flags=FINAL)
                return
            skipped.append(f"{label}: {error}")
            if sender.is_cancelled():
                sender.send(flags=FINAL)       # every stream ends with a final flag, or the model cannot unload
                return
        sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
            "zooter: no candidate could answer: " + "; ".join(skipped))), flags=FINAL)

    @staticmethod
    def _ready(model):
        try:
            return pb_utils.is_model_ready(model)
        except Exception:          # a model this server does not know is not ready either
            return False

    def _candidate_inputs(self, request):
        tensors = []
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                tensors.append(pb_utils.Tensor(name, tensor.as_numpy()))
        if pb_utils.get_input_tensor_by_name(request, "max_tokens") is None:
            tensors.append(pb_utils.Tensor("max_tokens", np.array([[self.default_max_tokens]], dtype=np.int32)))
        return tensors

    def _stream_from(self, label, model, inputs, note, sender):
        """Forward the candidate's responses; returns None on success, else the error text.

        A helper thread reads the candidate's stream: a request that reached a candidate as it was
        being unloaded can wait forever for responses, and this thread must still end the client's
        stream (the model cannot unload while a stream of ours is open). So every second without a
        response, the candidate's readiness is checked, and a candidate gone away is an error (the
        caller falls back); the abandoned reader is a daemon and dies with the stub.
        """
        received = queue.SimpleQueue()

        def read():
            try:
                request = pb_utils.InferenceRequest(model_name=model, requested_output_names=["text_output"],
                                                    inputs=inputs)
                for response in request.exec(decoupled=True):
                    received.put(response)
            except pb_utils.TritonModelException as err:
                received.put(err)
            received.put(None)

        threading.Thread(target=read, name="zooter-read", daemon=True).start()
        while True:
            try:
                response = received.get(timeout=1.0)
            except queue.Empty:
                if not self._ready(model):
                    return f"model {model} was unloaded mid-answer"
                continue
            if response is None:
                return None
            if isinstance(response, Exception):
                return f"model {model} failed: {response}"
            if response.has_error():
                return f"model {model} failed: {response.error().message()}"
            out = pb_utils.get_output_tensor_by_name(response, "text_output")
            if out is None:          # the empty final response that closes a stream
                continue
            chunk = "".join(_text(v) for v in out.as_numpy().reshape(-1))
            sender.send(pb_utils.InferenceResponse([_str_tensor("text_output", chunk),
                                                    _str_tensor("candidate", label), _str_tensor("note", note)]))
            if sender.is_cancelled():
                return None

    def finalize(self):
        # Unloading waits for our open streams first (each ends with a final flag, see _stream_from);
        # request and reader threads are daemons, so none can keep the stub from exiting.
        pass
