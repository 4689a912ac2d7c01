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


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    from triton_helpers import fake_repository, tritonserver

    with tritonserver(fake_repository(tmp_path_factory.mktemp("echo_repo"), "echo", "echo_stream")) as server:
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
