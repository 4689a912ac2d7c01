"""Evaluation metrics on a hand-made reward matrix where every number is known in advance; the guard,
the bootstrap interval and calibration on synthetic data with known answers."""

import json

import numpy as np
import pytest

from tiny import plain_decision
from zooter.serving.candidates import Cost
from zooter.training.dataset import RoutingDataset, Row
from zooter.training.evaluate import (aligned_rewards, calibration, confusion, cost_matrix, entropy_vs_correctness,
                                      evaluate, format_table, mean_task_rank, paired_bootstrap)

NAN = float("nan")
LABELS = ["a", "b", "c"]
REWARDS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, NAN]], dtype=float)
# The router picks a, b, a, and on the last row would pick c, which is not scored there: it takes b.
PROBS = np.array([[0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
SCORES = PROBS.copy()                  # raw expected-reward scores (the plain decision maps them as they are)
DECISION = plain_decision(LABELS)      # no guard, identity calibration: the paper's argmax p
TAGS = [["x"], ["x"], ["y"], ["y"]]
COSTS = np.array([1.0, 2.0, 4.0])


@pytest.fixture
def report():
    return evaluate(REWARDS, PROBS, SCORES, LABELS, "a", DECISION, tags=TAGS, costs=COSTS)


def test_router_baselines_and_gap(report):
    assert report["n"] == 4
    assert report["router"]["mean_reward"] == pytest.approx(0.75)      # 1, 1, 0, 1
    assert report["unguarded"]["mean_reward"] == pytest.approx(0.75)   # the plain decision has no guard
    base = report["baselines"]
    assert base["best_single"] == {"candidate": "a", "mean_reward": 0.5, "mean_cost": 1.0}
    assert base["oracle"]["mean_reward"] == pytest.approx(1.0)
    assert base["random"]["mean_reward"] == pytest.approx((1 / 3 * 3 + 1) / 4)
    assert base["per_candidate"]["b"]["mean_reward"] == pytest.approx(0.5)
    assert base["per_candidate"]["c"]["mean_reward"] == pytest.approx(1 / 3)  # null on row 3: not a zero
    assert report["gap_closed"] == pytest.approx(0.5)
    assert report["win_tie_loss_vs_best_single"] == [1, 3, 0]
    assert report["router_vs_best_single"]["mean"] == pytest.approx(0.25)
    assert report["routing_accuracy"] == pytest.approx(0.75)


def test_costs_of_router_and_oracle(report):
    assert report["router"]["mean_cost"] == pytest.approx((1 + 2 + 1 + 2) / 4)
    # The oracle takes the cheapest of the tied best on the last row (a at 1, not b at 2).
    assert report["baselines"]["oracle"]["mean_cost"] == pytest.approx((1 + 2 + 4 + 1) / 4)
    assert report["baselines"]["per_candidate"]["c"]["mean_cost"] == pytest.approx(4.0)


def test_mean_task_rank_by_hand(report):
    # Task x: router 1.0, a 0.5, b 0.5, c 0.0 -> ranks 1, 2.5, 2.5, 4.
    # Task y: router 0.5, a 0.5, b 0.5, c 1.0 -> ranks 3, 3, 3, 1.
    assert report["mtr"] == pytest.approx({"router": 2.0, "a": 2.75, "b": 2.75, "c": 2.5})
    assert mean_task_rank(REWARDS, np.array([1, 1, 0, 1.0]), LABELS, [[], [], [], []])["router"] == pytest.approx(1.0)


def test_tolerance_sweep_trades_reward_for_cost(report):
    sweep = {p["tolerance"]: p for p in report["pareto"]}
    assert sweep[0.0]["mean_reward"] == pytest.approx(0.75) and sweep[0.0]["mean_cost"] == pytest.approx(1.5)
    # tolerance 1: every scored candidate is within 1 of the choice's expected reward: the cheapest wins.
    assert sweep[1.0]["mean_reward"] == pytest.approx(0.5) and sweep[1.0]["mean_cost"] == pytest.approx(1.0)
    # 0.3: the cheapest within 0.3 of the choice: row 1 keeps a, row 2 takes a (0.3 >= 0.6 - 0.3), row 4 takes a.
    assert sweep[0.3]["mean_reward"] == pytest.approx(0.5)
    at = report["cost_at_best_single_quality"]
    assert at["mean_cost"] == pytest.approx(1.0) and at["cost_ratio_vs_best_single"] == pytest.approx(1.0)
    cheap = evaluate(REWARDS, PROBS, SCORES, LABELS, "a", DECISION, costs=COSTS, tolerance=1.0)
    assert cheap["router"]["mean_reward"] == pytest.approx(0.5) and cheap["tolerance"] == 1.0


def test_without_costs_there_is_no_sweep():
    r = evaluate(REWARDS, PROBS, SCORES, LABELS, "b", DECISION)
    assert r["pareto"] == [] and r["router"]["mean_cost"] is None
    assert r["baselines"]["best_single"]["candidate"] == "b"
    assert "router" in format_table(r)


def test_per_tag_and_table(report):
    assert report["per_tag"]["x"] == {"n": 2, "router": 1.0, "best_single": 0.5, "oracle": 1.0}
    assert report["per_tag"]["y"]["router"] == pytest.approx(0.5)
    table = format_table(report)
    assert "a *" in table and "gap closed=0.500" in table and "95% CI" in table and "ECE" in table
    json.dumps(report)  # the report is plain JSON


def test_the_guard_keeps_the_anchor_unless_the_expected_gain_clears_the_margin():
    guarded = dict(DECISION, anchor="a", margin=0.25)
    r = evaluate(REWARDS, PROBS, SCORES, LABELS, "a", guarded)
    # Gains over a: row 2 (b) 0.3 > 0.25 leaves; row 4 (b) 0.1 stays with a; rows 1, 3 choose a anyway.
    assert r["router"]["mean_reward"] == pytest.approx((1 + 1 + 0 + 1) / 4)
    assert r["router"]["kept_best_single"] == pytest.approx(0.75)
    assert r["unguarded"]["mean_reward"] == pytest.approx(0.75)


def test_ece_by_hand():
    got = calibration(np.array([0.2, 0.4, 0.6, 0.8]), np.array([0.0, 1.0, 1.0, 1.0]), bins=2)
    # bins {0.2, 0.4}: predicted 0.3, realised 0.5; {0.6, 0.8}: 0.7 vs 1.0 -> ECE 0.5*0.2 + 0.5*0.3
    assert got["ece"] == pytest.approx(0.25)
    assert [(b["n"], b["predicted"], b["realised"]) for b in got["bins"]] == [(2, pytest.approx(0.3), 0.5),
                                                                               (2, pytest.approx(0.7), 1.0)]


def test_bootstrap_interval_covers_a_known_difference():
    rng = np.random.default_rng(7)
    covered = 0
    for trial in range(40):
        diff = 0.05 + rng.normal(0, 0.3, size=400)      # true mean difference 0.05
        ci = paired_bootstrap(diff, resamples=500, seed=trial)["ci95"]
        covered += ci[0] <= 0.05 <= ci[1]
    assert covered >= 34   # a 95% interval: about 38 of 40; far fewer would mean a broken interval
    strong = paired_bootstrap(0.05 + rng.normal(0, 0.1, size=2000))
    assert strong["ci95"][0] > 0 and strong["mean"] == pytest.approx(0.05, abs=0.01)


def test_confusion_splits_ties_and_skips_rows_where_every_choice_ties():
    m = confusion(REWARDS, np.array([0, 1, 0, 1]), LABELS)
    # Row 3 (a and b both 1, c unscored) is left out: any choice there is a best one.
    assert m[0, 0] == pytest.approx(1.0) and m[1, 1] == pytest.approx(1.0) and m[2, 0] == pytest.approx(1.0)
    assert m.sum() == pytest.approx(3)
    m = confusion(np.array([[1.0, 1.0, 0.0]]), np.array([2]), LABELS)
    assert m[0, 2] == pytest.approx(0.5) and m[1, 2] == pytest.approx(0.5)


def test_entropy_bins():
    bins = entropy_vs_correctness(np.array([0.1, 0.2, 1.0, 1.1]), np.array([1, 1, 0, 1]), bins=2)
    assert [b["n"] for b in bins] == [2, 2]
    assert [b["accuracy"] for b in bins] == [1.0, 0.5]


def test_costs_per_answer_when_responses_exist_else_unit_prices():
    prices = {"a": Cost(1.0, 2.0), "b": Cost(10.0, 20.0)}
    rows = [Row("1", "q" * 8, {"a": 1.0, "b": 0.0}, responses={"a": "x" * 40, "b": "y" * 4})]
    costs, unit = cost_matrix(RoutingDataset(rows), ["a", "b"], prices)
    assert unit == "usd_per_query"
    assert costs[0] == pytest.approx([(2 * 1 + 10 * 2) / 1e6, (2 * 10 + 1 * 20) / 1e6])
    rows = [Row("1", "q", {"a": 1.0, "b": 0.0})]
    costs, unit = cost_matrix(RoutingDataset(rows), ["a", "b"], prices)
    assert unit == "usd_per_mtok" and costs.tolist() == [1.5, 15.0]


def test_rewards_follow_the_router_label_order():
    data = RoutingDataset([Row("1", "q", {"b": 0.2, "a": 0.7})], ["b", "a"])
    assert aligned_rewards(data, ["a", "b", "z"])[0, :2].tolist() == [0.7, 0.2]
    assert np.isnan(aligned_rewards(data, ["a", "b", "z"])[0, 2])


# --- honest figures: data the run has seen (issue 20.3) --------------------------------------------
@pytest.fixture(scope="module")
def seen_run(routing_files, tiny_backbone, tmp_path_factory):
    """A tiny frozen run trained on routing_files' train rows, with its dev file."""
    from zooter.training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("seen") / "run"
    train(TrainConfig(data=str(routing_files["train"]), dev=str(routing_files["dev"]), out=str(out),
                      backbone=str(tiny_backbone), frozen=True, int8_consistency=0.0, epochs=2, max_length=32,
                      batch_size=16, threads=1))
    return out


def _eval(run, data, tmp_path, capsys) -> tuple[dict, str]:
    from zooter.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--data", str(data), "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().err


def _mix(routing_files, path, n_train: int):
    """The 29 test rows whose queries training never saw, plus the first `n_train` training rows."""
    from zooter.training.splits import dedupe

    test, train, dev = (RoutingDataset.load(routing_files[k]) for k in ("test", "train", "dev"))
    test = dedupe(dedupe(test, train)[0], dev)[0]
    assert len(test) == 29      # the synthetic test file repeats one training query
    RoutingDataset(test.rows + train.rows[:n_train], test.candidates).save(path)
    return path


def test_eval_warns_on_its_own_training_data_and_not_on_disjoint_data(seen_run, routing_files, tmp_path, capsys):
    report, err = _eval(seen_run, routing_files["train"], tmp_path, capsys)
    assert len(report["warnings"]) == 1 and "training rows (same data hash)" in report["warnings"][0]
    assert "zooter eval: warning:" in err and "not held-out" in err
    assert report["seen_in_training"]["training_queries"] == 120 and report["seen_in_training"]["seen_share"] == 1.0
    # An exported bundle carries the digests: eval of the bundle warns alike.
    from zooter.cli import main

    assert main(["export", str(seen_run), "--out", str(tmp_path / "bundle"), "--quantize", "none"]) == 0
    report, err = _eval(tmp_path / "bundle", _mix(routing_files, tmp_path / "mix4.jsonl", 4), tmp_path, capsys)
    assert report["warnings"] and report["seen_in_training"]["from"] == "run.json query_digests"
    report, err = _eval(seen_run, routing_files["dev"], tmp_path, capsys)
    assert report["warnings"] and report["seen_in_training"]["dev_queries"] == 30
    report, err = _eval(seen_run, _mix(routing_files, tmp_path / "disjoint.jsonl", 0), tmp_path, capsys)
    assert report["warnings"] == [] and "warning" not in err
    assert report["seen_in_training"]["checked"] and report["seen_in_training"]["seen_share"] == 0.0
    # Shared queries: 4 of 33 (12.1%) warns, naming the share; 1 of 30 (3.3%) is under the 5% line.
    report, err = _eval(seen_run, _mix(routing_files, tmp_path / "mix4.jsonl", 4), tmp_path, capsys)
    assert len(report["warnings"]) == 1 and "4 of 33 queries (12.1%)" in err
    report, err = _eval(seen_run, _mix(routing_files, tmp_path / "mix1.jsonl", 1), tmp_path, capsys)
    assert report["warnings"] == [] and report["seen_in_training"]["training_queries"] == 1


def test_eval_of_an_older_run_without_query_digests(seen_run, routing_files, tmp_path, capsys):
    """A run trained before run.json kept its query digests: eval re-reads the files it names while
    they hash as they did; when they are gone only the whole-file hashes are compared, and it says so."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(seen_run, old)
    info = json.loads((old / "run.json").read_text())
    del info["query_digests"]
    (old / "run.json").write_text(json.dumps(info))
    report, err = _eval(old, _mix(routing_files, tmp_path / "mix.jsonl", 4), tmp_path, capsys)
    assert report["warnings"] and "re-read" in report["seen_in_training"]["from"]
    info["data"] = str(tmp_path / "gone.jsonl")
    (old / "run.json").write_text(json.dumps(info))
    report, err = _eval(old, _mix(routing_files, tmp_path / "mix.jsonl", 4), tmp_path, capsys)
    assert report["warnings"] == [] and not report["seen_in_training"]["checked"]
    assert "files are gone" in report["seen_in_training"]["why"]
    report, err = _eval(old, routing_files["train"], tmp_path, capsys)
    assert report["warnings"] and "same data hash" in err


# --- one unit price: eval decides as the shipped router does (issue 23.6) ---------------------------
def test_eval_tolerance_decisions_equal_the_routers_on_data_with_responses(bundles, tmp_path):
    """Rows with responses price each answer, but decisions take the rule's unit price, as the Router does.

    Unit prices make delta-1b the cheapest (0.03 a million tokens); its answers here are long and gamma-8b's
    one token, so priced per answer gamma-8b would be the cheapest and a tolerance of 1 would choose it."""
    from tiny import LABELS, TEXTS
    from zooter.runtime.router import Router

    rng = np.random.default_rng(3)
    length = {"alpha-7b": 400, "beta-70b": 400, "gamma-8b": 4, "delta-1b": 40000}
    data = tmp_path / "with_responses.jsonl"
    # Distinct rewards on every row: the router's reward names the candidate it chose.
    data.write_text("".join(json.dumps({"id": f"q{i}", "query": t, "rewards": dict(zip(LABELS, rng.permutation(4) / 4)),
                                        "responses": {n: "x" * length[n] for n in LABELS}}) + "\n"
                            for i, t in enumerate(TEXTS)))
    from zooter.training.evaluate import evaluate_router

    report = evaluate_router(bundles["int8"], data, candidates=str(bundles["candidates"]), tolerance=1.0, keep_rows=True)
    assert report["cost_unit"] == "usd_per_query"
    assert report["unit_prices"] == pytest.approx({"alpha-7b": 0.2, "beta-70b": 0.9, "gamma-8b": 0.1, "delta-1b": 0.03})
    router = Router.load(bundles["int8"], tolerance=1.0)
    rows = RoutingDataset.load(data)
    rewards = aligned_rewards(rows, LABELS)
    chosen = [LABELS.index(d.candidate) for d in router.route_batch(list(rows.queries))]
    assert report["rows"]["router"] == rewards[np.arange(len(chosen)), chosen].tolist()
    assert report["chosen_share"]["delta-1b"] == 1.0
    # The realised cost is still reported: what the chosen answers cost, per query.
    assert report["router"]["mean_cost"] == pytest.approx(approx_tokens_cost(rows, "delta-1b"))


def approx_tokens_cost(rows, name):
    from zooter.training.evaluate import approx_tokens

    return float(np.mean([(approx_tokens(r.query) * 0.02 + approx_tokens(r.responses[name]) * 0.04) / 1e6 for r in rows.rows]))
