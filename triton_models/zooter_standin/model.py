"""Triton python model: a CPU stand-in for one candidate, with the TensorRT-LLM ensemble I/O or, built
with `--stand-in-io llmapi`, the LLM-API model's I/O (parameter `io`).

It forwards the request to `zooter_standin_llm` (one copy of SmolLM2-135M-Instruct shared by all
stand-ins, ensemble I/O) with its candidate name. Ensemble: the answer comes back unchanged
(text_output, and the finish_reason and token counts of the final response). LLM-API: the request is
mapped by zooter.runtime.candidate_io, and the answer is given as that model gives it: streamed
text_output is the whole text so far, finish_reason ("None" until the end) only when the client set
return_finish_reason, no token counts. Decoupled: execute() hands each request to a thread and returns.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from zooter.runtime.candidate_io import ENSEMBLE, LLMAPI, TritonModel, ask_from_inputs, text

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.candidate = config["parameters"]["candidate"]["string_value"]
        self.input_names = [i["name"] for i in config["input"]]
        self.max_text_bytes = int(config["parameters"].get("max_text_bytes", {}).get("string_value") or 65536)
        self.output_names = [o["name"] for o in config["output"]]
        self.io = config["parameters"].get("io", {}).get("string_value") or ENSEMBLE
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="standin")

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._forward, request)
        return None

    def _forward(self, request):
        sender = request.get_response_sender()
        text = pb_utils.get_input_tensor_by_name(request, "text_input")
        size = sum(len(t) for t in text.as_numpy().reshape(-1) if isinstance(t, bytes)) if text is not None else 0
        if size > self.max_text_bytes:       # refused here rather than copied on to the LLM's process
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"stand-in {self.candidate}: text_input of {size} bytes is over the {self.max_text_bytes}-byte limit",
                pb_utils.TritonError.INVALID_ARG)), flags=FINAL)
            return
        try:
            if self.io == LLMAPI:
                self._forward_llmapi(request, sender)
                return
            inputs = [pb_utils.Tensor(name, t.as_numpy()) for name in self.input_names
                      if (t := pb_utils.get_input_tensor_by_name(request, name)) is not None]
            inputs.append(pb_utils.Tensor("stand_in_for", np.array([[self.candidate.encode()]], dtype=object)))
            responses = pb_utils.InferenceRequest(model_name="zooter_standin_llm", inputs=inputs,
                                                  requested_output_names=self.output_names).exec(decoupled=True)
            for response in responses:
                if response.has_error():
                    sender.send(pb_utils.InferenceResponse(error=response.error()), flags=FINAL)
                    return
                outputs = [pb_utils.Tensor(name, out.as_numpy()) for name in self.output_names
                           if (out := pb_utils.get_output_tensor_by_name(response, name)) is not None]
                if outputs:
                    sender.send(pb_utils.InferenceResponse(outputs))
            sender.send(flags=FINAL)
        except Exception as err:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"stand-in {self.candidate}: {type(err).__name__}: {err}")), flags=FINAL)

    def _forward_llmapi(self, request, sender):
        def get(name):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        ask = ask_from_inputs(LLMAPI, get, 128)
        flag = get("return_finish_reason")
        with_finish = flag is not None and bool(flag.reshape(-1)[0])
        llm = TritonModel.declared("zooter_standin_llm", ENSEMBLE,
                                   only=("text_input", "max_tokens", "stream", "temperature", "top_p", "top_k", "random_seed"))
        inputs = [pb_utils.Tensor(name, value) for name, _, _, value in llm.specs(ask)]
        inputs.append(pb_utils.Tensor("stand_in_for", np.array([[self.candidate.encode()]], dtype=object)))
        responses = pb_utils.InferenceRequest(model_name="zooter_standin_llm", inputs=inputs,
                                              requested_output_names=["text_output", "finish_reason"]).exec(decoupled=True)
        so_far, finish = "", "None"
        for response in responses:
            if response.has_error():
                sender.send(pb_utils.InferenceResponse(error=response.error()), flags=FINAL)
                return
            out = pb_utils.get_output_tensor_by_name(response, "text_output")
            end = pb_utils.get_output_tensor_by_name(response, "finish_reason")
            if end is not None:
                finish = text(end.as_numpy())
            if out is None:
                continue
            so_far += text(out.as_numpy())
            if ask.stream:
                sender.send(self._llmapi_response(so_far, "None", with_finish))
        # The last response (the only one when not streaming) holds the whole answer and how it ended.
        sender.send(self._llmapi_response(so_far, finish, with_finish), flags=FINAL)

    @staticmethod
    def _llmapi_response(answer, finish, with_finish):
        tensors = [pb_utils.Tensor("text_output", np.array([[answer.encode("utf-8")]], dtype=object))]
        if with_finish:
            tensors.append(pb_utils.Tensor("finish_reason", np.array([[finish.encode()]], dtype=object)))
        return pb_utils.InferenceResponse(tensors)

    def finalize(self):
        self.pool.shutdown(wait=True)
