"""Routing metrics: the router against every single candidate, the oracle and random choice.

Everything here is numpy over a (rows x candidates) reward matrix in the router's label order, the
router's two outputs in the same order (distilled probabilities, raw expected-reward scores), and
optional per-choice costs. Decisions go through zooter.runtime.decision.Rule, the rule the runtime
and Triton apply, with the settings the run or bundle ships.

Conventions:
- A null (NaN) reward means "not scored". The router, the oracle and the sweeps choose among the
  row's scored candidates only (nothing else can be scored); a single candidate's mean is over the
  rows where it was scored.
- best_single is the candidate that was best on the run's TRAINING data; it is passed in, never
  picked on the evaluation rows.
- `router` is the shipped rule (guard on); `unguarded` is the paper's rule, argmax of the distilled
  probabilities, on the same rows.
- The oracle takes the best reward of each row; among tied best it takes the cheapest, so its cost
  is the least an oracle has to pay.
- random is the exact expectation of a uniform choice among the scored candidates (no sampling).
- Seen data: `warnings` names what makes the figures not held-out (the data is the run's training
  or dev rows, or more than 5% of its queries are among them; see seen_data).
- router_vs_best_single: the mean paired difference with a 95% interval from 2000 bootstrap
  resamples of the rows; calibration: the chosen candidate's expected reward against its realised
  reward in 10 equal-count bins (ECE = the count-weighted mean gap).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from zooter.runtime.decision import Rule, unit_prices

# Tolerance sweep for the cost knob, in reward units.
TOLERANCES = (0.0, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
BOOTSTRAP_RESAMPLES = 2000
CALIBRATION_BINS = 10


def rule_for(labels: Sequence[str], decision: dict, prices: np.ndarray | None = None, lam: float = 0.0,
             tolerance: float = 0.0) -> Rule:
    """The shipped rule with these settings; `prices`: its unit price per candidate (runtime.decision.unit_price)."""
    return Rule.of(labels, decision, prices, lam, tolerance)


def paired_bootstrap(diff: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """Mean of paired differences and its 95% percentile-bootstrap interval (rows resampled)."""
    diff = np.asarray(diff, dtype=np.float64)
    diff = diff[~np.isnan(diff)]
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    return {"mean": float(diff.mean()), "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
            "n": int(len(diff)), "resamples": resamples}


def calibration(predicted: np.ndarray, realised: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Reliability of predicted values (expected rewards, or probabilities of being right): rows sorted by
    prediction into `bins` equal-count bins; ECE is the count-weighted mean |predicted - realised|."""
    predicted, realised = np.asarray(predicted, dtype=np.float64), np.asarray(realised, dtype=np.float64)
    keep = ~np.isnan(realised)
    predicted, realised = predicted[keep], realised[keep]
    order = np.argsort(predicted, kind="stable")
    out, ece = [], 0.0
    for part in np.array_split(order, min(bins, len(order))):
        if not len(part):
            continue
        p, r = float(predicted[part].mean()), float(realised[part].mean())
        out.append({"n": int(len(part)), "low": float(predicted[part].min()), "high": float(predicted[part].max()),
                    "predicted": p, "realised": r})
        ece += len(part) / len(order) * abs(p - r)
    return {"ece": float(ece), "bins": out}


def picked(matrix: np.ndarray, choice: np.ndarray) -> np.ndarray:
    return np.asarray(matrix)[np.arange(len(choice)), choice]


def oracle_choice(rewards: np.ndarray, costs: np.ndarray | None = None) -> np.ndarray:
    r = np.where(np.isnan(rewards), -np.inf, rewards)
    best = r == r.max(axis=1, keepdims=True)
    if costs is None:
        return np.argmax(best, axis=1)
    c = np.broadcast_to(np.asarray(costs, dtype=np.float64), r.shape)
    return np.argmin(np.where(best, c, np.inf), axis=1)


def mean_task_rank(rewards: np.ndarray, router_rewards: np.ndarray, labels: Sequence[str],
                   tags: Sequence[Sequence[str]]) -> dict[str, float]:
    """The paper's MTR: in each task (tag), rank the router and every single candidate by mean
    reward (1 = best, ties share the average rank), then average each method's rank over tasks.
    Rows without tags form one task "all"."""
    groups: dict[str, list[int]] = {}
    for i, row_tags in enumerate(tags):
        for tag in (dict.fromkeys(row_tags) or ["all"]):
            groups.setdefault(tag, []).append(i)
    names = ["router", *labels]
    ranks = []
    for idx in groups.values():
        # A candidate scored on no row of the task ranks last (NaN -> -inf below), without numpy's
        # "Mean of empty slice" RuntimeWarning on the user's terminal.
        scored = (~np.isnan(rewards[idx])).sum(axis=0)
        means = np.where(scored > 0, np.nansum(rewards[idx], axis=0) / np.maximum(scored, 1), np.nan)
        scores = np.concatenate([[np.nanmean(router_rewards[idx])], means])
        scores = np.where(np.isnan(scores), -np.inf, scores)
        ranks.append(_average_ranks(-scores))
    mean = np.mean(ranks, axis=0)
    return {name: float(v) for name, v in zip(names, mean)}


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ascending values, ties sharing their average rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _mean_or_none(values: np.ndarray | None) -> float | None:
    if values is None:
        return None
    return float(np.nanmean(values))


def evaluate(rewards: np.ndarray, probs: np.ndarray, scores: np.ndarray, labels: Sequence[str], best_single: str,
             decision: dict, *, tags: Sequence[Sequence[str]] | None = None, costs: np.ndarray | None = None,
             prices: np.ndarray | None = None, lam: float = 0.0, tolerance: float = 0.0,
             tolerances: Sequence[float] = TOLERANCES, guard: bool = True, keep_rows: bool = False) -> dict:
    """The evaluation report (see docs/training.md for every key).

    rewards, probs, scores: (n, m) in `labels` order. decision: the run's or bundle's decision settings.
    costs: None, (m,) unit prices, or (n, m) per-answer costs: what the report's mean_cost figures add up.
    prices: (m,) the rule's unit prices, what the router decides with (runtime.decision.unit_price, as the
    shipped router); default `costs` when they are unit prices. guard=False evaluates the paper's rule
    as `router`. keep_rows adds `rows` (per row: the router's and the best single's
    rewards, the choice's expected reward and confidence, whether it was a best answer).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    n, m = rewards.shape
    if probs.shape != (n, m) or np.shape(scores) != (n, m) or len(labels) != m:
        raise ValueError(f"rewards {rewards.shape}, probs {probs.shape}, scores {np.shape(scores)} and {len(labels)} labels disagree")
    if best_single not in labels:
        raise ValueError(f"best single candidate {best_single!r} is not one of the labels")
    tags = [list(t) for t in tags] if tags is not None else [[] for _ in range(n)]
    scored = ~np.isnan(rewards)
    cost_matrix = None if costs is None else np.broadcast_to(np.asarray(costs, dtype=np.float64), (n, m))
    if prices is None and costs is not None:
        if np.ndim(costs) != 1:
            raise ValueError("per-answer costs need `prices`, the rule's unit price per candidate")
        prices = costs
    rule = rule_for(labels, decision, prices, lam, tolerance if prices is not None else 0.0)

    def cost_of(choice):
        return None if cost_matrix is None else picked(cost_matrix, choice)

    made = rule.decide(probs, scores, allowed=scored, guard=guard)
    choice = made.choice
    unguarded = rule.decide(probs, scores, lam=0.0, tolerance=0.0, allowed=scored, guard=False).choice
    router_r = picked(rewards, choice)
    oracle = oracle_choice(rewards, cost_matrix)
    oracle_r = picked(rewards, oracle)
    b = list(labels).index(best_single)
    best_r = rewards[:, b]

    per_candidate = {
        name: {"mean_reward": float(np.nanmean(rewards[:, j])) if scored[:, j].any() else None,
               "mean_cost": _mean_or_none(None if cost_matrix is None else cost_matrix[scored[:, j], j])}
        for j, name in enumerate(labels)}
    router_mean, best_mean, oracle_mean = float(np.mean(router_r)), float(np.nanmean(best_r)), float(np.mean(oracle_r))
    gap = oracle_mean - best_mean
    both = ~np.isnan(best_r)
    diff = router_r[both] - best_r[both]
    unguarded_r = picked(rewards, unguarded)
    chosen_expected = made.expected[np.arange(n), choice]
    tied_best = (router_r >= np.nanmax(rewards, axis=1) - 1e-12).astype(float)

    report = {
        "n": int(n),
        "lambda": float(rule.lam),
        "tolerance": float(rule.tolerance),
        "router": {"mean_reward": router_mean, "mean_cost": _mean_or_none(cost_of(choice)),
                   "kept_best_single": float(np.mean(choice == b)), "guard_margin": rule.margin},
        "unguarded": {"mean_reward": float(np.mean(unguarded_r)), "mean_cost": _mean_or_none(cost_of(unguarded)),
                      "rule": "argmax of the distilled probabilities (no guard, no cost knob)",
                      "vs_best_single": paired_bootstrap(unguarded_r[both] - best_r[both])},
        "baselines": {
            "best_single": {"candidate": best_single, **per_candidate[best_single]},
            "oracle": {"mean_reward": oracle_mean, "mean_cost": _mean_or_none(cost_of(oracle))},
            "random": {"mean_reward": float(np.mean(np.nanmean(rewards, axis=1)))},
            "per_candidate": per_candidate,
        },
        "router_vs_best_single": paired_bootstrap(diff),
        "gap_closed": float((router_mean - best_mean) / gap) if gap > 0 else None,
        "win_tie_loss_vs_best_single": [int((diff > 0).sum()), int((diff == 0).sum()), int((diff < 0).sum())],
        "calibration": calibration(chosen_expected, router_r),
        "confidence_calibration": calibration(made.confidence, tied_best),
        "mtr": mean_task_rank(rewards, router_r, labels, tags),
        "pareto": [],
        "routing_accuracy": float(np.mean(tied_best)),
        "chosen_share": {name: float(np.mean(choice == j)) for j, name in enumerate(labels)},
        "per_tag": per_tag(rewards, router_r, oracle_r, b, tags),
    }
    if cost_matrix is not None:
        for x in tolerances:
            c = rule.decide(probs, scores, tolerance=x, allowed=scored, guard=guard).choice
            report["pareto"].append({"tolerance": float(x), "mean_reward": float(np.mean(picked(rewards, c))),
                                     "mean_cost": float(np.mean(picked(cost_matrix, c)))})
        report["cost_at_best_single_quality"] = cheapest_at_quality(report["pareto"], best_mean,
                                                                    per_candidate[best_single]["mean_cost"])
    if keep_rows:
        report["rows"] = {"router": router_r.tolist(), "best_single": best_r.tolist(),
                          "expected": chosen_expected.tolist(), "confidence": made.confidence.tolist(),
                          "tied_best": tied_best.tolist()}
    return report


def cheapest_at_quality(pareto: list[dict], quality: float, reference_cost: float | None) -> dict | None:
    """The cheapest sweep point whose mean reward reaches `quality`, with its cost as a share of the reference."""
    ok = [p for p in pareto if p["mean_reward"] >= quality]
    if not ok:
        return None
    best = min(ok, key=lambda p: p["mean_cost"])
    ratio = best["mean_cost"] / reference_cost if reference_cost else None
    return {**best, "cost_ratio_vs_best_single": ratio}


def per_tag(rewards: np.ndarray, router_r: np.ndarray, oracle_r: np.ndarray, best: int,
            tags: Sequence[Sequence[str]]) -> dict[str, dict]:
    groups: dict[str, list[int]] = {}
    for i, row_tags in enumerate(tags):
        for tag in dict.fromkeys(row_tags):
            groups.setdefault(tag, []).append(i)
    return {tag: {"n": len(idx), "router": float(np.mean(router_r[idx])),
                  "best_single": float(np.nanmean(rewards[idx, best])) if (~np.isnan(rewards[idx, best])).any() else None,
                  "oracle": float(np.mean(oracle_r[idx]))}
            for tag, idx in sorted(groups.items())}


def entropy_vs_correctness(label_entropy: np.ndarray, correct: np.ndarray, bins: int = 5) -> list[dict]:
    """The paper's Figure 3: routing accuracy per quantile bin of the reward distribution's entropy."""
    label_entropy = np.asarray(label_entropy, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    edges = np.unique(np.quantile(label_entropy, np.linspace(0, 1, bins + 1)))
    out = []
    for k in range(len(edges) - 1):
        lo, hi = edges[k], edges[k + 1]
        sel = (label_entropy >= lo) & ((label_entropy < hi) if k < len(edges) - 2 else (label_entropy <= hi))
        if sel.any():
            out.append({"entropy_low": float(lo), "entropy_high": float(hi), "n": int(sel.sum()),
                        "accuracy": float(correct[sel].mean())})
    return out


def confusion(rewards: np.ndarray, choice: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """(best, chosen) counts over the rows where the choice matters; a row with several tied best
    candidates counts for each of them, split evenly. Rows where every scored candidate ties (all
    right or all wrong: common with 0/1 metrics) are left out: any choice is as good there."""
    m = len(labels)
    out = np.zeros((m, m))
    r = np.where(np.isnan(rewards), -np.inf, rewards)
    best = r == r.max(axis=1, keepdims=True)
    scored = ~np.isnan(rewards)
    for i, c in enumerate(choice):
        if best[i][scored[i]].all():
            continue
        out[best[i], c] += 1.0 / best[i].sum()
    return out


def format_table(report: dict) -> str:
    """The printed summary: one line per method, best first, with cost when known; then the interval,
    the guard, calibration and the cost knob."""
    base = report["baselines"]
    rows = [("router", report["router"]["mean_reward"], report["router"]["mean_cost"], report["mtr"].get("router")),
            ("router, unguarded", report["unguarded"]["mean_reward"], report["unguarded"]["mean_cost"], None)]
    rows.append(("oracle", base["oracle"]["mean_reward"], base["oracle"]["mean_cost"], None))
    rows.append(("random", base["random"]["mean_reward"], None, None))
    for name, v in base["per_candidate"].items():
        mark = " *" if name == base["best_single"]["candidate"] else ""
        rows.append((name + mark, v["mean_reward"], v["mean_cost"], report["mtr"].get(name)))
    width = max(len(r[0]) for r in rows)
    shown = [(name, reward_text(reward), _fmt(cost, 4), _fmt(mtr, 2))
             for name, reward, cost, mtr in sorted(rows, key=lambda r: -(r[1] if r[1] is not None else -1))]
    rw = max(6, *(len(r[1]) for r in shown))
    lines = [f"{'method':<{width}}  {'reward':>{rw}}  {'cost':>9}  {'MTR':>5}"]
    lines += [f"{name:<{width}}  {reward:>{rw}}  {cost:>9}  {mtr:>5}" for name, reward, cost, mtr in shown]
    d, u = report["router_vs_best_single"], report["unguarded"]["vs_best_single"]
    r = lambda value: reward_text(value, signed=True)
    lines.append(f"n={report['n']}  router - best single = {r(d['mean'])} [95% CI {r(d['ci95'][0])}, {r(d['ci95'][1])}]"
                 f"  (unguarded {r(u['mean'])} [{r(u['ci95'][0])}, {r(u['ci95'][1])}])  "
                 f"gap closed={_fmt(report['gap_closed'], 3)}  win/tie/loss={'/'.join(map(str, report['win_tie_loss_vs_best_single']))}"
                 f"  (* = best single on training data)")
    lines.append(f"guard: kept the best single on {report['router']['kept_best_single']:.0%} of rows (margin "
                 f"{r(report['router']['guard_margin'])});  calibration: ECE {reward_text(report['calibration']['ece'])} "
                 f"(expected vs realised reward of the choice), confidence ECE {report['confidence_calibration']['ece']:.4f}")
    at = report.get("cost_at_best_single_quality")
    if at and at.get("cost_ratio_vs_best_single") is not None:
        lines.append(f"cost knob: tolerance {at['tolerance']:g} reaches reward {reward_text(at['mean_reward'])} "
                     f"at {100 * at['cost_ratio_vs_best_single']:.0f}% of the best single's cost")
    elif report["pareto"]:
        lines.append("cost knob: no tolerance reaches the best single's reward")
    return "\n".join(lines)


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def reward_text(value, signed: bool = False) -> str:
    """A figure in reward units, printed with 4 significant digits whatever the rewards' scale
    (0.6192, 41.50, 1234, 1.235e+05): fixed decimals would print a 1e5-scale reward as 10 digits."""
    return "-" if value is None else f"{value:{'+' if signed else ''}#.4g}".rstrip(".")


# --- running a saved router over a data file ------------------------------------------------------
def open_router(path, cache=None):
    """The router saved at `path`: an exported bundle (zooter.runtime.Router, no torch) or a training
    run (TorchRouter). Both answer `labels` and `probabilities(texts)` alike."""
    from pathlib import Path

    from zooter.runtime.errors import UserError

    path = Path(path)
    if (path / "router.json").is_file():
        from zooter.runtime.router import Router

        return Router.load(path)
    if (path / "run.json").is_file():
        from zooter.training.model import TorchRouter

        return TorchRouter.load(path, cache=cache)
    raise UserError(f"{path}: neither a run (run.json) nor a bundle (router.json)")


def provenance(path) -> dict:
    """The training facts a run (run.json) or a bundle (router.json's provenance) records."""
    from pathlib import Path

    path = Path(path)
    if (path / "run.json").is_file():
        from zooter.training.model import read_run_info

        return read_run_info(path)
    if (path / "router.json").is_file():
        from zooter.runtime.bundle import Manifest

        return Manifest.read(path, verify=False).provenance or {}   # open_router verifies the files
    return {}


def approx_tokens(text: str) -> int:
    """About 4 characters a token for English text: enough to price answers without a model's tokenizer."""
    return max(1, -(-len(text) // 4))


def cost_matrix(data, labels: Sequence[str], prices: dict | None) -> tuple[np.ndarray | None, str | None]:
    """Cost of choosing each candidate on each row, and its unit.

    With responses for every (row, label): price x tokens (query in, response out), USD per query.
    Otherwise: the price per million tokens as a unit cost per choice.
    """
    if prices is None:
        return None, None
    rows = data.rows
    if all(r.responses and all(name in r.responses for name in labels) for r in rows):
        return np.array([[prices[name].of(approx_tokens(r.query), approx_tokens(r.responses[name])) for name in labels]
                         for r in rows]), "usd_per_query"
    return unit_prices(prices, labels), "usd_per_mtok"


def aligned_rewards(data, labels: Sequence[str]) -> np.ndarray:
    """The data's reward matrix in the router's label order (NaN for a label the data never scored)."""
    r = data.rewards()
    col = {name: j for j, name in enumerate(data.candidates)}
    out = np.full((len(data), len(labels)), np.nan)
    for k, name in enumerate(labels):
        if name in col:
            out[:, k] = r[:, col[name]]
    return out


SEEN_SHARE_LIMIT = 0.05   # more of the data's queries than this seen in training or dev: the figures are not held-out


def seen_data(facts: dict, data) -> tuple[list[str], dict]:
    """(warnings, overlap): whether `data` is, or shares queries with, the data the run trained on
    (its training rows, and its dev rows, which chose the epoch and fitted the decision layer).

    The query sets come from run.json's `query_digests`; a run trained before they were recorded
    is checked against the training and dev files it names when they still hash as they did then,
    else only the whole-file hashes are compared and `overlap` says why the queries were not."""
    from zooter.training.splits import seen_in

    warnings = []
    digest = data.sha256()
    for key, what in (("data_sha256", "training rows"), ("dev_sha256", "dev rows")):
        if facts.get(key) == digest:
            warnings.append(f"{data.path} is the run's {what} (same data hash): these figures are not held-out")
    sets, source = facts.get("query_digests"), "run.json query_digests"
    if sets is None:
        sets, source = _digests_from_files(facts)
    if sets is None:
        return warnings, {"checked": False, "why": source}
    train, dev = seen_in(data.queries, sets["train"]), seen_in(data.queries, sets["dev"])
    seen = [a or b for a, b in zip(train, dev)]
    n = max(len(seen), 1)
    overlap = {"checked": True, "from": source, "n": len(seen), "training_queries": int(sum(train)),
               "dev_queries": int(sum(dev)), "seen_share": sum(seen) / n, "limit": SEEN_SHARE_LIMIT}
    if overlap["seen_share"] > SEEN_SHARE_LIMIT and not warnings:
        warnings.append(f"{data.path}: {sum(seen)} of {len(seen)} queries ({overlap['seen_share']:.1%}) were seen by the run "
                        f"({overlap['training_queries']} in training, {overlap['dev_queries']} in dev), more than "
                        f"{SEEN_SHARE_LIMIT:.0%}: these figures are not held-out (`zooter data dedupe` removes them)")
    return warnings, overlap


def _digests_from_files(facts: dict) -> tuple[dict | None, str]:
    """An older run's query sets, rebuilt from the files its run.json names; (None, why) when it cannot."""
    from pathlib import Path

    from zooter.runtime.errors import UserError
    from zooter.training.dataset import RoutingDataset
    from zooter.training.splits import query_digests
    from zooter.training.train import split_dev

    path, dev = facts.get("data"), (facts.get("config") or {}).get("dev")
    why = "the run records no query_digests (trained before they were) and "
    if not isinstance(path, str) or not Path(path).is_file() or (dev and not Path(dev).is_file()):
        return None, why + "its training files are gone: only whole-file hashes were compared"
    try:
        train, held = split_dev(RoutingDataset.load(path), dev)
    except UserError as err:
        return None, why + f"its training files cannot be read ({err})"
    if train.sha256() != facts.get("data_sha256") or held.sha256() != facts.get("dev_sha256"):
        return None, why + "its training files changed since: only whole-file hashes were compared"
    return {"train": query_digests(train.queries), "dev": query_digests(held.queries)}, f"{path} (re-read: older run)"


def evaluate_router(path, data_path, *, candidates: str | None = None, lam: float = 0.0, tolerance: float = 0.0,
                    best_single: str | None = None, plots: str | None = None, router=None, guard: bool = True,
                    keep_rows: bool = False) -> dict:
    """`zooter eval`: route every row of data_path with a run or bundle, score it, optionally plot it.

    `router`: an already open router for the run or bundle at `path` (anything with `labels`,
    `decision` and `outputs_of(texts)`)."""
    from pathlib import Path

    from zooter.runtime.errors import UserError
    from zooter.serving.candidates import costs_for, load_candidates
    from zooter.training.dataset import RoutingDataset
    from zooter.training.labels import entropy, reward_distribution

    facts = provenance(path)
    data = RoutingDataset.load(data_path)
    router = router or open_router(path)
    decision = router.decision
    if not isinstance(decision, dict):
        raise UserError(f"{path}: no decision layer (trained by an older zooter); train and export it again")
    labels = list(router.labels)
    warnings, overlap = seen_data(facts, data)
    probs, scores = router.outputs_of(data.queries)
    rewards = aligned_rewards(data, labels)
    keep = ~np.isnan(rewards).all(axis=1)
    if not keep.any():
        raise UserError(f"{data_path}: no row scores any of the router's candidates {labels}")
    if not keep.all():
        data, rewards, probs, scores = data.subset(np.flatnonzero(keep)), rewards[keep], probs[keep], scores[keep]

    best = best_single or (facts.get("best_single") or {}).get("candidate")
    if best is None:
        raise UserError(f"{path} does not record its training data's best single candidate; pass --best-single NAME")
    if best not in labels:
        raise UserError(f"best single candidate {best!r} is not one of the router's labels {labels}")

    cands_file = candidates or facts.get("candidates_file")
    prices = None
    if cands_file:
        if not Path(cands_file).is_file():
            raise UserError(f"{cands_file}: no such candidates file")
        prices = costs_for(load_candidates(cands_file), labels)
    costs, cost_unit = cost_matrix(data, labels, prices)
    if (lam or tolerance) and costs is None:
        raise UserError(f"--{'lambda' if lam else 'tolerance'} needs prices: pass --candidates with costs")
    # Decisions use the shipped rule's unit prices whether or not the rows have responses; realised
    # per-answer costs are only reported (docs/training.md).
    units = unit_prices(prices, labels)

    report = evaluate(rewards, probs, scores, labels, best, decision, tags=[r.tags for r in data.rows], costs=costs,
                      prices=units, lam=lam, tolerance=tolerance, guard=guard, keep_rows=keep_rows)
    report["cost_unit"] = cost_unit
    report["unit_prices"] = None if units is None else dict(zip(labels, units.tolist()))
    report["candidates_file"] = str(cands_file) if cands_file else None
    report["router_path"] = str(path)
    report["data"] = str(data_path)
    report["data_sha256"] = data.sha256()
    report["dropped_rows_without_scores"] = int((~keep).sum())
    report["ignored_candidates"] = [c for c in data.candidates if c not in labels]
    report["warnings"], report["seen_in_training"] = warnings, overlap

    # The paper's Figure 3: is routing easier when the reward distribution is peaked?
    choice = rule_for(labels, decision, units, lam, tolerance).decide(probs, scores, allowed=~np.isnan(rewards),
                                                                      guard=guard).choice
    correct = picked(rewards, choice) >= np.nanmax(rewards, axis=1)
    report["entropy_vs_accuracy"] = entropy_vs_correctness(entropy(reward_distribution(rewards, float(facts.get("tau", 1.0)))), correct)
    if plots:
        from zooter.training import plots as plotting

        report["plots"] = plotting.write_all(report, confusion(rewards, choice, labels), labels, plots,
                                             history=facts.get("curves"))
    return report
