"""Answers "<model> echo:" and the prompt's words reversed, cut at max_tokens words; a prompt with "fail" in it
gets an error response. TensorRT-LLM ensemble I/O; decoupled (echo_stream) or not (echo), as its config says."""
import json
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        self.name = args["model_name"]
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(self.config)

    def execute(self, requests):
        responses = []
        for request in requests:
            prompt = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0].decode()
            max_tokens = pb_utils.get_input_tensor_by_name(request, "max_tokens")
            limit = int(max_tokens.as_numpy().reshape(-1)[0]) if max_tokens is not None else 100
            stream = pb_utils.get_input_tensor_by_name(request, "stream")
            assert stream is None or not bool(stream.as_numpy().reshape(-1)[0]), "client asked for streaming"
            words = (self.name + " echo: " + " ".join(reversed(prompt.split()))).split()[:limit]
            if "fail" in prompt:
                response = pb_utils.InferenceResponse(error=pb_utils.TritonError("asked to fail"))
            else:
                text = np.array([[" ".join(words).encode()]], dtype=object)
                response = pb_utils.InferenceResponse([pb_utils.Tensor("text_output", text)])
            if self.decoupled:
                sender = request.get_response_sender()
                sender.send(response)
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                responses.append(response)
        return None if self.decoupled else responses
