"""Triton python model: a CPU stand-in for one candidate, with TensorRT-LLM ensemble I/O.

It forwards the request to `zooter_standin_llm` (one copy of SmolLM2-135M-Instruct shared by all
stand-ins) with its candidate name, and streams the answer back unchanged (text_output, and the
finish_reason and token counts of the final response). Decoupled: execute()
hands each request to a thread and returns.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.candidate = config["parameters"]["candidate"]["string_value"]
        self.input_names = [i["name"] for i in config["input"]]
        self.max_text_bytes = int(config["parameters"].get("max_text_bytes", {}).get("string_value") or 65536)
        self.output_names = [o["name"] for o in config["output"]]
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

    def finalize(self):
        self.pool.shutdown(wait=True)
