"""zooter generate against a real tritonserver: a deterministic python-backend model with the TensorRT-LLM
ensemble I/O, served plain and decoupled, over gRPC and HTTP."""

from __future__ import annotations

import json

import pytest

from zooter.serving.candidates import parse_candidates
from zooter.serving.clients import Sampling
from zooter.runtime.queries import read_queries
from zooter.training.generate import RetryPolicy, generate, read_answers

pytestmark = pytest.mark.triton

ECHO_MODEL = '''
import json
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Answers "<model> echo:" and the prompt's words reversed, cut at max_tokens words; a prompt with
    "fail" in it gets an error response."""

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
'''

CONFIG = '''
name: "{name}"
backend: "python"
max_batch_size: 8
{policy}
input [
  {{ name: "text_input" data_type: TYPE_STRING dims: [ -1 ] }},
  {{ name: "max_tokens" data_type: TYPE_INT32 dims: [ -1 ] optional: true }},
  {{ name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true }}
]
output [ {{ name: "text_output" data_type: TYPE_STRING dims: [ -1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
'''


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    from zooter.servers.tritonserver import TritonServer

    repo = tmp_path_factory.mktemp("echo_repo")
    for name, policy in (("echo", ""), ("echo_stream", "model_transaction_policy { decoupled: true }")):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.py").write_text(ECHO_MODEL)
        (repo / name / "config.pbtxt").write_text(CONFIG.format(name=name, policy=policy))
    with TritonServer(repo) as server:
        yield server


def test_generate_through_triton(tmp_path, triton):
    queries_path = tmp_path / "q.txt"
    queries_path.write_text("what is one plus one\nplease fail now\nname three colours of the rainbow\n")
    queries, _ = read_queries(queries_path)
    cands = parse_candidates([
        {"name": "grpc-plain", "serve": {"triton_model": "echo", "triton_url": triton.grpc_url}},
        {"name": "http-plain", "serve": {"triton_model": "echo", "triton_url": triton.http_url, "protocol": "http"}},
        {"name": "grpc-decoupled", "serve": {"triton_model": "echo_stream", "triton_url": triton.grpc_url}},
        {"name": "absent", "serve": {"triton_model": "no_such_model", "triton_url": triton.grpc_url}},
    ])
    out = tmp_path / "answers.jsonl"
    summary = generate(queries, cands, out, sampling=Sampling(max_tokens=5, temperature=0.0, timeout_s=30),
                       concurrency=2, policy=RetryPolicy(retries=1, backoff_s=0.01), progress=False)
    rows = {r.query: r for r in read_answers(out)}
    first = rows["what is one plus one"]
    assert first.responses["grpc-plain"] == "echo echo: one plus one"  # 5 words: max_tokens reached Triton
    assert first.responses["http-plain"] == "echo echo: one plus one"
    assert first.responses["grpc-decoupled"] == "echo_stream echo: one plus one"
    failed = rows["please fail now"]
    assert set(failed.responses) == set() and "asked to fail" in failed.extra["errors"]["grpc-decoupled"]
    raw = [json.loads(line) for line in out.read_text().splitlines()]
    assert all("no_such_model" in r["errors"]["absent"] for r in raw)
    assert summary.tallies["absent"].failed == 3 and summary.tallies["grpc-plain"].answered == 2
    assert summary.answered_total == 6
    journal = [json.loads(line) for line in out.with_name("answers.pairs.jsonl").read_text().splitlines()]
    attempts = {(r["candidate"], r["id"]): r["attempts"] for r in journal}
    assert all(attempts[("absent", q.id)] == 1 for q in queries)  # an unknown model is not retried
