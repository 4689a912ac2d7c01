"""Serving on a real tritonserver: routing ensemble, streaming stand-ins, fallback, bad input, launcher.

One session-scoped server (explicit model control, free ports) runs a repository built from a tiny
router bundle with SmolLM2 stand-ins; tests share it and leave it as they found it.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from triton_helpers import fake_repository, tritonserver
from zooter.serving.candidates import parse_candidates

LABELS = ["alpha-7b", "beta.chat", "gamma/v2"]     # '/' is not allowed in a Triton model name
MAX_TEXT_BYTES = 4096


def dcrouter_queries(data_dir: Path, n: int, seed: int = 0) -> list[str]:
    rows = json.loads((data_dir / "dcrouter" / "train.json").read_text())
    random.Random(seed).shuffle(rows)
    return [r["question"] for r in rows[:n]]


@pytest.fixture(scope="session")
def triton_bundle(tmp_path_factory, tiny_backbone, data_dir) -> Path:
    """A real bundle (`zooter export` path) of a tiny router whose decisions are far from ties."""
    import torch

    from zooter.export.bundle import export_bundle
    from zooter.training.model import RouterModel

    work = tmp_path_factory.mktemp("triton_bundle")
    torch.manual_seed(1)
    model, tokenizer = RouterModel.from_backbone(tiny_backbone, LABELS)
    texts = dcrouter_queries(data_dir, 40, seed=1)
    # A random head sends every query to one candidate. Point the head along the embeddings' main
    # directions of variation instead, so queries spread over the candidates with clear margins.
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        emb = model.eval().embed(batch["input_ids"], batch["attention_mask"])
        centre = emb.mean(0)
        _, sv, directions = torch.linalg.svd(emb - centre, full_matrices=False)
        weight = directions[:len(LABELS)] / (sv[:len(LABELS), None] / len(texts) ** 0.5) * 4
        model.head.weight.copy_(weight)
        model.head.bias.copy_(-weight @ centre)
    from tiny import plain_decision

    model.save(work / "run", tokenizer, {"max_length": 128, "best_single": {"candidate": LABELS[0], "mean_reward": 0.5},
                                         "decision": plain_decision(LABELS)})
    parity = work / "parity.txt"
    parity.write_text("\n".join(texts) + "\n")
    cands = work / "candidates.yaml"
    cands.write_text("".join(f"- {{name: {n}, cost: {{input_per_mtok: {c}, output_per_mtok: {c}}}}}\n"
                             for n, c in zip(LABELS, (1.0, 0.1, 0.5))))
    export_bundle(work / "run", work / "bundle", quantize="none", parity_data=parity, parity_n=40,
                  candidates=cands, log=lambda *a, **k: None)
    return work / "bundle"


def candidates(real: dict | None = None):
    """The test candidates; `real` maps some to a Triton model (serve.triton_model), the rest get stand-ins."""
    real = real or {}
    return parse_candidates([{"name": n, "cost": {"input_per_mtok": c, "output_per_mtok": c},
                              **({"serve": {"triton_model": real[n]}} if n in real else {})}
                             for n, c in zip(LABELS, (1.0, 0.1, 0.5))])


FIXED_QUERY = "Write a haiku about routers."


@pytest.fixture(scope="session")
def trtllm_repo(tmp_path_factory) -> Path:
    """A second repository holding `fake_trtllm`: TensorRT-LLM ensemble I/O, as a production candidate has."""
    return fake_repository(tmp_path_factory.mktemp("trtllm_repo"), "fake_trtllm")


@pytest.fixture(scope="session")
def real_candidate(triton_bundle) -> str:
    """The candidate FIXED_QUERY is routed to: it is served by fake_trtllm, the others by stand-ins."""
    from zooter.runtime.router import Router

    return Router.load(triton_bundle).route(FIXED_QUERY).candidate


@pytest.fixture(scope="session")
def triton_repo(tmp_path_factory, triton_bundle, real_candidate) -> Path:
    from zooter.export.triton_repo import build_repository

    out = tmp_path_factory.mktemp("triton_repo") / "repo"
    build_repository(triton_bundle, out, candidates({real_candidate: "fake_trtllm"}), stand_ins=True,
                     max_text_bytes=MAX_TEXT_BYTES, default_max_tokens=8)
    return out


@pytest.fixture(scope="session")
def triton_server(triton_repo, trtllm_repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("triton_log") / "server.log"
    with tritonserver(triton_repo, extra_repositories=[trtllm_repo], model_control=True, log_file=log) as server:
        yield server
    assert server.process.poll() is not None


# --- repository -------------------------------------------------------------------------------------
def test_every_generated_config_parses_with_tritons_protobuf(triton_bundle, tmp_path):
    from zooter.export.triton_repo import build_repository, validate_repository

    fake_llm = tmp_path / "llm"            # the folder is only written into the config here
    repos = {
        "python": build_repository(triton_bundle, tmp_path / "py", candidates({"beta.chat": "beta_trtllm"}),
                                   stand_ins=True, standin_model_dir=fake_llm),
        "onnxruntime": build_repository(triton_bundle, tmp_path / "ort", candidates(), router_backend="onnxruntime",
                                        router_device="gpu", tensorrt=True, standin_model_dir=fake_llm),
    }
    for backend, built in repos.items():
        configs = validate_repository(built.path)
        assert set(configs) == set(built.models)
        for name, config in configs.items():
            assert config.name == name
        route = configs["zooter_route"]
        outputs = {o.name: list(o.dims) for o in route.output}
        assert outputs == {"candidate": [1], "probabilities": [len(LABELS)], "expected_rewards": [len(LABELS)],
                           "confidence": [1], "ranking": [len(LABELS)], "router": [1]}   # router: who chose
        assert json.loads(route.parameters["labels"].string_value) == LABELS
        assert configs["zooter"].model_transaction_policy.decoupled
        if backend == "onnxruntime":   # GPU/production: tokenize -> ORT-backend router -> decide
            assert route.platform == "ensemble"
            assert [s.model_name for s in route.ensemble_scheduling.step] == ["zooter_tokenize", "zooter_router", "zooter_decide"]
            # One version for all three steps, two kept loaded: what lets `zooter triton reload` swap them as one.
            assert {s.model_version for s in route.ensemble_scheduling.step} == {1}
            assert all(configs[s].version_policy.latest.num_versions == 2 for s in ("zooter_tokenize", "zooter_router", "zooter_decide"))
            router = configs["zooter_router"]
            assert router.platform == "onnxruntime_onnx" and [o.name for o in router.output] == ["logits", "rewards"]
            assert router.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
            assert {o.name for o in configs["zooter_decide"].output} == set(outputs)
        else:                          # CPU: one python step runs the Router itself
            assert route.backend == "python" and route.dynamic_batching.max_queue_delay_microseconds == 0
            assert route.instance_group[0].count == 2 and route.parameters["intra_op_threads"].string_value == "2"
            assert (built.path / "zooter_route" / "1" / "model.py").is_file()
            assert (built.path / "zooter_route" / "1" / "router.json").is_file()
            assert not {"zooter_tokenize", "zooter_router", "zooter_decide"} & set(configs)
        # A CPU repository's `zooter` routes in its own stub: the bundle's files beside its model.py, the same threads.
        answer = built.path / "zooter" / "1"
        routes_itself = backend == "python"
        assert all((answer / name).is_file() == routes_itself for name in ("router.json", "tokenizer.json", "model.onnx"))
        assert configs["zooter"].parameters["intra_op_threads"].string_value == "2"
    built = repos["python"]
    assert built.stand_ins == {"alpha-7b": "standin_alpha-7b", "gamma/v2": "standin_gamma_v2"}
    assert built.serving["beta.chat"]["model"] == "beta_trtllm"
    assert not (built.path / "beta_trtllm").exists(), "a real candidate's model lives in its own repository"
    names = [i.name for i in validate_repository(built.path)["standin_gamma_v2"].input]
    assert names[:2] == ["text_input", "max_tokens"] and "stream" in names and "temperature" in names


def test_build_refuses_a_foreign_folder_and_unknown_candidates(triton_bundle, tmp_path):
    from zooter.runtime.errors import UserError
    from zooter.export.triton_repo import build_repository

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a repository built by zooter"):
        build_repository(triton_bundle, foreign, candidates())
    with pytest.raises(UserError, match="no entry for"):
        build_repository(triton_bundle, tmp_path / "r", parse_candidates([{"name": "alpha-7b"}]))
    built = build_repository(triton_bundle, tmp_path / "r2", candidates())    # no stand-ins: nothing to call
    assert built.unreachable == LABELS and "zooter_standin_llm" not in built.models


def test_a_failed_build_leaves_the_repository_that_was_there(triton_bundle, tmp_path, monkeypatch):
    """build_repository writes beside the target and renames: a failure keeps the old repository whole,
    and nothing is left beside it (issue 23.7)."""
    import zooter.export.triton_repo as triton_repo
    from zooter.runtime.routing import RoutingConfig

    out = tmp_path / "repo"
    triton_repo.build_repository(triton_bundle, out, candidates())
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert RoutingConfig.read(out / "zooter" / "1").labels == tuple(LABELS)

    def broken(repo):
        raise RuntimeError("config check failed")

    monkeypatch.setattr(triton_repo, "validate_repository", broken)
    with pytest.raises(RuntimeError, match="config check failed"):
        triton_repo.build_repository(triton_bundle, out, candidates(), route_instances=1, max_batch_size=4)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    monkeypatch.undo()
    triton_repo.build_repository(triton_bundle, out, candidates(), route_instances=1)
    config = (out / "zooter_route" / "config.pbtxt").read_text()
    assert config != before[Path("zooter_route/config.pbtxt")].decode() and "count: 1" in config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


# --- routing ----------------------------------------------------------------------------------------
@pytest.mark.triton
@pytest.mark.slow
def test_routing_through_triton_equals_the_in_process_router(triton_server, triton_bundle, data_dir):
    from zooter.runtime.router import Router
    from zooter.serving.triton_client import route_via_triton

    queries = dcrouter_queries(data_dir, 48)
    expected = Router.load(triton_bundle).route_batch(queries)
    assert len({d.candidate for d in expected}) >= 2, "the test router should not send everything to one candidate"
    for url in (triton_server.http_url, f"grpc://{triton_server.grpc_url}"):
        got = route_via_triton(url, queries)
        assert [g["candidate"] for g in got] == [d.candidate for d in expected]
        for g, d in zip(got, expected):
            assert list(g["probabilities"]) == LABELS
            np.testing.assert_allclose([g["probabilities"][k] for k in LABELS],
                                       [d.probabilities[k] for k in LABELS], atol=1e-4)


@pytest.mark.triton
@pytest.mark.slow
def test_route_command_uses_triton(triton_server, capsys):
    from zooter.cli import main

    assert main(["route", "--triton", triton_server.http_url, "--json", "Prove that 17 is prime."]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["candidate"] in LABELS and abs(sum(answer["probabilities"].values()) - 1) < 1e-4
    # The plain output: a header, then candidate, expected reward, confidence, the query, one line a query.
    assert main(["route", "--triton", triton_server.http_url, "Prove that 17 is prime.", "Write a haiku."]) == 0
    header, *lines = capsys.readouterr().out.strip().split("\n")
    assert header.split("\t") == ["candidate", "expected_reward", "confidence", "query"]
    assert len(lines) == 2 and all(line.split("\t")[0] in LABELS and len(line.split("\t")) == 4 for line in lines)
    assert lines[0].split("\t")[0] == answer["candidate"]


# --- answering through `zooter` ------------------------------------------------------------------------
@pytest.mark.triton
@pytest.mark.slow
def test_stream_an_answer_from_a_standin_through_zooter(triton_server, triton_bundle, real_candidate, data_dir, capsys):
    from zooter.cli import main
    from zooter.runtime.router import Router
    from zooter.serving.triton_client import ask

    router = Router.load(triton_bundle)
    query = next(q for q in dcrouter_queries(data_dir, 200) if router.route(q).candidate != real_candidate)
    chosen = router.route(query).candidate
    chunks = list(ask(f"grpc://{triton_server.grpc_url}", query, stream=True, max_tokens=6))
    assert len(chunks) >= 3, "a stream arrives in pieces"
    assert {c.candidate for c in chunks} == {chosen} and all(c.note == "" for c in chunks)
    assert chunks[0].text.startswith(f"[stand-in SmolLM2-135M-Instruct for {chosen}]")
    assert "".join(c.text for c in chunks[1:]).strip(), "the tiny LLM wrote something"

    assert main(["ask", "--triton", triton_server.http_url, "--stream", "--max-tokens", "4", query]) == 0
    out = capsys.readouterr()
    assert f"[{chosen}]" in out.err and "stand-in" in out.out


@pytest.mark.triton
@pytest.mark.slow
def test_a_candidate_with_a_triton_model_answers_with_its_ensemble_io(triton_server, real_candidate):
    from zooter.serving.triton_client import ask

    chunks = list(ask(triton_server.http_url, FIXED_QUERY, stream=True, max_tokens=5, temperature=0.5))
    assert [(c.candidate, c.text) for c in chunks] == [
        (real_candidate, f"[fake TensorRT-LLM ensemble] 5 tokens for: {FIXED_QUERY}")]


@pytest.mark.triton
@pytest.mark.slow
def test_a_client_can_name_the_candidate_or_set_the_routing_knobs(triton_server, triton_bundle, data_dir):
    from zooter.runtime.router import Router
    from zooter.serving.triton_client import TritonRequestError, ask

    router = Router.load(triton_bundle)
    url = triton_server.http_url
    ranking = router.route(FIXED_QUERY).ranking
    named = list(ask(url, FIXED_QUERY, stream=False, max_tokens=2, answer_with=ranking[2]))[0]
    assert named.candidate == ranking[2] and named.note == ""
    assert named.text.startswith(f"[stand-in SmolLM2-135M-Instruct for {ranking[2]}]")
    subset = [ranking[1], ranking[2]]
    assert list(ask(url, FIXED_QUERY, stream=False, max_tokens=2, route_candidates=subset))[0].candidate == \
        router.route(FIXED_QUERY, candidates=subset).candidate
    # Per-request knobs reach the router in Triton: the cheapest candidate within the tolerance, as in process.
    queries = dcrouter_queries(data_dir, 6, seed=3)
    for tolerance in (0.05, 0.3):
        got = [list(ask(url, q, stream=False, max_tokens=1, route_tolerance=tolerance))[0].candidate for q in queries]
        assert got == [d.candidate for d in router.route_batch(queries, tolerance=tolerance)]
    for fields, words in [({"answer_with": "nobody"}, "answer_with must name one candidate"),
                          ({"answer_with": ranking[1], "route_lambda": 1.0}, "do not apply"),
                          ({"route_lambda": -1.0}, "lambda"),
                          ({"route_candidates": ["nobody"]}, "not labels of this router")]:
        with pytest.raises(TritonRequestError, match=words):
            list(ask(url, FIXED_QUERY, stream=False, max_tokens=1, **fields))


def inferences(server, model: str) -> int:
    """Requests `model` answered successfully so far (Triton's statistics API)."""
    status, answer = http_call(server.http_url, f"/v2/models/{model}/stats")
    assert status == 200, answer
    return sum(int(m["inference_stats"]["success"]["count"]) for m in json.loads(answer)["model_stats"])


@pytest.mark.triton
@pytest.mark.slow
def test_zooter_routes_in_its_own_stub_and_never_asks_zooter_route(triton_server, triton_bundle, data_dir):
    """Issue 24.2: in a CPU repository the `zooter` model runs the Router itself; the answer's path has no second
    python-backend round trip. zooter_route answers no request while zooter answers, routed, streamed or not,
    with knobs or a conversation, and the decisions are the in-process Router's."""
    import httpx

    from zooter.runtime.router import Router
    from zooter.serving.triton_client import ask

    router = Router.load(triton_bundle)
    queries = dcrouter_queries(data_dir, 6, seed=5)
    route_before, zooter_before = inferences(triton_server, "zooter_route"), inferences(triton_server, "zooter")
    streamed = [list(ask(f"grpc://{triton_server.grpc_url}", q, stream=True, max_tokens=1))[0].candidate for q in queries[:3]]
    assert streamed == [router.route(q).candidate for q in queries[:3]]
    for q in queries[3:]:
        r = httpx.post(f"http://{triton_server.http_url}/v2/models/zooter/generate", timeout=300,
                       json={"text_input": q, "max_tokens": 1, "route_tolerance": 0.3})
        assert r.status_code == 200, r.text
        expected = router.route(q, tolerance=0.3)
        assert (r.json()["candidate"], r.json()["router"]) == (expected.candidate, router.router_id)
        assert r.json()["confidence"] == pytest.approx(expected.confidence, abs=1e-5)
    conversation = json.dumps([{"role": "user", "content": queries[0]}, {"role": "assistant", "content": "ok"},
                               {"role": "user", "content": queries[1]}])
    r = httpx.post(f"http://{triton_server.http_url}/v2/models/zooter/generate", timeout=300,
                   json={"text_input": "the whole prompt", "messages": conversation, "max_tokens": 1})
    assert r.status_code == 200 and r.json()["candidate"] == router.route(queries[1]).candidate, r.text
    assert inferences(triton_server, "zooter") == zooter_before + len(queries) + 1
    bad = httpx.post(f"http://{triton_server.http_url}/v2/models/zooter/generate", timeout=300,
                     json={"text_input": queries[0], "max_tokens": 1, "route_lambda": -1.0})
    assert bad.status_code == 400 and "zooter: bad input:" in bad.text and "lambda" in bad.text, bad.text
    assert inferences(triton_server, "zooter_route") == route_before, "zooter asked zooter_route"


@pytest.mark.triton
@pytest.mark.slow
def test_concurrent_answers_are_each_counted_once(triton_server, real_candidate):
    """Many answers end at once, so their request threads update the outcome counter at once: every one is
    counted, and the server survives it (unserialised metric updates crashed tritonserver 2.51)."""
    from concurrent.futures import ThreadPoolExecutor

    from zooter.serving.triton_client import ask

    before = counter(triton_server, "zooter_requests_total", outcome="ok")
    n = 160

    def one(_):
        return list(ask(triton_server.http_url, FIXED_QUERY, stream=False, max_tokens=1))[0].candidate

    with ThreadPoolExecutor(16) as pool:
        answered = list(pool.map(one, range(n)))
    assert answered == [real_candidate] * n
    assert wait_for_counter(triton_server, "zooter_requests_total", before + n, outcome="ok")
    assert counter(triton_server, "zooter_requests_total", outcome="ok") == before + n, "counted once each"
    assert triton_server.process.poll() is None, "tritonserver is still running"


@pytest.mark.triton
@pytest.mark.slow
def test_unloaded_candidate_falls_back_and_no_request_is_lost(triton_server, triton_bundle, real_candidate):
    from zooter.export.triton_repo import model_name_for
    from zooter.runtime.router import Router
    from zooter.serving.triton_client import ask

    ranking = Router.load(triton_bundle).route(FIXED_QUERY).ranking
    assert ranking[0] == real_candidate
    second = ranking[1]
    url = triton_server.http_url
    answers, errors = [], []
    fell_back = counter(triton_server, "zooter_requests_total", outcome="fallback")
    moved = counter(triton_server, "zooter_fallbacks_total", chosen=real_candidate, answered=second)

    def one():
        try:
            answers.append(list(ask(url, FIXED_QUERY, stream=False, max_tokens=3))[-1])
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    triton_server.unload("fake_trtllm")          # mid-run: some requests are in flight, more arrive after
    try:
        after = list(ask(url, FIXED_QUERY, stream=False, max_tokens=3))
        for t in threads:
            t.join(120)
        assert not errors and len(answers) == 4, f"lost requests: {errors}"
        assert {a.candidate for a in answers} <= {real_candidate, second}
        assert after[0].candidate == second
        assert f"fallback to {second}" in after[0].note
        assert f"{real_candidate}: model fake_trtllm is not ready" in after[0].note
        assert after[0].text.startswith(f"[stand-in SmolLM2-135M-Instruct for {second}]")
        # Triton's metrics port counts it: the outcome, and who answered for whom (counted once the
        # answer's last response is sent, so it may trail the client by a moment).
        assert wait_for_counter(triton_server, "zooter_requests_total", fell_back + 1, outcome="fallback")
        assert wait_for_counter(triton_server, "zooter_fallbacks_total", moved + 1, chosen=real_candidate, answered=second)
    finally:
        triton_server.load("fake_trtllm")
    assert list(ask(url, FIXED_QUERY, stream=False, max_tokens=2))[0].candidate == real_candidate

    # A stand-in unloaded: its candidate is skipped the same way.
    triton_server.unload(model_name_for(second))
    try:
        triton_server.unload("fake_trtllm")
        third = ranking[2]
        answer = list(ask(url, FIXED_QUERY, stream=False, max_tokens=2))[0]
        assert answer.candidate == third and f"{second}: model {model_name_for(second)} is not ready" in answer.note
    finally:
        triton_server.load("fake_trtllm")
        triton_server.load(model_name_for(second))


@pytest.mark.triton
@pytest.mark.slow
def test_a_candidate_that_stalls_and_unloads_still_ends_every_stream(triton_bundle, tmp_path):
    """A request that reached a candidate as it was unloaded can stay unanswered for ever (fake_silent: it never
    ends a stream). `zooter` reads the candidate on the request's own thread, watched: once the candidate is gone,
    an answer that had no text yet falls back to the next candidate, one that had text ends with an error naming
    why, both are counted, and `zooter` itself can still unload."""
    import tritonclient.http as httpclient

    from zooter.export.triton_repo import build_repository
    from zooter.runtime.router import Router
    from zooter.serving.triton_client import ask

    stalling = FIXED_QUERY + " Then stall."
    router = Router.load(triton_bundle)
    first, second = router.route(FIXED_QUERY).ranking[:2]
    assert router.route(stalling).candidate == first
    build_repository(triton_bundle, tmp_path / "repo", candidates({first: "fake_silent", second: "fake_trtllm"}))
    fakes = fake_repository(tmp_path / "fakes", "fake_silent", "fake_trtllm")
    with tritonserver(tmp_path / "repo", extra_repositories=[fakes], model_control=True) as server:
        url = server.http_url
        got = {"quiet": [], "after_text": []}

        def one(key, text):
            try:
                for chunk in ask(url, text, stream=True, max_tokens=3):
                    got[key].append(chunk)
            except Exception as err:
                got[key].append(err)

        threads = [threading.Thread(target=one, args=("quiet", FIXED_QUERY)),
                   threading.Thread(target=one, args=("after_text", stalling))]
        for t in threads:
            t.start()
        client = httpclient.InferenceServerClient(url)
        try:
            deadline = time.monotonic() + 120
            while stats_executions(client, "fake_silent") < 2:    # both requests are with the candidate now
                assert time.monotonic() < deadline, "the requests never reached fake_silent"
                time.sleep(0.05)
            server.unload("fake_silent")
            for t in threads:
                t.join(120)
            assert not any(t.is_alive() for t in threads), "a stream never ended"
            quiet, after_text = got["quiet"], got["after_text"]
            assert len(quiet) == 1 and not isinstance(quiet[0], Exception), quiet
            assert quiet[0].candidate == second and quiet[0].text.startswith("[fake TensorRT-LLM ensemble]")
            assert f"{first}: model fake_silent was unloaded mid-answer" in quiet[0].note
            assert [c.text for c in after_text[:1]] == ["[fake silent] first words"], after_text
            assert len(after_text) == 2 and isinstance(after_text[1], Exception), after_text
            assert f"{first} failed mid-answer: model fake_silent was unloaded mid-answer" in str(after_text[1])
            assert wait_for_counter(server, "zooter_requests_total", 1, outcome="fallback")
            assert wait_for_counter(server, "zooter_requests_total", 1, outcome="failed_mid_answer")
            # Nothing of ours holds `zooter` open: it unloads, and loads again and answers.
            server.unload("zooter")
            deadline = time.monotonic() + 120
            while client.is_model_ready("zooter"):
                assert time.monotonic() < deadline, "zooter never unloaded"
                time.sleep(0.05)
            server.load("zooter")
            assert [c.candidate for c in ask(url, FIXED_QUERY, stream=False, max_tokens=2)] == [second]
        finally:
            client.close()
        assert server.process.poll() is None, "tritonserver is still running"


def stats_executions(client, model: str) -> int:
    """How many requests `model` has executed (Triton's statistics API)."""
    stats = client.get_inference_statistics(model)["model_stats"]
    return sum(int(s["inference_stats"]["success"]["count"]) for s in stats)


def counter(server, name: str, **labels) -> float:
    """A counter's value on the server's metrics port (0 before it was first counted)."""
    import urllib.request

    from zooter.bench.report import metric_value

    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        return metric_value(response.read().decode(), name, **labels)


def wait_for_counter(server, name: str, at_least: float, timeout: float = 15.0, **labels) -> bool:
    deadline = time.monotonic() + timeout
    while counter(server, name, **labels) < at_least:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.triton
@pytest.mark.slow
def test_fallback_drill_answers_every_request(triton_server, triton_bundle, real_candidate):
    from zooter.runtime.router import Router
    from zooter.bench.triton import fallback_drill

    second = Router.load(triton_bundle).route(FIXED_QUERY).ranking[1]
    drill = fallback_drill(triton_server.http_url, FIXED_QUERY, "fake_trtllm", requests=4, max_tokens=2, spread_s=2.0,
                           key=triton_server.control_key)
    assert drill["answered"] == 4 and drill["lost"] == 0, drill["errors"]
    assert set(drill["by_candidate"]) <= {real_candidate, second} and drill["by_candidate"].get(second, 0) >= 1
    assert drill["fallbacks"] == drill["by_candidate"].get(second, 0)
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(triton_server.http_url)
    assert client.is_model_ready("fake_trtllm"), "loaded again"
    client.close()


# --- bad input ----------------------------------------------------------------------------------------
@pytest.mark.triton
@pytest.mark.slow
def test_bad_input_gets_a_clear_error_and_the_server_stays_up(triton_server):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from zooter.runtime.errors import UserError
    from zooter.serving.triton_client import TritonRequestError, ask, route_via_triton

    url = triton_server.http_url
    # The client refuses what the server would refuse, before a round trip, naming the query.
    with pytest.raises(UserError, match="query 0: empty text"):
        route_via_triton(url, ["   "])
    with pytest.raises(UserError, match="query 0: 65537 bytes is over Triton's 65536-byte limit"):
        route_via_triton(url, ["x" * 65537])
    with pytest.raises(UserError, match="query 1: empty text"):
        route_via_triton(url, ["a good question", "", "another good one"])
    with pytest.raises(UserError, match="empty text"):
        list(ask(url, "", stream=True, max_tokens=2))

    # The server checks the same, with the repository's own limit (4096 bytes here), naming the query.
    with pytest.raises(TritonRequestError, match=f"query 0: text of {MAX_TEXT_BYTES + 1} bytes is over the {MAX_TEXT_BYTES}-byte limit"):
        route_via_triton(url, ["x" * (MAX_TEXT_BYTES + 1)])
    client = httpclient.InferenceServerClient(url)
    blank = httpclient.InferInput("text", [1, 1], "BYTES")
    blank.set_data_from_numpy(np.array([[b"   "]], dtype=object))
    with pytest.raises(InferenceServerException, match="row 0: empty text"):
        client.infer("zooter_route", [blank])
    long = httpclient.InferInput("text", [1, 1], "BYTES")
    long.set_data_from_numpy(np.array([[b"x" * (MAX_TEXT_BYTES + 1)]], dtype=object))
    with pytest.raises(InferenceServerException, match=f"over the {MAX_TEXT_BYTES}-byte limit"):
        client.infer("zooter_route", [long])
    wrong = httpclient.InferInput("text", [1, 1], "INT32")
    wrong.set_data_from_numpy(np.array([[7]], dtype=np.int32))
    with pytest.raises(InferenceServerException, match="expects 'BYTES'"):
        client.infer("zooter_route", [wrong])
    mixed = httpclient.InferInput("text", [3, 1], "BYTES")          # one request, good and bad rows
    mixed.set_data_from_numpy(np.array([[b"a good question"], [b" \n "], [b"another good one"]], dtype=object))
    with pytest.raises(InferenceServerException, match="row 1: empty text"):
        client.infer("zooter_route", [mixed])
    many = httpclient.InferInput("text", [64, 1], "BYTES")
    many.set_data_from_numpy(np.array([[b"q"]] * 64, dtype=object))
    with pytest.raises(InferenceServerException, match="batch"):
        client.infer("zooter_route", [many])

    assert client.is_server_live() and client.is_server_ready()
    client.close()              # an open connection would hold the server's stop until its exit timeout
    assert route_via_triton(url, ["still routing after all that"])[0]["candidate"] in LABELS


# --- oversized requests, restricted control APIs ---------------------------------------------------------
FORM = "application/x-www-form-urlencoded"      # curl --data-binary's default, and urllib's


def http_call(url: str, path: str, body: bytes | None = None, content_type: str = "application/json",
              headers: dict | None = None) -> tuple[int, str]:
    """(status, body text) of a POST (with a body) or GET to the server; errors are answers here."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://{url}{path}", data=body, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        with err:               # closed now: an open connection would hold the server's stop until its exit timeout
            return err.code, err.read().decode(errors="replace")


@pytest.mark.triton
@pytest.mark.slow
def test_5_and_50_mb_requests_get_a_400_and_the_server_stays_up(triton_server, real_candidate):
    """A 5 MB form-encoded body crashed tritonserver (libevhtp copies it twice onto an 8 MiB thread stack).
    Every size and form now gets the model's own refusal, over HTTP and gRPC, and the server serves on."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from zooter.export.triton_repo import model_name_for
    from zooter.serving.triton_client import TritonRequestError, ask, stream

    url = triton_server.http_url
    standin = model_name_for(next(label for label in LABELS if label != real_candidate))
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        for n in (5_000_000, 50_000_000):
            text = "x" * n
            generate = json.dumps({"text_input": text, "max_tokens": 2}).encode()
            infer = json.dumps({"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [text]}]}).encode()
            for content_type in (FORM, "application/json"):
                for path, body in (("/v2/models/zooter/generate", generate), ("/v2/models/zooter/generate_stream", generate),
                                   ("/v2/models/zooter_route/infer", infer), (f"/v2/models/{standin}/generate", generate)):
                    status, answer = http_call(url, path, body, content_type)
                    assert status == 400 and f"{n} bytes is over the" in answer, (path, content_type, status, answer[:300])
            big = grpcclient.InferInput("text", [1, 1], "BYTES")
            big.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
            with pytest.raises(InferenceServerException, match=f"{n} bytes is over the") as refused:
                client.infer("zooter_route", [big])
            assert "INVALID_ARGUMENT" in str(refused.value.status())
            for model in ("zooter", standin, "zooter_standin_llm"):
                big = grpcclient.InferInput("text_input", [1, 1], "BYTES")
                big.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
                with pytest.raises(TritonRequestError, match=f"{n} bytes is over the"):  # a stream's error has no code
                    list(stream(client, model, [big], timeout=300))
    finally:
        client.close()
    assert triton_server.process.poll() is None and triton_server.is_ready()
    assert list(ask(url, FIXED_QUERY, stream=False, max_tokens=2))[0].candidate == real_candidate


@pytest.mark.triton
@pytest.mark.slow
def test_shared_memory_apis_need_the_control_key(triton_server):
    """Registering a /dev/shm key (the python backend's own regions included) was open to anyone."""
    from multiprocessing import shared_memory

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from zooter.serving.triton_client import CONTROL_HEADER, route_via_triton

    url, key = triton_server.http_url, triton_server.control_key
    maps = Path(f"/proc/{triton_server.process.pid}/maps").read_text()
    backend_region = next(line.split()[-1] for line in maps.splitlines() if "triton_python_backend_shm_region_" in line)
    probe = shared_memory.SharedMemory(create=True, size=64)
    try:
        for region in (f"/{probe.name}", "/" + Path(backend_region).name):
            body = json.dumps({"key": region, "offset": 0, "byte_size": 64}).encode()
            status, answer = http_call(url, "/v2/systemsharedmemory/region/probe/register", body)
            assert status == 403 and CONTROL_HEADER in answer, (region, status, answer)
        for path in ("/v2/systemsharedmemory/status", "/v2/cudasharedmemory/status"):
            assert http_call(url, path)[0] == 403
        body = json.dumps({"key": f"/{probe.name}", "offset": 0, "byte_size": 64}).encode()
        assert http_call(url, "/v2/systemsharedmemory/region/probe/register", body, headers={CONTROL_HEADER: key})[0] == 200
        status, answer = http_call(url, "/v2/systemsharedmemory/status", headers={CONTROL_HEADER: key})
        assert status == 200 and "probe" in answer

        client = grpcclient.InferenceServerClient(triton_server.grpc_url)
        try:
            with pytest.raises(InferenceServerException, match="restricted"):
                client.get_system_shared_memory_status()
            with pytest.raises(InferenceServerException, match="restricted"):
                client.unregister_system_shared_memory("probe")
            with pytest.raises(InferenceServerException, match="restricted"):
                client.get_cuda_shared_memory_status()
            metadata = {f"triton-grpc-protocol-{CONTROL_HEADER}": key}   # Triton's prefix for restricted protocols
            assert "probe" in str(client.get_system_shared_memory_status(headers=metadata))
            client.unregister_system_shared_memory("probe", headers=metadata)
        finally:
            client.close()
        assert route_via_triton(url, ["inference itself stays open"])[0]["candidate"] in LABELS
    finally:
        probe.close()
        probe.unlink()


# --- benchmark ------------------------------------------------------------------------------------------
@pytest.mark.triton
@pytest.mark.slow
def test_bench_compares_triton_with_in_process_in_one_run(triton_server, triton_bundle, data_dir, tmp_path):
    from zooter.bench.triton import bench_triton

    report = bench_triton(triton_server.http_url, triton_bundle, dcrouter_queries(data_dir, 16),
                          json_out=tmp_path / "bench.json", grpc_url=f"grpc://{triton_server.grpc_url}",
                          metrics_url=triton_server.metrics_url, concurrency=(1, 8), requests=16, warmup=2, quiet=True)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["decisions_match"] == [16, 16]
    assert saved["decisions_match_concurrent"] == [16, 16, 8]     # 8 clients at once, dynamic batching on
    assert saved["decisions_match_batched"] == [16, 16]
    assert saved["micro_batched_decisions_match"][1:] == [16, 8]
    assert isinstance(saved["triton_overhead_p50_ms"], float)
    engines = {(c["engine"], c["concurrency"]) for c in report["cells"]}
    assert engines == {(e, c) for e in ("in-process", "in-process-batched", "triton-http", "triton-grpc") for c in (1, 8)}
    for cell in report["cells"]:
        assert {"concurrency", "p50_ms", "p99_ms", "throughput_qps"} <= set(cell) and cell["errors"] == 0
        assert cell["process_cpu_ms"] > 0
    http = next(c for c in report["cells"] if c["engine"] == "triton-http" and c["concurrency"] == 8)
    assert http["n"] == 16 and http["server"]["zooter_route"]["requests"] == 16
    assert set(http["server"]) == {"zooter_route"}                # one python step on CPU
    assert {"triton-http_c1_overhead_p50_ms", "triton-grpc_c8_throughput_ratio", "triton-http_c8_p50_ratio"} <= set(saved["targets"])


@pytest.mark.triton
@pytest.mark.slow
def test_bench_ttft_times_the_first_token_through_zooter_and_direct(triton_server, triton_bundle, tmp_path, capsys):
    """`zooter bench --triton URL --ttft MODEL`: time to first token through `zooter` and from the candidate's model
    asked directly, with the in-process routing beside them (FIXED_QUERY goes to fake_trtllm, which answers at once)."""
    from zooter.bench.triton import bench_ttft
    from zooter.cli import main
    from zooter.runtime.errors import UserError

    report = bench_ttft(triton_server.http_url, triton_bundle, [FIXED_QUERY], "fake_trtllm", json_out=tmp_path / "ttft.json",
                        grpc_url=f"grpc://{triton_server.grpc_url}", requests=8, warmup=2, quiet=True)
    assert json.loads((tmp_path / "ttft.json").read_text()) == report
    cells = {c["engine"]: c for c in report["cells"]}
    assert set(cells) == {"in-process", "zooter", "direct"}
    for cell in cells.values():
        assert cell["n"] == 8 and cell["errors"] == 0 and cell["p50_ms"] > 0 and cell["concurrency"] == 1
    assert report["ttft_delta_p50_ms"] == pytest.approx(cells["zooter"]["p50_ms"] - cells["direct"]["p50_ms"])
    assert report["ttft_delta_over_routing_ms"] == pytest.approx(report["ttft_delta_p50_ms"] - cells["in-process"]["p50_ms"])
    assert main(["bench", str(triton_bundle), "--ttft", "fake_trtllm"]) == 2
    assert "--ttft goes with --triton" in capsys.readouterr().err
    assert main(["bench", str(triton_bundle), "--triton", "127.0.0.1:1", "--ttft", "fake_trtllm"]) == 2
    assert "--triton: no Triton answers gRPC at 127.0.0.1:2" in capsys.readouterr().err
    with pytest.raises(UserError, match="--ttft: nobody not ready"):
        bench_ttft(triton_server.http_url, triton_bundle, [FIXED_QUERY], "nobody", grpc_url=f"grpc://{triton_server.grpc_url}")


@pytest.mark.triton
@pytest.mark.slow
def test_floor_probe_times_the_python_backend_round_trip(tmp_path, capsys):
    from zooter.cli import main

    assert main(["bench", "--triton-floor", "--work-ms", "2", "--json", str(tmp_path / "floor.json")]) == 0
    report = json.loads((tmp_path / "floor.json").read_text())
    assert "round trip of a model that works 2 ms" in capsys.readouterr().out
    cells = {(c["engine"], c["work_ms"]): c for c in report["cells"]}
    assert set(cells) == {(e, w) for e in ("in-process", "triton-http", "triton-grpc") for w in (0.0, 2.0)}
    for (engine, work), cell in cells.items():
        assert cell["errors"] == 0 and cell["n"] == report["requests"] > 0
        assert cell["p50_ms"] >= work                      # every answer took at least the probe's work
    for proto in ("http", "grpc"):                         # a process round trip costs more than a call
        assert report["round_trip_p50_ms"][proto] > 0 and report["round_trip_after_work_p50_ms"][proto] > 0
    assert set(report["pipe_round_trip_p50_us"]) == {"0.0", "2.0"}
    busy = report["server_ms"]["zooter_probe_busy"]
    assert busy["compute_infer_ms"] >= 2.0 and busy["compute_infer_ms"] > report["server_ms"]["zooter_probe_idle"]["compute_infer_ms"]
    for args, named in ((["--work-ms", "nan"], "--work-ms"), (["--work-ms", "0"], "--work-ms"),
                        (["--triton", "127.0.0.1:1"], "--triton"), (["some-bundle"], "BUNDLE")):
        assert main(["bench", "--triton-floor", *args]) == 2
        assert named in capsys.readouterr().err
    assert main(["bench", "some-bundle", "--work-ms", "4"]) == 2
    assert "--work-ms goes with --triton-floor" in capsys.readouterr().err


# --- launcher -------------------------------------------------------------------------------------------
def _kill_orphan_server(repo: Path) -> None:
    """If `zooter serve` died without stopping its tritonserver, end that one server (found by its repository)."""
    import os

    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"tritonserver") and f"--model-repository={repo.resolve()}".encode() in args:
            os.kill(int(cmdline.parent.name), signal.SIGKILL)
            pytest.fail("zooter serve left its tritonserver running")


@pytest.mark.triton
@pytest.mark.slow
def test_launcher_is_safe_by_default(triton_repo):
    """Without options: every endpoint on 127.0.0.1, no model control, control APIs behind a random key."""
    from zooter.servers.tritonserver import TritonInstall, TritonServer

    server = TritonServer(triton_repo)
    cmd = server.command(TritonInstall(binary=Path("tritonserver")), None)
    for name in ("http", "grpc", "metrics"):
        assert f"--{name}-address=127.0.0.1" in cmd
    assert not any(c.startswith("--model-control-mode") for c in cmd)
    key = server.control_key
    assert len(key) >= 32 and key != TritonServer(triton_repo).control_key
    assert f"--http-restricted-api=model-repository,logging,trace,shared-memory:zooter-control-key={key}" in cmd
    assert f"--grpc-restricted-protocol=model-repository,logging,trace,shared-memory:zooter-control-key={key}" in cmd
    opened = TritonServer(triton_repo, host="0.0.0.0", model_control=True)
    assert "--http-address=0.0.0.0" in opened.command(TritonInstall(binary=Path("tritonserver")), None)
    assert opened.http_url.startswith("127.0.0.1:")   # this machine's clients still use loopback


def fake_leftovers(tmp_root: Path, shm_root: Path, tag: str) -> dict[str, Path]:
    """What crashed servers leave, and what live ones hold, with the owners they name: {what: path}.
    All but "fresh" are dated an hour back (the sweep leaves anything younger than a minute alone)."""
    import os

    from zooter.servers.tritonserver import _identity

    gone = subprocess.Popen(["sleep", "60"])          # a process that existed, then ended: its PID and start time
    dead_owner = _identity(gone.pid)
    gone.kill()
    gone.wait()
    paths = {"dead": tmp_root / f"zooter-triton-{tag}dead", "live": tmp_root / f"zooter-triton-{tag}live",
             "staging": tmp_root / f".zooter-triton-{tag}new",     # its launcher died while setting it up
             "unmarked_dead": tmp_root / f"zooter-triton-{tag}old", "fresh": tmp_root / f"zooter-triton-{tag}fresh",
             "dead_region": shm_root / f"triton_python_backend_shm_region_{tag}dead",
             "live_region": shm_root / f"triton_python_backend_shm_region_{tag}live"}
    for name in ("dead", "live", "staging", "unmarked_dead", "fresh"):
        (paths[name] / "backends").mkdir(parents=True)
        (paths[name] / "tritonserver.log").write_text("...")
    for name, owner in (("dead", dead_owner), ("fresh", dead_owner), ("live", _identity(os.getpid()))):
        (paths[name] / "owner.json").write_text(json.dumps({"launcher": owner, "server": dead_owner}))
    (paths["staging"] / "owner.json").write_text(json.dumps({"launcher": dead_owner, "server": None}))
    for name in ("dead_region", "live_region"):
        paths[name].write_bytes(b"\0" * 4096)
    for name, path in paths.items():
        if name != "fresh":
            os.utime(path, (time.time() - 3600, time.time() - 3600))
    return paths


def test_sweep_removes_what_dead_servers_left_and_nothing_of_a_live_one(tmp_path):
    import mmap
    import os

    from zooter.servers.tritonserver import sweep_leftovers

    tmp_root, shm_root = tmp_path / "tmp", tmp_path / "shm"
    shm_root.mkdir()
    paths = fake_leftovers(tmp_root, shm_root, "t-")
    used = tmp_root / "zooter-triton-t-inuse"          # no owner file (an older launcher's), but a process works in it
    used.mkdir()
    os.utime(used, (time.time() - 3600, time.time() - 3600))
    holder = subprocess.Popen(["sleep", "60"], cwd=used)
    try:
        with open(paths["live_region"], "r+b") as fh, mmap.mmap(fh.fileno(), 4096):   # mapped: a live server's
            removed = set(sweep_leftovers(tmp_root, shm_root))
    finally:
        holder.kill()
        holder.wait()
    assert removed == {paths["dead"], paths["staging"], paths["unmarked_dead"], paths["dead_region"]}
    assert all(not p.exists() for p in removed)
    assert paths["live"].is_dir() and paths["fresh"].is_dir() and used.is_dir() and paths["live_region"].is_file()


@pytest.mark.triton
def test_a_slow_stop_is_waited_for_then_killed_and_leaves_nothing(tmp_path):
    """A server that overruns its exit timeout ("failed to stop server: Internal - Exit timeout expired",
    exit code 1) or ignores SIGTERM is no error: stop() waits, kills the process group, removes the work
    folder, the python backend's /dev/shm regions and its /tmp/python_env_* folder."""
    import os

    from zooter.servers.tritonserver import TritonServer, _group_running

    repo = fake_repository(tmp_path / "repo", "stuck")       # a model that never finishes unloading
    for stopped_by in ("exit timeout", "kill"):
        server = TritonServer(repo, exit_timeout=1, log_file=tmp_path / f"{stopped_by}.log")
        server.start(timeout=300)
        pid, workdir = server.process.pid, server._workdir
        regions, envs = set(server._regions), set(server._envs)
        assert regions, "the python backend maps its regions in /dev/shm"
        assert envs and all(Path(e).is_dir() for e in envs), "the python backend makes its /tmp/python_env_*"
        if stopped_by == "kill":
            os.kill(pid, signal.SIGSTOP)                # deaf to SIGTERM: only a kill ends it
            code = server.stop(grace=2)
            assert code == -signal.SIGKILL
        else:
            code = server.stop(grace=120)
            assert code == 1 and "failed to stop server: Internal - Exit timeout expired" in server.log_tail(), \
                server.log_tail()                       # Triton's own words, as in the busy `make test`
        server.close()
        assert not _group_running(pid)                 # no stub of it is left either (zombies aside: they are dead)
        assert not workdir.exists() and not any(Path(r).exists() for r in regions)
        assert not any(Path(e).exists() for e in envs)


def test_zooter_serve_binds_loopback_and_guards_model_control(triton_bundle, tmp_path, listeners):
    import os
    import stat
    import urllib.error
    import urllib.request

    from zooter.export.triton_repo import build_repository
    from zooter.serving.triton_client import TritonRequestError, load_model, unload_model
    from zooter.servers.tritonserver import free_port

    repo = build_repository(triton_bundle, tmp_path / "repo", candidates()).path   # routing only: starts fast
    ports = [free_port() for _ in range(3)]
    key_file = tmp_path / "control.key"
    proc = subprocess.Popen([sys.executable, "-m", "zooter.cli", "serve", str(repo), "--http-port", str(ports[0]),
                             "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--model-control",
                             "--control-key-file", str(key_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready:"):
                lines.append(next(proc.stdout))
                break
        assert lines[-2].startswith(f"ready: http 127.0.0.1:{ports[0]}  grpc 127.0.0.1:{ports[1]}  "
                                    f"metrics 127.0.0.1:{ports[2]}"), "".join(lines)
        assert "model control: on" in lines[-1] and str(key_file) in lines[-1]
        for port in ports:    # nothing listens on another interface
            assert listeners(port) == {"127.0.0.1"}, (port, listeners(port))
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
        key = key_file.read_text().strip()
        url = f"127.0.0.1:{ports[0]}"
        with pytest.raises(TritonRequestError, match="unload zooter_route: HTTP 403"):
            unload_model(url, "zooter_route")                    # no key: refused
        with pytest.raises(TritonRequestError, match="HTTP 403"):
            unload_model(url, "zooter_route", key="wrong-key")
        request = urllib.request.Request(f"http://{url}/v2/logging", data=b'{"log_verbose_level": 1}', method="POST")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=10)          # the logging API needs the key too

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://{url}/v2/models/zooter_route/ready", timeout=10) as r:
                    return r.status == 200
            except urllib.error.HTTPError:
                return False

        assert ready()
        unload_model(url, "zooter_route", key=key)               # with the key: done
        assert not ready()
        load_model(url, "zooter_route", key=key)
        assert ready()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_orphan_server(repo)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/live", timeout=2)


@pytest.mark.triton
def test_zooter_serve_sweeps_what_dead_servers_left_and_leaves_nothing_itself(triton_bundle, tmp_path):
    """A crashed tritonserver left its work folder in /tmp and its python-backend regions in /dev/shm; the next
    `zooter serve` removes them (owner gone), keeps a live server's, and takes its own along when it stops."""
    import mmap
    import os
    import uuid

    from zooter.export.triton_repo import build_repository
    from zooter.servers.tritonserver import SHM_ROOT, free_port

    repo = build_repository(triton_bundle, tmp_path / "repo", candidates()).path   # routing only: starts fast
    tmp_root = tmp_path / "tmp"
    tmp_root.mkdir()
    paths = fake_leftovers(tmp_root, SHM_ROOT, f"zootertest-{uuid.uuid4().hex[:8]}-")
    ports = [free_port() for _ in range(3)]
    live_region = open(paths["live_region"], "r+b")
    mapped = mmap.mmap(live_region.fileno(), 4096)
    proc = subprocess.Popen([sys.executable, "-m", "zooter.cli", "serve", str(repo), "--http-port", str(ports[0]),
                             "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])],   # the key in a temp folder
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_root)})
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready:"):
                break
        out = "".join(lines)
        assert "ready:" in out, out
        for name in ("dead", "staging", "unmarked_dead", "dead_region"):
            assert f"removed {paths[name]}: left by a Triton server that is gone" in out, out
            assert not paths[name].exists()
        assert paths["live"].is_dir() and paths["fresh"].is_dir() and paths["live_region"].is_file()
        own = [p for p in tmp_root.glob("zooter-triton-*") if p not in paths.values()]
        assert len(own) == 1 and json.loads((own[0] / "owner.json").read_text())["server"][0] > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
        assert not own[0].exists(), "zooter serve removes its own work folder when it stops"
        assert not list(tmp_root.glob("zooter-serve-*")), "and the folder of the control key it made"
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_orphan_server(repo)
        mapped.close()
        live_region.close()
        for path in (paths["live_region"], paths["dead_region"]):
            path.unlink(missing_ok=True)
