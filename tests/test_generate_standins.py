"""zooter generate against the project's Triton stand-in candidates (SmolLM2-135M-Instruct behind the
TensorRT-LLM ensemble I/O, and behind the LLM-API model's I/O: both, decoupled), built by export.triton_repo
and served by a real tritonserver.

Only the stand-ins and their shared LLM are loaded (explicit model control), so the bundle the builder
reads needs no real router: its router.json names labels and a placeholder model file that is never loaded.
"""

from __future__ import annotations


import pytest

from zooter.serving.candidates import Candidate
from zooter.serving.clients import Sampling
from zooter.runtime.queries import read_queries
from zooter.training.generate import generate, read_answers

from tiny import plain_decision

pytestmark = [pytest.mark.triton, pytest.mark.slow]

LABELS = ["gemma-2-9b-it", "qwen2.5-7b-instruct"]


@pytest.fixture(scope="module", params=["ensemble", "llmapi"])
def standins(request, tmp_path_factory, tiny_backbone):
    from triton_helpers import tritonserver
    from zooter.runtime.bundle import write_bundle
    from zooter.export.triton_repo import build_repository

    root = tmp_path_factory.mktemp("standins")
    placeholder = root / "router.onnx"
    placeholder.write_bytes(b"placeholder: the router is not loaded in this test")
    bundle = root / "bundle"
    write_bundle(bundle, {"router.onnx": placeholder, "tokenizer.json": tiny_backbone / "tokenizer.json"},
                 {"labels": LABELS, "max_length": 64, "model_file": "router.onnx", "inputs": ["input_ids", "attention_mask"],
                  "output": "logits", "reward_output": "rewards", "decision": plain_decision(LABELS)})
    built = build_repository(bundle, root / "repo", None, stand_ins=True, stand_in_io=request.param)
    assert set(built.stand_ins) == set(LABELS)
    with tritonserver(root / "repo", model_control=True,
                      load_models=["zooter_standin_llm", *built.stand_ins.values()]) as server:
        yield server, built.stand_ins


def test_generate_through_standins(tmp_path, standins):
    server, models = standins
    queries_path = tmp_path / "q.txt"
    queries_path.write_text("What is the capital of France?\nName a primary colour.\n")
    queries, _ = read_queries(queries_path)
    cands = [Candidate(label, None, {"triton_model": models[label], "triton_url": server.grpc_url}) for label in LABELS]
    out = tmp_path / "answers.jsonl"
    summary = generate(queries, cands, out, sampling=Sampling(max_tokens=8, timeout_s=120), concurrency=2, progress=False)
    assert summary.answered_total == 4 and summary.failed_total == 0
    for row in read_answers(out):
        for label in LABELS:
            banner = f"[stand-in SmolLM2-135M-Instruct for {label}] "
            answer = row.responses[label]
            assert answer.startswith(banner) and answer[len(banner):].strip(), answer
    again = generate(queries, cands, out, sampling=Sampling(max_tokens=8), progress=False)
    assert again.asked == 0 and again.already_done == 4
