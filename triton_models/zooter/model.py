"""Triton python model `zooter` (BLS, decoupled): route a query, then stream the chosen candidate's answer.

For each request:
  0. check the client's input (text_input present, one UTF-8 prompt, within max_prompt_bytes;
     max_tokens within 1..limit; `messages` a JSON conversation; `route_on` a known mode): a bad
     request is answered at once with INVALID_ARG (HTTP 400) and counted as a failure in Triton's
     metrics, without touching any candidate;
  1. pick the text to route on with zooter.runtime.conversation.route_text, the one policy the gateway
     uses too: from `messages` when the client sent the conversation (the gateway does), else from
     text_input as one user turn; by `route_on` (the request's, else the repository's, from
     `zooter triton build --route-on`); cut to fit zooter_route's byte limit;
  2. route it: the candidates best first (`ranking`), by the bundle's one decision rule
     (zooter.runtime.decision), and the choice's `confidence`. In a CPU repository (--router-backend
     python) this stub runs the Router itself, on the bundle's files in its own version folder
     (zooter.triton_models.stub_router, as zooter_route does): no second python-backend round trip on
     the answer's path. With --router-backend onnxruntime it asks `zooter_route` (the ensemble, whose
     router runs on Triton's onnxruntime backend, GPU);
  3. call the first candidate that has a Triton model and is ready, with the TensorRT-LLM ensemble
     inputs the client sent (text_input: the whole prompt), or, for a candidate with the LLM-API
     model's I/O (routing.json `io`, from serve.io or --stand-in-io), the request mapped onto it by
     zooter.runtime.candidate_io, and stream its `text_output` back (as deltas) with
     `candidate` set; the final response says how the answer ended: `finish_reason` ("length" when
     max_tokens cut it, else "stop": the candidate's own finish_reason where it gives one, else
     inferred from its completion_tokens, else "stop") and `prompt_tokens`, `completion_tokens` when
     the candidate counted them (absent when it did not: never estimated here);
  4. if that candidate is not ready, or answers with an error before its first chunk, go on to the
     next one and say so in `note`. A request fails (UNAVAILABLE) when no candidate can answer, or
     when the answering candidate fails after it has sent text: the stream then ends with an error,
     never with another candidate's text glued on and never silently cut.
A client that names the candidate (`answer_with`) skips routing and fallback: that candidate answers
or the request fails. `route_lambda`, `route_tolerance` and `route_candidates` are the router's
per-request knobs (python router backend only).
Threads: execute() checks each request and hands it to a worker thread that waits for work (_Workers); the
worker routes, calls the candidate, and sends each chunk itself as it reads it (no thread hand-off between the
candidate's response and the client's); a watchdog thread ends the answers of candidates that stall (_stream_from).
Outcomes are counted in `zooter_requests_total{outcome}` and fallbacks in
`zooter_fallbacks_total{chosen, answered}` on Triton's metrics port. Errors are sent as TritonError
responses; nothing raises into the server, but the input check, which fails the request it is
answering inside execute() so that nv_inference_request_failure counts it.
"""

import gc
import json
import queue
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from zooter.runtime.candidate_io import END_OUTPUTS, ENSEMBLE, Reading, TritonModel, ask_from_inputs, text
from zooter.runtime.conversation import DEFAULT_ROUTE_ON, ROUTE_TEXT_BYTES, check_route_on, route_text, turns_from_json
from zooter.runtime.routing import RoutingConfig
from zooter.triton_models.stub_router import StubRouter, knobs

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# Every client error starts so: gRPC streams carry an error's message but not its code.
BAD_INPUT = "zooter: bad input: "
OUTCOMES = ("ok", "fallback", "bad_input", "route_error", "no_candidate", "failed_mid_answer", "cancelled")
# The client's routing inputs -> the router's knobs (zooter_route's inputs); ours, never forwarded to a candidate.
KNOBS = {"route_lambda": "lambda", "route_tolerance": "tolerance", "route_candidates": "candidates"}
ROUTING_INPUTS = ("answer_with", "messages", "route_on", *KNOBS)
REQUEST_THREAD = "zooter"       # the name of the threads that answer requests (_Workers)


class _Answered(Exception):
    """The request was already answered (with the router's error); `outcome` says how it ended."""

    def __init__(self, outcome):
        super().__init__(outcome)
        self.outcome = outcome


def _text(value) -> str:
    return text([value])


def _str_tensor(name, text):
    return pb_utils.Tensor(name, np.array([[text.encode("utf-8")]], dtype=object))


def _numpy(inputs, name):
    tensor = inputs.get(name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        routing = RoutingConfig.read(Path(args["model_repository"]) / args["model_version"])
        self.serving = routing.candidates               # label -> {"model": name or None, "why": str}
        self.default_max_tokens = int(params.get("default_max_tokens") or 128)
        self.max_tokens_limit = int(params.get("max_tokens_limit") or 4096)
        self.max_text_bytes = int(params.get("max_text_bytes") or 65536)
        self.max_prompt_bytes = int(params.get("max_prompt_bytes") or 1 << 20)
        self.route_on = check_route_on(params.get("route_on") or DEFAULT_ROUTE_ON, "parameter route_on")
        # The routed text is cut to what zooter_route takes (the cut keeps the head, as the tokenizer does).
        self.route_bytes = min(ROUTE_TEXT_BYTES, self.max_text_bytes)
        self.knobs_supported = routing.router_backend == "python"
        # A CPU repository routes here, on the bundle in this version folder; `zooter triton reload` gives this
        # model a new version with the new bundle, as it does zooter_route. Else (the onnxruntime ensemble, or a
        # repository built before this model routed itself) zooter_route answers.
        folder = Path(args["model_repository"]) / args["model_version"]
        self.routers = StubRouter(folder, routing, params.get("intra_op_threads")) \
            if self.knobs_supported and (folder / "router.json").is_file() else None
        self.routing_now = 0                # routings in flight in this process: more than one, one thread each
        self.routing_lock = threading.Lock()
        self.input_names = [i["name"] for i in config["input"] if i["name"] not in ROUTING_INPUTS]
        # Threads wait on other models most of the time; 64 bounds the open streams per instance.
        self.slots = threading.BoundedSemaphore(64)
        self.workers = _Workers(REQUEST_THREAD)
        self.watchdog = _Watchdog(self._ready, self.workers)
        self.in_flight = 0                  # answers begun and not ended (finalize waits for them)
        self.in_flight_ended = threading.Condition()
        # The python backend's custom metrics (pb_utils classes exist only from initialize on).
        self.requests_total = pb_utils.MetricFamily(
            name="zooter_requests_total", kind=pb_utils.MetricFamily.COUNTER,
            description="requests to the zooter model by outcome: " + ", ".join(OUTCOMES))
        self.fallbacks_total = pb_utils.MetricFamily(
            name="zooter_fallbacks_total", kind=pb_utils.MetricFamily.COUNTER,
            description="answers given by another candidate than the router's choice, by chosen and answering candidate")
        self.outcomes = {o: self.requests_total.Metric(labels={"outcome": o}) for o in OUTCOMES}
        self.fallbacks = {}
        # Every metric call holds this lock: a python-backend metric sends its update through one shared-memory
        # message, and two threads updating at once corrupt it (tritonserver dies with SIGSEGV, Triton 2.51).
        self.metrics_lock = threading.Lock()

    def _count(self, outcome):
        with self.metrics_lock:
            if outcome in self.outcomes:                # gone once finalize ran
                self.outcomes[outcome].increment(1)

    def _fallback(self, chosen, answered):
        with self.metrics_lock:
            if self.fallbacks_total is None:            # finalize ran
                return
            key = (chosen, answered)
            if key not in self.fallbacks:
                self.fallbacks[key] = self.fallbacks_total.Metric(labels={"chosen": chosen, "answered": answered})
            self.fallbacks[key].increment(1)

    def execute(self, requests):
        E = pb_utils.TritonError
        refused = []
        for request in requests:
            # The request's inputs by name, read once (pb_utils.get_input_tensor_by_name lists them all at every call).
            inputs = {tensor.name(): tensor for tensor in request.inputs()}
            problem = self._check(inputs)
            if problem is None:
                self.workers.run(self._answer, request, inputs)
                continue
            request.get_response_sender().send(pb_utils.InferenceResponse(error=E(f"{BAD_INPUT}{problem}", E.INVALID_ARG)),
                                               flags=FINAL)
            self._count("bad_input")
            refused.append(problem)
        # Triton counts a request as failed only when execute() raises; with no dynamic batching each call
        # holds one request, so raising fails exactly the one already answered with its error above.
        if refused and len(requests) == 1:
            raise pb_utils.TritonModelException(f"{BAD_INPUT}{refused[0]}")
        return None

    def _check(self, inputs):
        """What is wrong with the client's request (its inputs by name), or None."""
        tensor = inputs.get("text_input")
        if tensor is None:
            return "text_input is required (the query to answer)"
        text = tensor.as_numpy()
        if text.dtype != object:
            return f"text_input must be a string, got {text.dtype}"
        if text.ndim and text.shape[0] != 1 or text.size != 1:
            return f"send one query per request (got {text.size}); streams are per query"
        raw = text.reshape(-1)[0]
        raw = raw if isinstance(raw, bytes) else str(raw).encode("utf-8", "replace")
        if not raw.strip():
            return "empty text_input: give the query to answer"
        if len(raw) > self.max_prompt_bytes:
            return f"text_input of {len(raw)} bytes is over the {self.max_prompt_bytes}-byte limit"
        try:
            self._route_text(inputs)
        except ValueError as err:          # a bad `messages` or `route_on`, or nothing to route on
            return str(err)
        max_tokens = inputs.get("max_tokens")
        if max_tokens is not None:
            values = max_tokens.as_numpy().reshape(-1)
            if values.size != 1 or not 1 <= int(values[0]) <= self.max_tokens_limit:
                return f"max_tokens must be one number in 1..{self.max_tokens_limit}, got {values.tolist()}"
        knobs = [name for name in KNOBS if name in inputs]
        named = inputs.get("answer_with")
        if named is not None:
            names = [_text(v) for v in named.as_numpy().reshape(-1)]
            if len(names) != 1 or names[0] not in self.serving:
                return f"answer_with must name one candidate of {sorted(self.serving)}, got {names}"
            if knobs:
                return f"answer_with names the candidate, so the routing inputs {knobs} do not apply; send one or the other"
        if knobs and not self.knobs_supported:
            return (f"{knobs}: per-request routing knobs need the python router backend (zooter triton build "
                    "--router-backend python); this repository routes with an ensemble")
        return None

    def _route_text(self, inputs) -> str:
        """The text to route on (runtime.conversation's policy); ValueError names what is wrong."""
        mode = self.route_on
        tensor = inputs.get("route_on")
        if tensor is not None:
            mode = check_route_on(_text(tensor.as_numpy().reshape(-1)[0]), "route_on")
        tensor = inputs.get("messages")
        if tensor is not None:
            turns = turns_from_json(_text(tensor.as_numpy().reshape(-1)[0]))
        else:
            turns = [("user", _text(inputs["text_input"].as_numpy().reshape(-1)[0]))]
        return route_text(turns, mode, self.route_bytes)

    # --- one request ------------------------------------------------------------------------
    def _answer(self, request, inputs):
        self.slots.acquire()
        with self.in_flight_ended:
            self.in_flight += 1
        sender = request.get_response_sender()
        self._serve(lambda: self._route_and_forward(inputs, sender), sender)

    def _serve(self, answer, sender):
        """Run answer() -> its outcome, or None when a candidate stalled and the watchdog took the answer over
        (the taker serves the rest); count the outcome and free the request's slot, whatever fails."""
        outcome = "route_error"
        try:
            outcome = answer()
        except Exception as err:  # a bug must still end the stream with a message, not hang the client
            try:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"zooter: {type(err).__name__}: {err}")),
                            flags=FINAL)
            except Exception:     # the stream had already ended (or its client is gone): nothing more to tell
                traceback.print_exc()
        finally:
            if outcome is not None:
                try:
                    self._count(outcome)
                finally:
                    self.slots.release()
                    with self.in_flight_ended:
                        self.in_flight -= 1
                        self.in_flight_ended.notify_all()

    def _route(self, inputs, sender):
        """(the candidates to try, best first; the router's confidence; its id). A named candidate (`answer_with`) is the only one, without a confidence or a router.
        Raises _Answered after passing on the router's error."""
        named = inputs.get("answer_with")
        if named is not None:
            return [_text(named.as_numpy().reshape(-1)[0])], None, None
        text = self._route_text(inputs)
        asked = {knob: inputs[name].as_numpy().reshape(1, -1) for name, knob in KNOBS.items() if name in inputs}
        if self.routers is None:
            return self._ask_zooter_route(text, asked, sender)
        with self.routing_lock:
            busy = self.routing_now > 0
            self.routing_now += 1
        try:
            decision = self.routers.pick(busy).route(text, **knobs(asked))
        except ValueError as err:       # a knob this router cannot take (SettingError), or nothing to route on
            E = pb_utils.TritonError
            sender.send(pb_utils.InferenceResponse(error=E(f"{BAD_INPUT}{err}", E.INVALID_ARG)), flags=FINAL)
            raise _Answered("bad_input") from None
        finally:
            with self.routing_lock:
                self.routing_now -= 1
        return decision.ranking, decision.confidence, self.routers.router_id

    def _ask_zooter_route(self, text, asked, sender):
        """_route through the zooter_route model (the onnxruntime-backend ensemble, or an older repository's python
        one): one more python-backend round trip on the answer's path."""
        E = pb_utils.TritonError
        inputs = [pb_utils.Tensor("text", np.array([[text.encode("utf-8")]], dtype=object))]
        inputs += [pb_utils.Tensor(knob, value) for knob, value in asked.items()]
        # `router` names the router that chose (the python zooter_route, or the ensemble's decide step; a reload
        # changes it, zooter triton reload). Every zooter_route built with this model.py answers it: the build
        # copies both, and a reload never replaces this file.
        names = ["ranking", "confidence", "router"]
        routed = pb_utils.InferenceRequest(model_name="zooter_route", requested_output_names=names, inputs=inputs).exec()
        if routed.has_error():
            error = routed.error()
            code = error.code() if error.code() == E.INVALID_ARG else E.UNAVAILABLE
            prefix = BAD_INPUT if code == E.INVALID_ARG else "zooter: "
            sender.send(pb_utils.InferenceResponse(error=E(f"{prefix}{error.message()}", code)), flags=FINAL)
            raise _Answered("bad_input" if code == E.INVALID_ARG else "route_error")
        order = [x for x in map(_text, pb_utils.get_output_tensor_by_name(routed, "ranking").as_numpy().reshape(-1)) if x]
        router = pb_utils.get_output_tensor_by_name(routed, "router")
        return (order, float(pb_utils.get_output_tensor_by_name(routed, "confidence").as_numpy().reshape(-1)[0]),
                None if router is None else _text(router.as_numpy().reshape(-1)[0]))

    def _route_and_forward(self, inputs, sender) -> str | None:
        """Route, then answer with the first candidate that can: the outcome, or None when a stalled candidate's
        answer was taken over by the watchdog (see _stream_from)."""
        E = pb_utils.TritonError
        try:
            order, confidence, router = self._route(inputs, sender)
        except _Answered as answered:
            return answered.outcome

        forwarded = self._candidate_inputs(inputs)
        max_tokens = int(next(t.as_numpy().reshape(-1)[0] for t in forwarded if t.name() == "max_tokens"))
        stream = inputs.get("stream")
        streaming = stream is not None and bool(stream.as_numpy().reshape(-1)[0])
        skipped = []

        def inputs_numpy(name):
            return _numpy(inputs, name)

        def failed(label, error, started):
            """The outcome once `label` failed with `error`, or None to try the next candidate."""
            if started:
                sender.send(pb_utils.InferenceResponse(error=E(f"zooter: {label} failed mid-answer: {error}",
                                                               E.UNAVAILABLE)), flags=FINAL)
                return "failed_mid_answer"
            skipped.append(f"{label}: {error}")
            if sender.is_cancelled():
                sender.send(flags=FINAL)       # every stream ends with a final flag, or the model cannot unload
                return "cancelled"
            return None

        def forward(start):
            for at in range(start, len(order)):
                label = order[at]
                model = self.serving.get(label, {}).get("model")
                if not model:
                    skipped.append(f"{label}: {self.serving.get(label, {}).get('why', 'no Triton model')}")
                    continue
                note = "" if not skipped else f"fallback to {label}, the next candidate in the ranking; " + "; ".join(skipped)
                # Not streamed: the answer is sent whole, with how it ended, as one response (Triton's HTTP
                # /generate takes exactly one).
                whole = None if streaming else []
                io = self.serving[label].get("io") or ENSEMBLE
                # Our inputs are the ensemble I/O: an ensemble candidate gets them all as sent (bad_words and
                # the other knobs included); another I/O gets the request mapped onto its inputs, streaming only
                # where the model is decoupled (as the build read it; unread, an LLM-API model as TensorRT-LLM
                # ships it: not decoupled, so it answers whole and the client gets that as one piece).
                described = TritonModel.declared(model, io)
                described.decoupled = bool(self.serving[label].get("decoupled", io == ENSEMBLE))
                # What the client asked, mapped by runtime.candidate_io onto a candidate with another I/O than ours.
                given = forwarded if io == ENSEMBLE else [pb_utils.Tensor(name, value) for name, _, _, value in
                                                          described.specs(ask_from_inputs(ENSEMBLE, inputs_numpy, max_tokens))]
                reading = Reading(io, max_tokens, streaming and described.decoupled)

                def resume(error, started, label=label, at=at):      # on the watchdog's worker, once this one stalled
                    return failed(label, error, started) or forward(at + 1)
                result = self._stream_from(label, model, given, note, confidence, sender, reading, whole, router,
                                           resume)
                if result is None:
                    return None                    # taken over: resume() answers the rest
                error, started = result
                if error is None:
                    if sender.is_cancelled():      # nobody to tell how it ended; the final flag still closes it
                        sender.send(flags=FINAL)
                    else:
                        sender.send(self._ending(label, note, reading, whole, confidence, router), flags=FINAL)
                    if label != order[0]:
                        self._fallback(order[0], label)
                    return "ok" if label == order[0] else "fallback"
                # Readiness is asked only once a candidate failed (a model that is not loaded refuses at once):
                # one IPC round trip less on every answer's path, and the note still says why.
                if not started and not self._ready(model):
                    error = f"model {model} is not ready"
                outcome = failed(label, error, started)
                if outcome is not None:
                    return outcome
            sender.send(pb_utils.InferenceResponse(error=E("zooter: no candidate could answer: " + "; ".join(skipped),
                                                           E.UNAVAILABLE)), flags=FINAL)
            return "no_candidate"

        return forward(0)

    @staticmethod
    def _ending(label, note, reading, whole=None, confidence=None, router=None):
        """The final response: how the answer ended (finish_reason; the token counts the candidate gave,
        absent when it gave none), with the whole answer when it was not streamed, else no text."""
        tensors = [_str_tensor("text_output", "".join(whole or ())), _str_tensor("candidate", label),
                   _str_tensor("note", note), _str_tensor("finish_reason", reading.finish)]
        counts = {name: reading.count(name) for name in END_OUTPUTS[1:]}
        tensors += [pb_utils.Tensor(name, np.array([[n]], dtype=np.int32)) for name, n in counts.items() if n is not None]
        if whole is not None and confidence is not None:
            tensors.append(pb_utils.Tensor("confidence", np.array([[confidence]], dtype=np.float32)))
        if whole is not None and router:
            tensors.append(_str_tensor("router", router))
        return pb_utils.InferenceResponse(tensors)

    @staticmethod
    def _ready(model):
        try:
            return pb_utils.is_model_ready(model)
        except Exception:          # a model this server does not know is not ready either
            return False

    def _candidate_inputs(self, inputs):
        """The client's inputs for an ensemble candidate (our own I/O), max_tokens always."""
        tensors = [pb_utils.Tensor(name, inputs[name].as_numpy()) for name in self.input_names if name in inputs]
        if "max_tokens" not in inputs:
            tensors.append(pb_utils.Tensor("max_tokens", np.array([[self.default_max_tokens]], dtype=np.int32)))
        return tensors

    def _stream_from(self, label, model, inputs, note, confidence, sender, reading, whole, router, resume):
        """Forward the candidate's responses, or gather their text in `whole` (a list) when given; returns
        (None on success else the error text, whether the candidate gave text), or None when the watchdog took
        the answer over. `reading` (its I/O's runtime.candidate_io.Reading) turns each response into new text and
        learns how the answer ended.

        This thread reads the candidate's stream and sends each chunk itself: the first token reaches the client
        with no hand-off to another thread. But a request that reached a candidate as it was being unloaded can
        wait forever for responses, and its client's stream must still end (the model cannot unload while a
        stream of ours is open). So the call is watched (_Watchdog): after a second without a response the
        candidate's readiness is checked, and once it is gone the watchdog abandons this thread (it never sends
        again) and calls resume(error, sent) on a worker of its own, which falls back or ends the stream; the
        stalled thread is a daemon and dies with the stub.
        """
        call = self.watchdog.watch(model, lambda error, sent: self._serve(lambda: resume(error, sent), sender))
        error, responses = None, None
        try:
            # No output named: Triton sends them all, so END_OUTPUTS come along where the candidate has them.
            request = pb_utils.InferenceRequest(model_name=model, requested_output_names=[], inputs=inputs)
            responses = request.exec(decoupled=True)
            for response in responses:
                call.at = time.monotonic()
                if response.has_error():
                    error = f"model {model} failed: {response.error().message()}"
                    break
                outputs = {name: tensor.as_numpy() for name in ("text_output", *END_OUTPUTS)
                           if (tensor := pb_utils.get_output_tensor_by_name(response, name)) is not None}
                chunk = reading.add(outputs)
                if "text_output" not in outputs:          # the empty final response that closes a stream
                    continue
                with call.lock:
                    if call.abandoned:
                        break                              # the taker answers; the stream is drained below
                    if whole is not None:
                        whole.append(chunk)
                    else:
                        tensors = [_str_tensor("text_output", chunk), _str_tensor("candidate", label),
                                   _str_tensor("note", note)]
                        if not call.sent and confidence is not None:     # the decision's confidence rides on the first chunk
                            tensors.append(pb_utils.Tensor("confidence", np.array([[confidence]], dtype=np.float32)))
                        if not call.sent and router:
                            tensors.append(_str_tensor("router", router))
                        try:
                            sender.send(pb_utils.InferenceResponse(tensors))
                        except pb_utils.TritonModelException as err:   # the client's stream failed, not the candidate
                            raise _ClientStreamError(f"sending to the client failed: {err}") from None
                    call.sent = True
                if sender.is_cancelled():
                    break
            else:
                responses = None                           # read to its end: nothing left to drain
        except pb_utils.TritonModelException as err:
            error = f"model {model} failed: {err}"
        except Exception:
            self._drain(responses)
            if not self.watchdog.release(call):
                return None                                # abandoned: the taker answers; this late failure is nobody's
            raise
        self._drain(responses)
        if not self.watchdog.release(call):
            return None                                    # abandoned meanwhile: resume() answers
        return error, call.sent

    def _drain(self, responses):
        """Read the rest of a candidate's stream left early (an error, a client gone, a stall taken over) on a
        worker: the python backend (Triton 2.51) keeps a BLS stream and every response that comes for it until
        the stream is read to its end, however its Python object is dropped; left unread, each one grew the
        stub's shared memory and kept `zooter` from unloading."""
        if responses is not None:
            self.workers.run(_read_to_end, responses)

    def finalize(self):
        # Unloading waits for our open streams first (each ends with a final flag, see _stream_from), but an
        # answer may still be counting its outcome: let it finish (bounded; the threads are daemons).
        self.watchdog.stop()
        with self.in_flight_ended:
            self.in_flight_ended.wait_for(lambda: self.in_flight == 0, timeout=10.0)
        # Metric families must go while the server still listens: left to the stub's exit, their destructors
        # write to shared memory already torn down and the stub dies with SIGSEGV (Triton 2.51).
        with self.metrics_lock:
            self.outcomes, self.fallbacks = {}, {}
            self.requests_total = self.fallbacks_total = None
            gc.collect()


def _read_to_end(responses):
    try:
        for _ in responses:
            pass
    except Exception:          # a stream that failed is over too
        pass


class _ClientStreamError(RuntimeError):
    """Sending to the client failed: no candidate is to blame, and no other one should answer into it."""


class _Workers:
    """Daemon threads that wait for work: a request handed to one that waits wakes it, where a new thread a
    request would cost the stub a thread start (and execute() a wait for it) on the answer's path. A worker is
    made when none waits; each one left waiting a minute ends. Not a concurrent.futures pool: its workers are
    joined when the stub exits, so one stalled on a candidate would hold the server's stop."""

    IDLE_S = 60.0

    def __init__(self, name):
        self.name = name
        self.jobs = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.waiting = 0

    def run(self, job, *args):
        with self.lock:
            spare = self.waiting > 0
            if spare:
                self.waiting -= 1          # this job is that worker's: the next run() makes its own
        self.jobs.put((job, args))
        if not spare:
            threading.Thread(target=self._work, name=self.name, daemon=True).start()

    def _work(self):
        while True:
            try:
                job, args = self.jobs.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self.lock:
                    if self.waiting > 0:   # no run() counts on this worker: end it
                        self.waiting -= 1
                        return
                continue                   # a run() took this worker as spare just now: its job is coming
            try:
                job(*args)
            except Exception:              # a bug of the job's own (answers catch theirs): say so, keep the worker
                traceback.print_exc()
            with self.lock:
                self.waiting += 1


class _Call:
    """One candidate call read on a request's thread: when it last heard from the candidate, whether it sent
    text, and whether the watchdog abandoned it (`lock` orders the two: a chunk is sent only while not)."""

    __slots__ = ("model", "resume", "at", "lock", "sent", "abandoned", "over")

    def __init__(self, model, resume):
        self.model, self.resume = model, resume
        self.at = time.monotonic()
        self.lock = threading.Lock()
        self.sent = self.abandoned = self.over = False


class _Watchdog:
    """Every second, the calls that heard nothing from their candidate for a second: one whose candidate is no
    longer ready is abandoned and its answer resumed on a worker (call.resume(error, sent)). It ticks while
    calls come, and sleeps once none came for a minute, so a request is not the one to wake it (a wake-up on
    the answer's path) unless it is the first after a quiet minute."""

    IDLE_S = 60.0

    def __init__(self, ready, workers):
        self.ready, self.workers = ready, workers
        self.calls = set()
        self.changed = threading.Condition()
        self.last_call = time.monotonic()
        self.asleep = True
        self.stopped = False
        threading.Thread(target=self._watch, name="zooter-watchdog", daemon=True).start()

    def watch(self, model, resume) -> _Call:
        call = _Call(model, resume)
        with self.changed:
            self.calls.add(call)
            self.last_call = call.at
            if self.asleep:
                self.asleep = False
                self.changed.notify()
        return call

    def release(self, call) -> bool:
        """The call is over: False when the watchdog abandoned it first."""
        with call.lock:
            call.over = True
        with self.changed:
            self.calls.discard(call)
        return not call.abandoned

    def stop(self):
        with self.changed:
            self.stopped = True
            self.changed.notify()

    def _watch(self):
        while True:
            with self.changed:
                if self.asleep:
                    self.changed.wait_for(lambda: not self.asleep or self.stopped)
                else:
                    self.changed.wait(1.0)
                if self.stopped:
                    return
                now = time.monotonic()
                if not self.calls and now - self.last_call >= self.IDLE_S:
                    self.asleep = True
                quiet = [c for c in self.calls if now - c.at >= 1.0]
            for call in quiet:
                try:
                    self._check(call)
                except Exception:      # one call's trouble must not stop the watch over the others
                    traceback.print_exc()

    def _check(self, call):
        if self.ready(call.model):
            return
        with call.lock:
            # Over, or heard from since the list was taken (a candidate draining as it unloads still answers).
            if call.over or time.monotonic() - call.at < 1.0:
                return
            call.abandoned = True
        with self.changed:
            self.calls.discard(call)
        self.workers.run(call.resume, f"model {call.model} was unloaded mid-answer", call.sent)
