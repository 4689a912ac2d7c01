"""A candidate with TensorRT-LLM ensemble I/O that is not decoupled: one response, the whole text."""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            text = pb_utils.get_input_tensor_by_name(r, "text_input").as_numpy().reshape(-1)[0].decode()
            n = int(pb_utils.get_input_tensor_by_name(r, "max_tokens").as_numpy().reshape(-1)[0])
            answer = f"[fake TensorRT-LLM ensemble] {n} tokens for: {text}"
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("text_output", np.array([[answer.encode()]], dtype=object))]))
        return out
