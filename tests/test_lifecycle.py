"""The candidate lifecycle on the tiny encoder: a candidate added from some of its rewards is chosen
where it is better, add-then-remove gives the original decisions back, refused input changes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zooter.cli import main
from zooter.runtime.decision import Rule
from zooter.training.dataset import RoutingDataset
from zooter.training.evaluate import open_router
from zooter.training.train import TrainConfig, train

from tiny import CANDIDATES, synthetic

NEW = "coder"
OLD = [c for c in CANDIDATES if c != NEW]


def without(data: RoutingDataset, names) -> RoutingDataset:
    from zooter.training.lifecycle import _columns

    return _columns(data, list(names))


@pytest.fixture(scope="module")
def pool(tiny_backbone, tmp_path_factory):
    """A frozen run trained on two candidates, the third one's rows, and test rows scoring all three."""
    root = tmp_path_factory.mktemp("lifecycle")
    train_rows, dev_rows, test_rows = synthetic(150, 0), synthetic(45, 1), synthetic(45, 2)
    without(train_rows, OLD).save(root / "train.jsonl")
    without(dev_rows, OLD).save(root / "dev.jsonl")
    # The new candidate labelled on two thirds of the training queries (of every topic) and on the dev queries.
    labelled = [r for i, r in enumerate(train_rows.rows) if i % 7 not in (0, 4)] + dev_rows.rows
    (root / "new.jsonl").write_text("".join(json.dumps({"id": r.id, "query": r.query, "rewards": {NEW: r.rewards[NEW]}}) + "\n"
                                            for r in labelled))
    cfg = TrainConfig(data=str(root / "train.jsonl"), dev=str(root / "dev.jsonl"), out=str(root / "run"),
                      backbone=str(tiny_backbone), frozen=True, epochs=30, lr=3e-2, max_length=32, batch_size=16,
                      threads=1, int8_consistency=0, cache=str(root / "cache"))
    train(cfg)
    return {"root": root, "run": root / "run", "test": test_rows}


def decisions(run, texts) -> np.ndarray:
    router = open_router(run)
    probs, scores = router.outputs_of(texts)
    info = json.loads((run / "run.json").read_text())
    return np.array(info["labels"])[Rule.from_manifest(info).decide(probs, scores).choice]


def test_added_candidate_is_chosen_where_it_is_better_and_listed(pool, capsys):
    run2 = pool["root"] / "added"
    assert main(["candidates", "add", str(pool["run"]), "--name", NEW, "--data", str(pool["root"] / "new.jsonl"),
                 "--out", str(run2)]) == 0
    info = json.loads((run2 / "run.json").read_text())
    assert info["labels"] == OLD + [NEW]
    entered = info["lifecycle"]["entered"][NEW]
    # (a few synthetic dev queries repeat a training query's text: they are labelled as training rows)
    assert entered["how"] == "added" and entered["rows"] == entered["train"] + entered["dev"] == 152
    assert entered["new_queries"] == 0
    # the encoder is the run's, unchanged
    assert (run2 / "encoder" / "model.safetensors").read_bytes() == (pool["run"] / "encoder" / "model.safetensors").read_bytes()
    test = pool["test"]
    chosen = decisions(run2, test.queries)
    topic = np.array([r.tags[0].split(":")[1] for r in test.rows])
    assert np.mean(chosen[topic == NEW] == NEW) >= 0.8
    assert np.mean(chosen[topic != NEW] == NEW) <= 0.2

    capsys.readouterr()
    assert main(["candidates", "list", str(run2), "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed[NEW]["entered"] == "added on 152 rows" and listed["mathy"]["entered"] == "trained"
    assert listed[NEW]["dev_scored"] == entered["dev"] and listed[NEW]["dev_chosen"] > 0.2

    assert main(["candidates", "list", str(run2)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["candidate", "entered"] and len(table) == 4
    assert any(line.startswith(NEW) and "added on 152 rows" in line for line in table)

    # `zooter export` takes the new run like any other; the bundle lists the candidates alike
    bundle = pool["root"] / "added-bundle"
    assert main(["export", str(run2), "--out", str(bundle), "--quantize", "none", "--parity-data",
                 str(pool["root"] / "dev.jsonl")]) == 0
    from zooter.runtime.router import Router

    router = Router.load(bundle)
    assert router.labels == OLD + [NEW]
    assert [router.route(q).candidate for q in test.queries[:12]] == list(chosen[:12])
    capsys.readouterr()
    assert main(["candidates", "list", str(bundle), "--json"]) == 0
    assert {r["name"]: r["entered"] for r in json.loads(capsys.readouterr().out)}[NEW] == "added on 152 rows"


def test_add_then_remove_returns_the_original_decisions(pool):
    run2, run3 = pool["root"] / "added2", pool["root"] / "removed"
    assert main(["candidates", "add", str(pool["run"]), "--name", NEW, "--data", str(pool["root"] / "new.jsonl"),
                 "--out", str(run2)]) == 0
    assert main(["candidates", "remove", str(run2), "--name", NEW, "--out", str(run3)]) == 0
    texts = pool["test"].queries
    assert (decisions(run3, texts) == decisions(pool["run"], texts)).all()
    before, after = (json.loads((r / "run.json").read_text()) for r in (pool["run"], run3))
    assert after["labels"] == before["labels"] and after["decision"]["margin"] == before["decision"]["margin"]
    assert after["best_single"]["candidate"] == before["best_single"]["candidate"]


@pytest.mark.parametrize("case", ["known name", "never scored", "unknown column", "last two"])
def test_refused_input_names_the_problem_and_writes_nothing(pool, tmp_path, capsys, case):
    out = tmp_path / "out"
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": "a", "query": "q", "rewards": {"mathy": 0.5, NEW: None}}) + "\n")
    if case == "known name":
        argv = ["add", str(pool["run"]), "--name", "mathy", "--data", str(pool["root"] / "new.jsonl")]
        expect = "--name mathy: already a candidate"
    elif case == "never scored":
        argv = ["add", str(pool["run"]), "--name", NEW, "--data", str(rows)]
        expect = f"no row scores '{NEW}'"
    elif case == "unknown column":
        rows.write_text(json.dumps({"id": "a", "query": "q", "rewards": {"zeta": 0.5, NEW: 0.1}}) + "\n")
        argv = ["add", str(pool["run"]), "--name", NEW, "--data", str(rows)]
        expect = "['zeta']"
    else:
        argv = ["remove", str(pool["run"]), "--name", "mathy"]
        expect = "needs at least 2 to remain"
    capsys.readouterr()
    assert main(["candidates", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_out_as_the_run_itself_is_refused_before_any_work(pool, capsys):
    run = pool["run"]
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir())
    for argv in (["add", str(run), "--name", NEW, "--data", str(pool["root"] / "new.jsonl")],
                 ["remove", str(run), "--name", "mathy"]):
        capsys.readouterr()
        assert main(["candidates", *argv, "--out", str(run)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is the run itself" in err, err     # not "pass --force"
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir()) == before


def test_new_queries_join_the_training_rows_and_removing_the_anchor_moves_it(pool, tmp_path):
    fresh = synthetic(30, 7)
    rows = tmp_path / "fresh.jsonl"
    rows.write_text("".join(json.dumps({"id": r.id, "query": "fresh " + r.query,
                                        "rewards": {"mathy": r.rewards["mathy"], NEW: r.rewards[NEW]}}) + "\n"
                            for r in fresh.rows))
    run2, run3 = tmp_path / "added", tmp_path / "removed"
    assert main(["candidates", "add", str(pool["run"]), "--name", NEW, "--data", str(rows), "--out", str(run2)]) == 0
    info = json.loads((run2 / "run.json").read_text())
    assert info["lifecycle"]["entered"][NEW] == {"how": "added", "rows": 30, "train": 30, "dev": 0, "new_queries": 30}
    assert info["n_train"] == 150 + 30
    anchor = info["best_single"]["candidate"]
    assert main(["candidates", "remove", str(run2), "--name", anchor, "--out", str(run3)]) == 0
    after = json.loads((run3 / "run.json").read_text())
    assert anchor not in after["labels"] and after["best_single"]["candidate"] in after["labels"]
    assert after["decision"]["anchor"] == after["best_single"]["candidate"]
    assert after["lifecycle"]["events"][-1] == {"op": "remove", "name": anchor, "anchor_was": anchor,
                                                "anchor_now": after["best_single"]["candidate"]}
    # the rows added with the removed candidate's run stay: the new queries still train the others
    assert after["n_train"] == 180


def test_a_fine_tuned_run_takes_a_candidate_on_its_own_encoder(pool, tiny_backbone, tmp_path):
    root = pool["root"]
    cfg = TrainConfig(data=str(root / "train.jsonl"), dev=str(root / "dev.jsonl"), out=str(tmp_path / "tuned"),
                      backbone=str(tiny_backbone), epochs=2, lr=3e-3, max_length=32, batch_size=16, threads=1)
    train(cfg)
    run2, run3 = tmp_path / "added", tmp_path / "removed"
    assert main(["candidates", "add", str(tmp_path / "tuned"), "--name", NEW, "--data", str(root / "new.jsonl"),
                 "--out", str(run2)]) == 0
    assert json.loads((run2 / "run.json").read_text())["labels"] == OLD + [NEW]
    assert (run2 / "encoder" / "model.safetensors").read_bytes() == (tmp_path / "tuned" / "encoder" / "model.safetensors").read_bytes()
    assert main(["candidates", "remove", str(run2), "--name", "poet", "--out", str(run3)]) == 0
    from safetensors.numpy import load_file

    # a fine-tuned head keeps its rows: removing a candidate drops its row and nothing else
    before, after = load_file(run2 / "head.safetensors"), load_file(run3 / "head.safetensors")
    assert np.array_equal(after["weight"], before["weight"][[0, 2]])
    texts = pool["test"].queries
    assert set(decisions(run3, texts)) <= {"mathy", NEW}


def test_a_quantization_aware_run_is_refitted_against_the_int8_encoder_training_builds(pool, tiny_backbone, tmp_path):
    """Training builds the INT8 encoder itself (zooter.convert), in the lifecycle as in `train`: nobody hands it
    in, and a run trained quantization-aware has its heads refitted on that encoder's embeddings too."""
    from zooter.training.lifecycle import add_candidate

    root = pool["root"]
    cfg = TrainConfig(data=str(root / "train.jsonl"), dev=str(root / "dev.jsonl"), out=str(tmp_path / "qat"),
                      backbone=str(tiny_backbone), frozen=True, epochs=4, lr=3e-2, max_length=32, batch_size=16,
                      threads=1, int8_consistency=200.0)
    assert "int8_agreement" in train(cfg)["dev"]
    cache = tmp_path / "cache"
    info = add_candidate(tmp_path / "qat", NEW, root / "new.jsonl", tmp_path / "added", cache=str(cache))
    assert info["labels"] == OLD + [NEW]
    # one embedding file for the fp32 encoder, one for the INT8 encoder (its recipe is in the key)
    assert len(list(cache.glob("embeddings-*.npz"))) == 2


def test_bench_prints_the_curve_over_k(tiny_backbone, tmp_path, capsys):
    data = tmp_path / "all.jsonl"
    synthetic(120, 3).save(data)
    out = tmp_path / "bench.json"
    assert main(["candidates", "bench", "--data", str(data), "--names", NEW, "--k", "20,all", "--folds", "2",
                 "--layers", "1", "--backbone", str(tiny_backbone), "--json", str(out)]) == 0
    table = json.loads(out.read_text())
    assert set(table["candidates"][NEW]) == {"without", "20", "all"}
    row = table["candidates"][NEW]["20"]
    assert row["vs_retrain_ci95"][0] <= row["vs_retrain"] <= row["vs_retrain_ci95"][1]
    assert f"| {NEW} | 20 |" in capsys.readouterr().out
    assert main(["candidates", "bench", "--data", str(data), "--names", "nobody", "--backbone", str(tiny_backbone)]) == 2


def test_pick_anchor_is_a_stratified_sample_that_says_each_rows_chance():
    from zooter.training.lifecycle import pick

    anchor = np.r_[np.zeros(40), np.linspace(0.1, 1.0, 60)]   # training rows 0..39: the anchor scored 0 there
    chosen, chance = pick(anchor, 20, pool=120, seed=3, how="anchor", low_share=0.5)   # rows 100..119: dev rows
    assert len(chosen) == len(set(chosen.tolist())) == 20
    low = chosen < 40                       # the low stratum: every row tied at the lowest reward, not just 10
    assert low.sum() == 10 and np.allclose(chance[low], 10 / 40) and np.allclose(chance[~low], 10 / 80)
    assert (chosen[~low] >= 100).any()      # the other stratum holds the dev rows too
    again, _ = pick(anchor, 20, pool=120, seed=3, how="anchor", low_share=0.5)
    assert (again == chosen).all()          # the seed decides, nothing else
    chosen, chance = pick(anchor, 20, pool=120, seed=3, how="anchor", low_share=0.3)
    assert (chosen < 40).sum() == 6 and np.allclose(chance[chosen < 40], 6 / 40)
    chosen, chance = pick(anchor, 500, pool=120, how="anchor")     # a budget over the rows takes them all
    assert sorted(chosen.tolist()) == list(range(120)) and np.allclose(chance, 1.0)
    chosen, chance = pick(anchor, 500, pool=120)
    assert sorted(chosen.tolist()) == list(range(120)) and np.allclose(chance, 1.0)
    chosen, chance = pick(anchor, 30, pool=120, seed=1)
    assert len(set(chosen.tolist())) == 30 and np.allclose(chance, 30 / 120)


def biased_sample(seed=0, n=4000):
    """A fully scored anchor (0 or 1) and a newcomer that gains only where the anchor scored 0, labelled
    on an anchor-low stratified sample: 200 of the anchor's 0 rows, 100 of the others."""
    rng = np.random.default_rng(seed)
    anchor = (rng.random(n) < 0.6).astype(float)
    newcomer = np.where(anchor == 0, (rng.random(n) < 0.5), (rng.random(n) < 0.55)).astype(float)
    truth = newcomer.mean() - anchor.mean()
    zeros, ones = np.flatnonzero(anchor == 0), np.flatnonzero(anchor == 1)
    picked = np.r_[rng.choice(zeros, 200, replace=False), rng.choice(ones, 100, replace=False)]
    chance = np.r_[np.full(200, 200 / len(zeros)), np.full(100, 100 / len(ones))]
    return anchor, newcomer, picked, chance, truth


def test_the_anchor_estimate_weights_rows_by_their_chance_to_be_picked():
    from zooter.training.lifecycle import paired_means

    # picked unevenly by what the other candidates' rewards do not show: 200 of the 1000 rows where the
    # newcomer scores 0.9, 100 of the 3000 where it scores 0.3 (its mean 0.45, the anchor's 0.6)
    rng = np.random.default_rng(0)
    n = 4000
    anchor = (rng.random(n) < 0.6).astype(float)
    newcomer = np.r_[np.full(1000, 0.9), np.full(3000, 0.3)]
    picked = np.r_[rng.choice(1000, 200, replace=False), 1000 + rng.choice(3000, 100, replace=False)]
    rewards = np.column_stack([anchor, np.full(n, np.nan)])
    rewards[picked, 1] = newcomer[picked]
    weights = np.ones(rewards.shape)
    weights[picked, 1] = np.r_[np.full(200, 1000 / 200), np.full(100, 3000 / 100)]
    plain, weighted = paired_means(rewards), paired_means(rewards, weights)
    assert plain[1] > plain[0]                           # unweighted, the newcomer looks the best single
    assert weighted[1] == pytest.approx(newcomer.mean(), abs=0.02) and weighted[1] < weighted[0]
    assert paired_means(rewards, np.ones(rewards.shape)).tolist() == plain.tolist()

    # picked where the anchor failed (the other candidates' rewards show it): the map sees it, weights agree
    anchor, newcomer, picked, chance, truth = biased_sample()
    rewards = np.column_stack([anchor, np.full(len(anchor), np.nan)])
    rewards[picked, 1] = newcomer[picked]
    weights = np.ones(rewards.shape)
    weights[picked, 1] = 1 / chance
    weighted = paired_means(rewards, weights)
    assert weighted[1] - weighted[0] == pytest.approx(truth, abs=0.04) and weighted[1] < weighted[0]


def guard_inputs(n):
    """Distilled probabilities and expected rewards that put the newcomer (column 1) 0.05 above the anchor
    (column 0) on every row: the guard lets it in wherever its margin is below 0.05."""
    return np.tile([0.2, 0.8], (n, 1)), np.tile([0.5, 0.55], (n, 1))


def test_the_guards_margin_imputes_the_added_candidates_gain_by_the_anchors_reward():
    from zooter.training.calibrate import _margin

    anchor, newcomer, picked, _, truth = biased_sample(1)
    rewards = np.column_stack([anchor, np.full(len(anchor), np.nan)])
    rewards[picked, 1] = newcomer[picked]
    probs, expected = guard_inputs(len(anchor))
    # fitted on the labelled rows alone (as before), the sample's bias lets the newcomer in everywhere
    assert _margin(probs[picked], expected[picked], rewards[picked], 0, 1.0) < 0.05
    # on every row, its gain imputed where unlabelled from the labelled rows with the same anchor reward:
    # the newcomer loses on the whole (truth < 0), so the guard keeps the anchor
    assert truth < -0.05 and _margin(probs, expected, rewards, 0, 1.0, partial=(1,)) > 0.05
    # a newcomer that truly gains is let in
    better = rewards.copy()
    better[picked, 1] = 1.0
    assert _margin(probs, expected, better, 0, 1.0, partial=(1,)) < 0.05


def test_the_guards_imputation_weights_rows_by_their_chance_to_be_picked():
    from zooter.training.calibrate import _margin

    # one anchor reward everywhere (one cell), the rows picked unevenly by what the anchor does not show:
    # 200 of the 1000 rows where the newcomer gains 0.4, 100 of the 3000 where it loses 0.2 (truth -0.05)
    rng = np.random.default_rng(2)
    n, gains = 4000, np.r_[np.full(1000, 0.4), np.full(3000, -0.2)]
    picked = np.r_[rng.choice(1000, 200, replace=False), 1000 + rng.choice(3000, 100, replace=False)]
    rewards = np.column_stack([np.full(n, 0.5), np.full(n, np.nan)])
    rewards[picked, 1] = 0.5 + gains[picked]
    weights = np.ones(rewards.shape)
    weights[picked, 1] = np.r_[np.full(200, 1000 / 200), np.full(100, 3000 / 100)]
    probs, expected = guard_inputs(n)
    assert _margin(probs, expected, rewards, 0, 1.0, partial=(1,)) < 0.05                    # unweighted: let in
    assert _margin(probs, expected, rewards, 0, 1.0, partial=(1,), weights=weights) > 0.05   # weighted: keep the anchor
    assert (_margin(probs, expected, rewards, 0, 1.0, partial=(1,), weights=np.ones(rewards.shape))
            == _margin(probs, expected, rewards, 0, 1.0, partial=(1,)))


def test_the_guards_imputation_follows_the_added_candidates_estimated_reward_row_by_row():
    from zooter.training.calibrate import _margin

    # the newcomer (column 2) answers as candidate 1 does, which is known on every row, so its estimated
    # reward there is right (the map from the others' rewards finds it); it gains 0.15 over the anchor, but
    # the 40 rows it was labelled on happen to catch its failures (30 zeros, 10 ones, against 35% zeros)
    rng = np.random.default_rng(4)
    n = 4000
    anchor, twin = (rng.random(n) < 0.5).astype(float), (rng.random(n) < 0.65).astype(float)
    picked = np.r_[rng.choice(np.flatnonzero(twin == 0), 30, replace=False),
                   rng.choice(np.flatnonzero(twin == 1), 10, replace=False)]
    rewards = np.column_stack([anchor, twin, np.full(n, np.nan)])
    rewards[picked, 2] = twin[picked]
    estimates = np.full(rewards.shape, np.nan)
    estimates[:, 2] = twin
    probs, expected = np.tile([0.1, 0.1, 0.8], (n, 1)), np.tile([0.5, 0.5, 0.55], (n, 1))
    assert np.mean(twin - anchor) > 0.1
    # the labelled rows' mean gain alone (no estimate, or none known) keeps the anchor
    assert _margin(probs, expected, rewards, 0, 1.0, partial=(2,)) > 0.05
    assert (_margin(probs, expected, rewards, 0, 1.0, partial=(2,), estimates=np.full(rewards.shape, np.nan))
            == _margin(probs, expected, rewards, 0, 1.0, partial=(2,)))
    # with the estimate, only its error (none here) is sampled: the newcomer is let in
    assert _margin(probs, expected, rewards, 0, 1.0, partial=(2,), estimates=estimates) < 0.05


def test_held_out_estimates_never_judge_an_estimate_on_its_own_rows():
    from zooter.training.lifecycle import estimate_column, held_out_estimates

    rng = np.random.default_rng(5)
    n, dim = 300, 8
    x = rng.normal(size=(n, dim))
    rewards = np.column_stack([(rng.random(n) < 0.5), (rng.random(n) < 0.6), (rng.random(n) < 0.5)]).astype(float)
    rewards[::3, 2] = np.nan
    known = ~np.isnan(rewards[:, 2])
    train_est, dev_est = held_out_estimates(x[:250], rewards[:250], x[250:], rewards[250:], 2)
    completed = estimate_column(x[:250], rewards[:250], 2)
    # unlabelled rows: the estimate fitted on every labelled row; labelled rows: one fitted without them
    np.testing.assert_allclose(train_est[~known[:250]], completed[~known[:250]])
    assert np.all(np.isfinite(train_est)) and np.all(np.isfinite(dev_est))
    assert not np.allclose(train_est[known[:250]], rewards[:250][known[:250], 2])


def test_an_estimated_0_1_reward_gives_the_distilled_targets_of_its_two_outcomes():
    from zooter.training.labels import reward_distribution, training_targets
    from zooter.training.lifecycle import two_point_outcomes

    realised = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, np.nan], [1.0, np.nan]])
    completed = realised.copy()
    completed[2:, 1] = [0.5, 0.7]
    targets, _ = training_targets(completed, [[]] * 4, tau=0.1, beta=1.0,
                                  outcomes=two_point_outcomes(realised, completed, [1]))
    dist = lambda *r: reward_distribution(np.array([r]), 0.1)[0]   # noqa: E731
    np.testing.assert_allclose(targets[:2], reward_distribution(realised[:2], 0.1))   # labelled: as before
    np.testing.assert_allclose(targets[2], 0.5 * dist(0.0, 1.0) + 0.5 * dist(0.0, 0.0))
    np.testing.assert_allclose(targets[3], 0.7 * dist(1.0, 1.0) + 0.3 * dist(1.0, 0.0))
    assert targets[3, 1] > 0.3 > dist(1.0, 0.7)[1]     # softmax of the estimate starved it of target mass
    # rewards that are not two-valued keep the softmax of their estimate
    spread = np.array([[0.2, 0.3], [0.4, 0.6], [0.5, 0.45], [0.5, np.nan]])
    assert two_point_outcomes(spread, np.nan_to_num(spread, nan=0.5), [1]) is None


def test_an_added_anchors_margin_weights_its_labelled_rows_by_their_chance_to_be_picked():
    from zooter.training.calibrate import _margin

    # the added candidate is the anchor (column 1), labelled where the old anchor (column 0) scored 0 more
    # often: the old one's gain over it shows only there, and looks larger than it is
    old, new, picked, chance, _ = biased_sample(3)
    n = len(old)
    rewards = np.column_stack([1 - old, np.full(n, np.nan)])   # column 0 gains where the sample is dense
    rewards[picked, 1] = (1 - new)[picked]
    weights = np.ones(rewards.shape)
    weights[picked, 1] = 1 / chance
    probs, expected = np.tile([0.8, 0.2], (n, 1)), np.tile([0.55, 0.5], (n, 1))
    truth = np.mean((1 - old) - (1 - new))
    plain = _margin(probs, expected, rewards, 1, 1.0, partial=(1,))
    weighted = _margin(probs, expected, rewards, 1, 1.0, partial=(1,), weights=weights)
    assert truth < 0 and plain < 0.05 and weighted > 0.05


def test_pick_writes_the_queries_to_label_and_add_takes_them_back(pool, tmp_path, capsys):
    out = tmp_path / "to-label.jsonl"
    assert main(["candidates", "pick", str(pool["run"]), "--name", NEW, "--budget", "40", "--out", str(out),
                 "--how", "anchor"]) == 0
    assert "picked 40 of" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 40 and all(r["rewards"] == {NEW: None} for r in rows)
    assert all(0 < r["inclusion_probability"] <= 1 for r in rows) and len({r["inclusion_probability"] for r in rows}) == 2
    info = json.loads((pool["run"] / "run.json").read_text())
    anchor = info["best_single"]["candidate"]
    train_rows = RoutingDataset.load(pool["root"] / "train.jsonl")
    by_query = {r.query: r for r in train_rows.rows}
    picked_train = [by_query[r["query"]] for r in rows if r["query"] in by_query]
    # the anchor's reward on what was picked is below its mean: half of it is where the anchor did worst
    assert np.mean([r.rewards[anchor] for r in picked_train]) < np.mean([r.rewards[anchor] for r in train_rows.rows])

    truth = {r.query: r.rewards[NEW] for r in synthetic(150, 0).rows + synthetic(45, 1).rows}
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({**r, "rewards": {NEW: truth[r["query"]]}}) + "\n" for r in rows))
    assert main(["candidates", "add", str(pool["run"]), "--name", NEW, "--data", str(labelled),
                 "--out", str(tmp_path / "run2")]) == 0
    assert json.loads((tmp_path / "run2" / "run.json").read_text())["lifecycle"]["entered"][NEW]["rows"] == 40
    # add weighs each labelled row by 1 / its recorded chance (scaled to mean 1), and keeps doing so on replay
    from zooter.training.lifecycle import run_rows

    info2 = json.loads((tmp_path / "run2" / "run.json").read_text())
    rows2 = run_rows(tmp_path / "run2", info2)
    chance = {r["query"]: r["inclusion_probability"] for r in rows}
    for part, w in zip((rows2.train, rows2.dev), rows2.weights[NEW]):
        for row, weight in zip(part.rows, w):
            if row.rewards[NEW] is None:
                assert weight == 1.0
            else:
                assert weight == pytest.approx((1 / chance[row.query]) / np.mean([1 / p for p in chance.values()]))

    # the chance on some rows only, or not a chance: refused, one line naming the file and line
    for bad, what in (([{**rows[0], "inclusion_probability": None}] + rows[1:], "no inclusion_probability"),
                      ([{**rows[0], "inclusion_probability": 1.5}] + rows[1:], "expected a number in (0, 1]")):
        path = tmp_path / "bad.jsonl"
        path.write_text("".join(json.dumps({**r, "rewards": {NEW: truth[r["query"]]}}) + "\n" for r in bad))
        capsys.readouterr()
        assert main(["candidates", "add", str(pool["run"]), "--name", NEW, "--data", str(path),
                     "--out", str(tmp_path / "run3")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{path}:1: " in err and what in err, err
        assert not (tmp_path / "run3").exists()

    capsys.readouterr()
    assert main(["candidates", "pick", str(pool["run"]), "--name", "mathy", "--budget", "40", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--name mathy: already a candidate" in err, err
