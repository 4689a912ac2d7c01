"""A candidate that stalls: TensorRT-LLM ensemble I/O, decoupled, and it never ends an answer. A prompt with
"then stall" in it gets one chunk first; any other gets nothing. Its streams stay open until it is unloaded, as a
request that reaches a candidate just as it unloads can stay unanswered."""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.open = []              # the stalled requests' senders, kept so that nothing ends their streams

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            prompt = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0].decode()
            if "then stall" in prompt.lower():
                text = np.array([["[fake silent] first words".encode()]], dtype=object)
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("text_output", text)]))
            self.open.append(sender)
        return None
