"""The routing-data contract, the importers on the shipped public data, splits and dedupe."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from zooter.training import importers
from zooter.serving.candidates import CandidatesError, from_prices, load_candidates, save_candidates
from zooter.training.dataset import DataError, RoutingDataset
from zooter.training.splits import dedupe, normalize, split, split_indices
from zooter.training.stats import data_stats

ALPACA_MODELS = {
    "FuseChat-Gemma-2-9B-Instruct", "FuseChat-Qwen-2.5-7B-Instruct", "FuseChat-Llama-3.1-8B-Instruct",
    "FuseChat-Llama-3.2-3B-Instruct", "FuseChat-Llama-3.2-1B-Instruct", "gpt4_1106_preview", "claude-2",
    "OpenHermes-2.5-Mistral-7B", "Qwen-14B-Chat", "wizardlm-13b", "vicuna-13b-v1.5",
}


def write_jsonl(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def good(i, **over):
    obj = {"id": f"r{i}", "query": f"question {i}", "rewards": {"a": 0.5, "b": 0.1}, "tags": ["t"], "source": "s"}
    obj.update(over)
    return obj


# --- importers on the shipped files -----------------------------------------------------------

@pytest.fixture(scope="module")
def alpaca(data_dir):
    return importers.import_alpaca_eval(data_dir / "alpaca_eval")


@pytest.fixture(scope="module")
def dcrouter(data_dir):
    return importers.import_scores(data_dir / "dcrouter" / "train.json")


def test_alpaca_eval_import(alpaca, data_dir):
    assert len(alpaca) == 805
    assert set(alpaca.candidates) == ALPACA_MODELS
    assert all(len(row.responses) == 11 for row in alpaca.rows)
    assert {t for row in alpaca.rows for t in row.tags} == {"selfinstruct", "oasst", "koala", "helpful_base", "vicuna"}
    # Per-candidate means equal a direct computation from the raw annotations.
    means = data_stats(alpaca)["per_candidate"]
    for model in ("FuseChat-Gemma-2-9B-Instruct", "wizardlm-13b"):
        raw = json.loads((data_dir / "alpaca_eval/results" / model / "weighted_alpaca_eval_gpt4_turbo/annotations.json").read_text())
        direct = np.mean([float(r["preference"]) - 1 for r in raw])
        assert math.isclose(means[model]["mean_reward"], direct, rel_tol=1e-9)
    assert round(means["FuseChat-Gemma-2-9B-Instruct"]["mean_reward"], 3) == 0.705


def test_alpaca_eval_string_preference_and_model_subset(tmp_path):
    for model, prefs in {"m1": ["1.75", 1.0], "m2": [1.25, None]}.items():
        d = tmp_path / "results" / model / "weighted_alpaca_eval_gpt4_turbo"
        d.mkdir(parents=True)
        recs = [{"instruction": f"do {i}", "output_2": f"{model} says {i}", "dataset": "koala", "preference": p}
                for i, p in enumerate(prefs)]
        (d / "annotations.json").write_text(json.dumps(recs))
    data = importers.import_alpaca_eval(tmp_path)
    r = data.rewards()
    assert data.candidates == ["m1", "m2"]
    assert r[0].tolist() == [0.75, 0.25]
    assert r[1, 0] == 0.0 and np.isnan(r[1, 1])  # null preference: not scored, not zero
    with pytest.raises(Exception, match="m3"):
        importers.import_alpaca_eval(tmp_path, ["m1", "m3"])


def test_dcrouter_import(dcrouter, data_dir):
    assert len(dcrouter) == 5608
    assert len(dcrouter.candidates) == 9
    assert {t for row in dcrouter.rows for t in row.tags} == {"cluster:0", "cluster:1", "cluster:2"}
    raw = json.loads((data_dir / "dcrouter" / "train.json").read_text())
    stats = data_stats(dcrouter)
    for name in dcrouter.candidates:
        direct = np.mean([rec["scores"][name] for rec in raw])
        assert math.isclose(stats["per_candidate"][name]["mean_reward"], direct, rel_tol=1e-9)
    assert math.isclose(stats["oracle"]["mean_reward"], np.mean([max(rec["scores"].values()) for rec in raw]))
    assert stats["best_single"]["candidate"] == "llama-3.1-nemotron-51b-instruct"


def test_roundtrip_and_hash(dcrouter, tmp_path):
    path = tmp_path / "dc.jsonl"
    dcrouter.save(path)
    again = RoutingDataset.load(path)
    assert again.candidates == dcrouter.candidates
    assert again.sha256() == dcrouter.sha256()
    np.testing.assert_array_equal(again.rewards(), dcrouter.rewards())


# --- validation: each error names the line ----------------------------------------------------

@pytest.mark.parametrize("bad, reason", [
    (good(1, query="   "), "empty query"),
    (good(1, query=7), "empty query"),
    (good(1, rewards={}), "'rewards' must be a non-empty object"),
    (good(1, rewards=[0.5]), "'rewards' must be a non-empty object"),
    ('{"id": "r1", "query": "q", "rewards": {"a": NaN, "b": 1}}', "finite"),
    ('{"id": "r1", "query": "q", "rewards": {"a": Infinity, "b": 1}}', "finite"),
    (good(1, rewards={"a": None, "b": None}), "every reward is null"),
    (good(0), "duplicate id 'r0'"),
    (good(1, rewards={"a": "high", "b": 1}), "expected a number"),
    ("{not json", "invalid JSON"),
])
def test_validation_errors_name_the_line(tmp_path, bad, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [good(0), bad, good(2)])
    with pytest.raises(DataError, match=reason) as info:
        RoutingDataset.load(path)
    assert info.value.line == 2
    assert "bad.jsonl:2:" in str(info.value)


@pytest.mark.parametrize("record, reason", [
    ({"question": " ", "scores": {"a": 1}}, "record 1: empty question"),
    ({"question": "q", "scores": {}}, "record 1: 'scores' must be a non-empty object"),
    ({"question": "q", "scores": [1, 2]}, "record 1: 'scores' must be a non-empty object"),
])
def test_scores_import_names_the_bad_record(tmp_path, record, reason):
    path = tmp_path / "scores.json"
    path.write_text(json.dumps([{"question": "fine", "scores": {"a": 1, "b": 0}}, record]))
    with pytest.raises(DataError, match=reason):
        importers.import_scores(path)


def test_unknown_candidate_and_too_few_candidates(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [good(0), good(1, rewards={"a": 1.0, "zz": 0.0})])
    with pytest.raises(DataError, match=r"d.jsonl:2: .*\['zz'\] not in the candidate list"):
        RoutingDataset.load(path, candidates=["a", "b"])
    one = write_jsonl(tmp_path / "one.jsonl", [good(0, rewards={"a": 1.0})])
    with pytest.raises(DataError, match="at least 2"):
        RoutingDataset.load(one)


def test_null_reward_is_not_zero(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [good(0, rewards={"a": None, "b": 0.2}), good(1, rewards={"a": 0.8, "b": 0.4})])
    data = RoutingDataset.load(path)
    stats = data_stats(data)
    assert stats["per_candidate"]["a"] == {"mean_reward": 0.8, "coverage": 0.5}
    assert math.isclose(stats["random"]["mean_reward"], (0.2 + 0.6) / 2)


# --- splits -----------------------------------------------------------------------------------

def test_split_is_deterministic_and_disjoint(dcrouter):
    a = split_indices(dcrouter.queries, 0.1, 0.1, seed=0)
    b = split_indices(dcrouter.queries, 0.1, 0.1, seed=0)
    assert a == b
    assert sum(len(v) for v in a.values()) == len(dcrouter)
    texts = {name: {normalize(dcrouter.queries[i]) for i in idx} for name, idx in a.items()}
    assert not (texts["train"] & texts["dev"]) and not (texts["train"] & texts["test"]) and not (texts["dev"] & texts["test"])
    assert 0.07 < len(a["test"]) / len(dcrouter) < 0.13
    assert split_indices(dcrouter.queries, 0.1, 0.1, seed=1) != a


def test_same_query_lands_in_one_split():
    queries = ["What is 2+2?", "what is  2+2?", "Other"] * 50
    parts = split_indices(queries, 0.3, 0.3, seed=3)
    where = {}
    for name, idx in parts.items():
        for i in idx:
            where.setdefault(normalize(queries[i]), set()).add(name)
    assert all(len(v) == 1 for v in where.values())


def test_dedupe(dcrouter):
    parts = split(dcrouter, 0.0, 0.2, seed=0)
    leaky = RoutingDataset(parts["test"].rows + parts["train"].rows[:119], dcrouter.candidates)
    clean, removed = dedupe(leaky, parts["train"])
    assert removed == 119 and len(clean) == len(parts["test"])


# --- candidates file --------------------------------------------------------------------------

def test_candidates_from_prices(data_dir, tmp_path):
    cands = from_prices(data_dir / "dcrouter" / "llm_candidates.json")
    by = {c.name: c for c in cands}
    assert by["gemma-2-9b-it"].cost.input_per_mtok == 0.10
    save_candidates(cands, tmp_path / "c.yaml")
    again = load_candidates(tmp_path / "c.yaml")
    assert [c.name for c in again] == [c.name for c in cands]
    (tmp_path / "nocost.yaml").write_text("- name: a\n- name: b\n  serve: {triton_model: b_llm}\n")
    assert [c.cost for c in load_candidates(tmp_path / "nocost.yaml")] == [None, None]
    (tmp_path / "bad.yaml").write_text("- name: a\n  cost: {input_per_mtok: -1, output_per_mtok: 1}\n")
    with pytest.raises(CandidatesError, match="input_per_mtok"):
        load_candidates(tmp_path / "bad.yaml")
