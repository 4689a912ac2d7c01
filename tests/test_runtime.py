"""The torch-free Router: bad input, damaged bundles, threads, cost-aware decisions, `zooter route`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tiny import LABELS, PRICES, TEXTS
from zooter.cli import main


@pytest.fixture(scope="module")
def router(bundles):
    from zooter.runtime.router import Router

    return Router.load(bundles["int8"])


@pytest.fixture()
def copy_of(bundles, tmp_path):
    def make(kind="int8") -> Path:
        return Path(shutil.copytree(bundles[kind], tmp_path / kind))

    return make


def test_runtime_imports_no_torch_or_transformers(bundles):
    code = ("import sys, zooter.runtime, zooter.runtime.tokenize, zooter.runtime.decision\n"
            "from zooter.runtime import Router, Decision\n"
            f"d = Router.load({str(bundles['int8'])!r}).route('hello there')\n"
            "assert isinstance(d, Decision), d\n"
            "print(sorted(m for m in ('torch', 'transformers', 'optimum', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_decision_fields(router):
    d = router.route("Prove that there are infinitely many primes.")
    assert d.candidate in LABELS and sorted(d.probabilities) == sorted(LABELS)
    assert sum(d.probabilities.values()) == pytest.approx(1.0)
    # The tiny bundle's decision layer is plain: the choice is argmax p, expected rewards are the raw scores.
    assert d.probabilities[d.candidate] == max(d.probabilities.values())
    assert d.expected_reward == d.expected_rewards[d.candidate] and sorted(d.expected_rewards) == sorted(LABELS)
    assert 0.0 <= d.confidence <= 1.0 and not d.anchored
    assert d.ranking[0] == d.candidate and sorted(d.ranking) == sorted(LABELS)
    # The fallback order after the choice: by expected reward.
    rest = [d.expected_rewards[n] for n in d.ranking[1:]]
    assert rest == sorted(rest, reverse=True)
    assert d.latency_ms > 0
    assert json.loads(json.dumps(d.to_json()))["candidate"] == d.candidate


def test_bad_input(router):
    from zooter.runtime.tokenize import EmptyQueryError, encode

    for empty in ("", "   \n\t"):
        with pytest.raises(EmptyQueryError, match="empty query"):
            router.route(empty)
    for wrong in (None, 42, 3.5, {"q": 1}):
        with pytest.raises(TypeError, match=type(wrong).__name__):
            router.route(wrong)
    with pytest.raises(TypeError, match="list"):
        router.route_batch("a single string")
    with pytest.raises(TypeError):
        router.route_batch(["fine", None])

    huge = "routing " * 12_500  # 100,000 characters
    assert len(huge) == 100_000
    assert encode(router.tokenizer, [huge])["input_ids"].shape == (1, router.max_length)
    d = router.route(huge)
    assert d.candidate in LABELS
    # Truncation keeps the head: the answer is the one for the first max_length tokens.
    assert router.route(huge).probabilities == pytest.approx(router.route(huge[:5000]).probabilities, abs=1e-6)

    raw = "caf\xe9 au lait".encode("latin-1") + b" \xff\xfe tr\xc3\xa8s bien"
    d = router.route(raw)
    assert d.candidate in LABELS
    assert d.probabilities == pytest.approx(router.route(raw.decode("utf-8", errors="replace")).probabilities, abs=1e-6)


def test_damaged_bundles_are_refused(copy_of):
    from zooter.runtime.router import BundleError, Router

    bundle = copy_of()
    with open(bundle / "model.int8.onnx", "r+b") as f:
        f.seek(2000)
        byte = f.read(1)
        f.seek(2000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match=r"model\.int8\.onnx: checksum mismatch"):
        Router.load(bundle)

    bundle = copy_of("fp32")
    (bundle / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json: missing file"):
        Router.load(bundle)
    (bundle / "router.json").unlink()
    with pytest.raises(BundleError, match=r"router\.json: missing file"):
        Router.load(bundle)
    with pytest.raises(BundleError, match="no such bundle"):
        Router.load(bundle.parent / "nowhere")


def test_label_count_must_match_the_model(copy_of):
    from zooter.runtime.bundle import manifest_digest
    from zooter.runtime.router import BundleError, Router

    bundle = copy_of()
    manifest = json.loads((bundle / "router.json").read_text())
    manifest["labels"] = LABELS[:-1]
    manifest["costs"] = {k: v for k, v in manifest["costs"].items() if k in LABELS[:-1]}
    manifest["manifest_sha256"] = manifest_digest(manifest)   # a consistent manifest for another model
    (bundle / "router.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="4 outputs but router.json lists 3 labels"):
        Router.load(bundle)
    manifest["labels"], manifest["format_version"] = LABELS, 99
    (bundle / "router.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="'format_version' is 99"):
        Router.load(bundle)


def test_manifest_is_router_json_typed_and_written_back_as_read(bundles):
    """One loader (Manifest.read) gives typed fields; to_json is the object on disk, key for key and in order."""
    from zooter.runtime.bundle import TOKEN_INPUTS, Manifest

    raw = json.loads((bundles["int8"] / "router.json").read_text())
    manifest = Manifest.read(bundles["int8"])
    assert manifest.to_json() == raw and list(manifest.to_json()) == list(raw)
    assert manifest.labels == tuple(LABELS) and manifest.router_id == raw["manifest_sha256"][:12]
    assert manifest.token_inputs == [n for n in TOKEN_INPUTS if n in raw["inputs"]]
    assert manifest.size == sum(e["bytes"] for e in raw["files"].values())
    assert manifest.rule().costs.tolist() == [(i + o) / 2 for i, o in PRICES.values()]
    assert Manifest.read_file(bundles["int8"] / "router.json") == manifest


@pytest.mark.parametrize("change, message", [
    (lambda o: o.update(labels="alpha-7b"), "'labels' must be a list"),
    (lambda o: o["candidates"].pop("beta-70b"), "'candidates' must be an object with an entry for every label"),
    (lambda o: o["candidates"]["beta-70b"].update(model=3), "'candidates'.beta-70b"),
    (lambda o: o["decision"].update({"lambda": -1}), "decision.lambda must be a finite number >= 0"),
    (lambda o: o["decision"].update(tolerance=0.1), "decision.tolerance needs 'costs'"),
    (lambda o: o.update(costs=[1.0]), "'costs' must be null or one unit price per label"),
    (lambda o: o.update(router_backend="tensorrt"), "'router_backend' must be one of python, onnxruntime"),
    (lambda o: o.update(decision=None), "'decision' must be an object"),
])
def test_routing_config_names_the_bad_key(tmp_path, change, message):
    """routing.json, what the Triton models read besides router.json, is validated by its one loader."""
    from zooter.runtime.routing import RoutingConfig, RoutingConfigError

    good = RoutingConfig(labels=tuple(LABELS), candidates={n: {"model": None, "why": "none"} for n in LABELS})
    assert RoutingConfig.read(good.write(tmp_path)) == good
    obj = good.to_json()
    change(obj)
    (tmp_path / "routing.json").write_text(json.dumps(obj))
    with pytest.raises(RoutingConfigError, match=f"routing.json: {message}"):
        RoutingConfig.read(tmp_path)


def test_many_threads_get_the_sequential_answers(router):
    texts = TEXTS * 3
    expected = [router.route(t) for t in texts]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(router.route, texts))
    assert [g.candidate for g in got] == [e.candidate for e in expected]
    for g, e in zip(got, expected):
        assert g.probabilities == pytest.approx(e.probabilities, abs=1e-6)
    chunks = [TEXTS[i:i + 7] for i in range(0, len(TEXTS), 7)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        batches = list(pool.map(router.route_batch, chunks))
    assert [[d.candidate for d in b] for b in batches] == [[d.candidate for d in router.route_batch(c)] for c in chunks]


def test_thread_count_does_not_change_an_answer(bundles):
    # Triton's zooter_route routes a lone request with two onnxruntime threads and queued ones with one
    # (triton_models/zooter_route/model.py): the answers must be the same to the bit.
    from zooter.runtime.router import Router

    for kind in ("int8", "fp32"):
        one, two = Router.load(bundles[kind], threads=1), Router.load(bundles[kind], threads=2)
        for text in TEXTS:
            assert one.route(text).probabilities == two.route(text).probabilities, (kind, text)


def test_route_batch_matches_route_on_fp32(bundles):
    from zooter.runtime.router import Router

    fp32 = Router.load(bundles["fp32"], threads=1)
    single = np.array([[fp32.route(t).probabilities[n] for n in LABELS] for t in TEXTS])
    batched = np.array([[d.probabilities[n] for n in LABELS] for d in fp32.route_batch(TEXTS, batch_size=16)])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_cost_knobs_and_allowed_candidates(bundles, router):
    from zooter.runtime.errors import SettingError
    from zooter.runtime.router import Router

    cheapest = min(PRICES, key=lambda n: sum(PRICES[n]))
    assert router.rule.lam == 0.0 and router.rule.tolerance == 0.0 and router.costs is not None
    plain = [router.route(t) for t in TEXTS]
    assert {d.candidate for d in plain} != {cheapest}
    assert {router.route(t, lam=100.0).candidate for t in TEXTS} == {cheapest}
    # tolerance in reward units: within 10 of the choice is everyone, so the cheapest; within 0 the choice itself.
    assert {router.route(t, tolerance=10.0).candidate for t in TEXTS} == {cheapest}
    assert [router.route(t, tolerance=0.0).candidate for t in TEXTS] == [d.candidate for d in plain]
    for d, t in zip(plain, TEXTS):   # a tolerance never picks a candidate expected below the choice by more than it
        frugal = router.route(t, tolerance=0.05)
        assert frugal.expected_rewards[frugal.candidate] >= d.expected_reward - 0.05 - 1e-9
        assert sum(PRICES[frugal.candidate]) <= sum(PRICES[d.candidate])
    assert Router.load(bundles["int8"], tolerance=10.0).route(TEXTS[0]).candidate == cheapest
    # An allowed subset: the choice and the fallback order stay inside it.
    subset = [n for n in LABELS if n != plain[0].candidate][:2]
    limited = router.route(TEXTS[0], candidates=subset)
    assert limited.candidate in subset and set(limited.ranking) == set(subset)
    with pytest.raises(SettingError, match="not labels of this router"):
        router.route(TEXTS[0], candidates=["nobody"])
    with pytest.raises(SettingError, match="no costs"):
        Router.load(bundles["fp32"]).route("hi", lam=0.5)
    with pytest.raises(SettingError, match="no costs"):
        Router.load(bundles["fp32"], tolerance=0.5)


def test_every_candidate_allowed_decides_as_an_all_true_mask(router):
    """Rule.decide skips the mask when no subset is given (a numpy call on one row costs about a microsecond):
    that path answers bit for bit what the masked path answers with every candidate allowed, for one row
    and many, with ties, the cost knobs and without the guard."""
    from zooter.runtime.decision import softmax

    rng = np.random.default_rng(3)
    m = len(router.labels)
    everyone = np.ones(m, dtype=bool)
    for trial in range(300):
        n = 1 if trial % 2 else int(rng.integers(2, 6))
        logits, scores = rng.normal(size=(n, m)) * [0.01, 1.0, 10.0][trial % 3], rng.normal(size=(n, m))
        if trial % 5 == 0:
            logits[:, 1], scores[:, 2] = logits[:, 0], scores[:, 0]   # ties in the choice and in the ranking
        probs = softmax(logits)
        lam, tolerance, guard = [0.0, 0.5][trial % 2], [0.0, 0.05, 1.0][trial % 3], trial % 7 != 0
        fast = router.rule.decide(probs, scores, lam, tolerance, None, guard)
        masked = router.rule.decide(probs, scores, lam, tolerance, everyone, guard)
        for field in ("choice", "ranking", "expected", "confidence", "anchored"):
            a, b = getattr(fast, field), getattr(masked, field)
            assert a.dtype == b.dtype and np.array_equal(a, b), field
    # Router.decide's Decision holds plain Python numbers equal to the rule's arrays.
    d = router.decide(probs[:1], scores[:1])[0]
    made = router.rule.decide(probs[:1], scores[:1])
    assert d.candidate == router.labels[int(made.choice[0])] and type(d.expected_reward) is float
    assert d.expected_rewards == {n: float(v) for n, v in zip(router.labels, made.expected[0])}
    assert d.probabilities == {n: float(v) for n, v in zip(router.labels, probs[0])}
    assert type(d.anchored) is bool and type(d.confidence) is float and d.confidence == float(made.confidence[0])


def test_providers(bundles):
    from zooter.runtime.errors import UserError
    from zooter.runtime.router import Router
    from zooter.runtime.session import default_providers

    assert default_providers(["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]) == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert default_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert "CPUExecutionProvider" in Router.load(bundles["int8"]).providers
    with pytest.raises(UserError, match="not available"):
        Router.load(bundles["int8"], providers=["NoSuchExecutionProvider"])


def test_route_command(bundles, router, capsys, monkeypatch):
    import io

    assert main(["route", str(bundles["int8"]), TEXTS[0], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["candidate"] == router.route(TEXTS[0]).candidate and set(out["probabilities"]) == set(LABELS)

    # Options after the bundle, before the text, as users type them.
    assert main(["route", str(bundles["int8"]), "--json", TEXTS[0]]) == 0
    assert json.loads(capsys.readouterr().out)["candidate"] == router.route(TEXTS[0]).candidate

    # stdin: a blank line and a line that is not UTF-8 keep their place; the bad bytes are replaced.
    raw = f"{TEXTS[1]}\n\n".encode() + b"caf\xe9 au lait?\n" + f"{TEXTS[2]}\n".encode()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(raw)))
    assert main(["route", str(bundles["int8"]), "--json"]) == 2
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["candidate"] == router.route(TEXTS[1]).candidate and rows[3]["candidate"] == router.route(TEXTS[2]).candidate
    assert "empty query" in rows[1]["error"] and rows[2]["candidate"] == router.route("caf\ufffd au lait?").candidate

    # A lone surrogate (an undecodable argv byte) is replaced, and the query answered.
    assert main(["route", str(bundles["int8"]), "caf\udce9"]) == 0
    header, answer = capsys.readouterr().out.splitlines()
    assert header.split("\t") == ["candidate", "expected_reward", "confidence", "latency_ms", "query"]
    assert answer.split("\t")[0] == router.route("caf\ufffd").candidate

    assert main(["route", str(bundles["int8"]), " "]) == 2
    assert "empty query" in capsys.readouterr().err
    assert main(["route", str(bundles["int8"].parent / "missing"), "hi"]) == 2
    assert "no such bundle" in capsys.readouterr().err
