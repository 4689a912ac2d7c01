"""Echoes the prompt's words reversed, one word a token, cut at max_tokens; the prompt "knobs" gets the sampling
inputs it received as JSON. LLM-API I/O or ensemble I/O, decoupled or not, as its config says (the config is written
by tests/test_candidate_io.py from the product's I/O description). LLM-API: streamed text is the whole text so far,
finish_reason ("None" until the end) only with return_finish_reason. Ensemble: deltas, then the token counts."""
import json
import numpy as np
import triton_python_backend_utils as pb_utils

LLMAPI = {"max_tokens": "sampling_param_max_tokens", "stream": "streaming", "temperature": "sampling_param_temperature",
          "top_p": "sampling_param_top_p", "seed": "sampling_param_seed", "stop": "sampling_param_stop"}
ENSEMBLE = {"max_tokens": "max_tokens", "stream": "stream", "temperature": "temperature", "top_p": "top_p",
            "seed": "random_seed", "stop": "stop_words"}


def value(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = [v.decode() if isinstance(v, bytes) else v.item() for v in tensor.as_numpy().reshape(-1)]
    return values if name in ("sampling_param_stop", "stop_words") else values[0]


class TritonPythonModel:

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.llmapi = "streaming" in {i["name"] for i in config["input"]}
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)

    def execute(self, requests):
        plain = []
        for request in requests:
            names = LLMAPI if self.llmapi else ENSEMBLE
            prompt = value(request, "text_input")
            limit = value(request, names["max_tokens"]) or 16
            stream = bool(value(request, names["stream"]))
            if prompt == "knobs":
                words = [json.dumps({k: value(request, n) for k, n in names.items()}, sort_keys=True)]
            else:
                words = list(reversed(prompt.split()))
            cut = len(words) > limit
            words = words[:limit]
            finish = "length" if cut else "stop"
            sender = request.get_response_sender() if self.decoupled else None
            if sender is None:
                assert not stream, "a model that is not decoupled cannot stream"
            with_finish = bool(value(request, "return_finish_reason"))
            def response(text, end):
                tensors = [pb_utils.Tensor("text_output", np.array([[text.encode()]], dtype=object))]
                if self.llmapi and with_finish:
                    tensors.append(pb_utils.Tensor("finish_reason", np.array([[end.encode()]], dtype=object)))
                return pb_utils.InferenceResponse(tensors)
            if self.llmapi:
                if sender is None:
                    plain.append(response(" ".join(words), finish))
                    continue
                if stream:
                    for i in range(1, len(words)):
                        sender.send(response(" ".join(words[:i]), "None"))
                sender.send(response(" ".join(words), finish), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            pieces = [(" " if i else "") + w for i, w in enumerate(words)] if stream else [" ".join(words)]
            for piece in pieces:
                sender.send(response(piece, ""))
            counts = [pb_utils.Tensor("prompt_tokens", np.array([[len(prompt.split())]], dtype=np.int32)),
                      pb_utils.Tensor("completion_tokens", np.array([[len(words)]], dtype=np.int32))]
            sender.send(pb_utils.InferenceResponse(counts), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return plain if not self.decoupled else None
