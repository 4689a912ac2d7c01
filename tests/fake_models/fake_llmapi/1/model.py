"""A candidate with TensorRT-LLM I/O answering min(max_tokens, NATURAL) words. When its config declares
finish_reason (fake_llmapi) it says it, as TensorRT-LLM's LLM-API model does; else (fake_counted) it gives
the token counts."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

NATURAL = 6     # tests/test_route_on.py's NATURAL


class TritonPythonModel:
    def initialize(self, args):
        self.llmapi = "finish_reason" in {o["name"] for o in json.loads(args["model_config"])["output"]}

    def execute(self, requests):
        out = []
        for r in requests:
            prompt = pb_utils.get_input_tensor_by_name(r, "text_input").as_numpy().reshape(-1)[0].decode()
            n = int(pb_utils.get_input_tensor_by_name(r, "max_tokens").as_numpy().reshape(-1)[0])
            words = min(n, NATURAL)
            tensors = [pb_utils.Tensor("text_output", np.array([[" ".join(["word"] * words).encode()]], dtype=object))]
            if self.llmapi:
                finish = b"length" if n < NATURAL else b"stop"
                tensors.append(pb_utils.Tensor("finish_reason", np.array([[finish]], dtype=object)))
            else:
                tensors += [pb_utils.Tensor("prompt_tokens", np.array([[len(prompt.split())]], dtype=np.int32)),
                            pb_utils.Tensor("completion_tokens", np.array([[words]], dtype=np.int32))]
            out.append(pb_utils.InferenceResponse(tensors))
        return out
