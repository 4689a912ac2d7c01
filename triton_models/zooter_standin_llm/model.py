"""Triton python model `zooter_standin_llm`: SmolLM2-135M-Instruct answering for stand-in candidates.

TensorRT-LLM ensemble inputs (text_input, max_tokens, stream, temperature, top_p, top_k,
random_seed, repetition_penalty; the rest are accepted and ignored) -> text_output, streamed token
by token when `stream` is true, else one response; the final response says how the answer ended:
`finish_reason` ("length" when max_tokens cut it, else "stop", as TensorRT-LLM's LLM-API model
names it) and the token counts `prompt_tokens`, `completion_tokens` (the chat-templated prompt and
the generated tokens, the end-of-sequence token not counted). The first chunk names the stand-in, so nobody
mistakes its answer for the real candidate's. Generations run one at a time (one copy of the
weights, 2 cores); requests wait their turn in threads. A cancelled request stops generating.
"""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from zooter.triton_models import standin_llm

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _scalar(request, name, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy().reshape(-1)[0]
    return value.item() if isinstance(value, np.generic) else value


def _text_tensor(text):
    return pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=object))


def _ending(finish, prompt_tokens, completion_tokens):
    return pb_utils.InferenceResponse([
        pb_utils.Tensor("finish_reason", np.array([[finish.encode()]], dtype=object)),
        pb_utils.Tensor("prompt_tokens", np.array([[prompt_tokens]], dtype=np.int32)),
        pb_utils.Tensor("completion_tokens", np.array([[completion_tokens]], dtype=np.int32))])


class _Sender(TextStreamer):
    """Sends each decoded piece of text as one streamed response."""

    def __init__(self, tokenizer, send):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.send = send

    def on_finalized_text(self, text, stream_end=False):
        if text:
            self.send(text)


class _Cancelled(StoppingCriteria):
    def __init__(self, sender):
        self.sender = sender

    def __call__(self, input_ids, scores, **kwargs):
        return self.sender.is_cancelled()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.max_tokens_cap = int(params.get("max_tokens_cap") or 512)
        self.max_text_bytes = int(params.get("max_text_bytes") or 65536)
        self.model, self.tokenizer = standin_llm.load(params.get("model_dir") or None)
        self.generate_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="standin-llm")

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._answer, request)
        return None

    def _answer(self, request):
        sender = request.get_response_sender()
        try:
            self._generate(request, sender)
        except ValueError as err:       # the request's own fault: HTTP 400, gRPC INVALID_ARGUMENT
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"zooter_standin_llm: {err}", pb_utils.TritonError.INVALID_ARG)), flags=FINAL)
        except Exception as err:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"zooter_standin_llm: {type(err).__name__}: {err}")), flags=FINAL)

    def _generate(self, request, sender):
        texts = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)
        if texts.size != 1:
            raise ValueError(f"one prompt per request, got {texts.size}")
        if isinstance(texts[0], bytes) and len(texts[0]) > self.max_text_bytes:
            raise ValueError(f"text_input of {len(texts[0])} bytes is over the {self.max_text_bytes}-byte limit")
        prompt = texts[0].decode("utf-8", errors="replace") if isinstance(texts[0], bytes) else str(texts[0])
        if not prompt.strip():
            raise ValueError("empty text_input")
        max_tokens = int(_scalar(request, "max_tokens", 128))
        if not 0 < max_tokens <= self.max_tokens_cap:
            raise ValueError(f"max_tokens must be in 1..{self.max_tokens_cap}, got {max_tokens}")
        stream = bool(_scalar(request, "stream", False))
        who = _scalar(request, "stand_in_for", b"")
        who = who.decode() if isinstance(who, bytes) else str(who)
        banner = f"[stand-in {standin_llm.NAME} for {who}] " if who else f"[stand-in {standin_llm.NAME}] "

        temperature = float(_scalar(request, "temperature", 0.0))
        sampling = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature,
                        "top_p": float(_scalar(request, "top_p", 1.0)) or 1.0,
                        "top_k": int(_scalar(request, "top_k", 0))}
        repetition_penalty = float(_scalar(request, "repetition_penalty", 1.0)) or 1.0

        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 add_generation_prompt=True, return_tensors="pt")
        pieces = []
        if stream:
            sender.send(pb_utils.InferenceResponse([_text_tensor(banner)]))
            streamer = _Sender(self.tokenizer, lambda t: sender.send(pb_utils.InferenceResponse([_text_tensor(t)])))
        else:
            streamer = _Sender(self.tokenizer, pieces.append)
        with self.generate_lock:
            if sender.is_cancelled():
                sender.send(flags=FINAL)
                return
            if sampling["do_sample"]:
                torch.manual_seed(int(_scalar(request, "random_seed", 0)))
            with torch.inference_mode():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                    repetition_penalty=repetition_penalty, streamer=streamer,
                                    stopping_criteria=StoppingCriteriaList([_Cancelled(sender)]),
                                    pad_token_id=self.tokenizer.eos_token_id, **sampling)
        if not stream:
            sender.send(pb_utils.InferenceResponse([_text_tensor(banner + "".join(pieces))]))
        generated = out[0, ids.shape[1]:].tolist()
        stopped = bool(generated) and generated[-1] == self.tokenizer.eos_token_id
        finish = "length" if len(generated) >= max_tokens and not stopped else "stop"
        sender.send(_ending(finish, int(ids.shape[1]), len(generated) - stopped), flags=FINAL)

    def finalize(self):
        self.pool.shutdown(wait=True)
