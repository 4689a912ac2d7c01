"""Routing metrics: the router against every single candidate, the oracle and random choice.

Everything here is numpy over a (rows x candidates) reward matrix in the router's label order, the
router's probabilities in the same order, and optional per-choice costs. Decisions go through
zooter.runtime.decision, the same rule the runtime and Triton use.

Conventions:
- A null (NaN) reward means "not scored". The router, the oracle and the lambda sweep choose among
  the row's scored candidates only (nothing else can be scored); a single candidate's mean is over
  the rows where it was scored.
- best_single is the candidate that was best on the run's TRAINING data; it is passed in, never
  picked on the evaluation rows.
- The oracle takes the best reward of each row; among tied best it takes the cheapest, so its cost
  is the least an oracle has to pay.
- random is the exact expectation of a uniform choice among the scored candidates (no sampling).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from zooter.runtime.decision import choose

# Dense at small values: with tau = 1 on rewards in [0, 1] the router's probabilities differ by
# hundredths, so the interesting trade-offs happen at lambda of a few thousandths.
LAMBDAS = (0.0, 0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.02, 0.03,
           0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def masked_choice(probs: np.ndarray, scored: np.ndarray, costs: np.ndarray | None = None, lam: float = 0.0) -> np.ndarray:
    """The decision rule restricted to each row's scored candidates.

    Unscored candidates get probability -inf before the rule, so the rule itself is untouched.
    """
    p = np.where(scored, probs, -np.inf)
    unit = None if costs is None else _unit_costs(costs)
    return choose(p, unit, lam)


def _unit_costs(costs: np.ndarray) -> np.ndarray:
    # choose() takes one cost per candidate; per-row costs (from responses) are averaged per candidate
    # for the decision, since the router cannot know an answer's length before it is generated.
    c = np.asarray(costs, dtype=np.float64)
    return np.nanmean(c, axis=0) if c.ndim == 2 else c


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
        scores = np.concatenate([[np.nanmean(router_rewards[idx])], np.nanmean(rewards[idx], axis=0)])
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


def evaluate(rewards: np.ndarray, probs: np.ndarray, labels: Sequence[str], best_single: str, *,
             tags: Sequence[Sequence[str]] | None = None, costs: np.ndarray | None = None,
             lam: float = 0.0, lambdas: Sequence[float] = LAMBDAS) -> dict:
    """The evaluation report (see docs/training.md for every key).

    rewards, probs: (n, m) in `labels` order. costs: None, (m,) unit prices, or (n, m) per-answer costs.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    n, m = rewards.shape
    if probs.shape != (n, m) or len(labels) != m:
        raise ValueError(f"rewards {rewards.shape}, probs {probs.shape} and {len(labels)} labels disagree")
    if best_single not in labels:
        raise ValueError(f"best single candidate {best_single!r} is not one of the labels")
    tags = [list(t) for t in tags] if tags is not None else [[] for _ in range(n)]
    scored = ~np.isnan(rewards)
    cost_matrix = None if costs is None else np.broadcast_to(np.asarray(costs, dtype=np.float64), (n, m))

    def cost_of(choice):
        return None if cost_matrix is None else picked(cost_matrix, choice)

    choice = masked_choice(probs, scored, cost_matrix, lam)
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

    report = {
        "n": int(n),
        "lambda": float(lam),
        "router": {"mean_reward": router_mean, "mean_cost": _mean_or_none(cost_of(choice))},
        "baselines": {
            "best_single": {"candidate": best_single, **per_candidate[best_single]},
            "oracle": {"mean_reward": oracle_mean, "mean_cost": _mean_or_none(cost_of(oracle))},
            "random": {"mean_reward": float(np.mean(np.nanmean(rewards, axis=1)))},
            "per_candidate": per_candidate,
        },
        "gap_closed": float((router_mean - best_mean) / gap) if gap > 0 else None,
        "win_tie_loss_vs_best_single": [int((diff > 0).sum()), int((diff == 0).sum()), int((diff < 0).sum())],
        "mtr": mean_task_rank(rewards, router_r, labels, tags),
        "pareto": [],
        "routing_accuracy": float(np.mean(router_r >= np.nanmax(rewards, axis=1))),
        "chosen_share": {name: float(np.mean(choice == j)) for j, name in enumerate(labels)},
        "per_tag": per_tag(rewards, router_r, oracle_r, b, tags),
    }
    if cost_matrix is not None:
        for lam_i in lambdas:
            c = masked_choice(probs, scored, cost_matrix, lam_i)
            report["pareto"].append({"lambda": float(lam_i), "mean_reward": float(np.mean(picked(rewards, c))),
                                     "mean_cost": float(np.mean(picked(cost_matrix, c)))})
        report["cost_at_best_single_quality"] = cheapest_at_quality(report["pareto"], best_mean, per_candidate[best_single]["mean_cost"])
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
    """The printed summary: one line per method, best first, with cost when known."""
    base = report["baselines"]
    rows = [("router", report["router"]["mean_reward"], report["router"]["mean_cost"], report["mtr"].get("router"))]
    rows.append(("oracle", base["oracle"]["mean_reward"], base["oracle"]["mean_cost"], None))
    rows.append(("random", base["random"]["mean_reward"], None, None))
    for name, v in base["per_candidate"].items():
        mark = " *" if name == base["best_single"]["candidate"] else ""
        rows.append((name + mark, v["mean_reward"], v["mean_cost"], report["mtr"].get(name)))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'method':<{width}}  {'reward':>7}  {'cost':>9}  {'MTR':>5}"]
    for name, reward, cost, mtr in sorted(rows, key=lambda r: -(r[1] if r[1] is not None else -1)):
        lines.append(f"{name:<{width}}  {_fmt(reward, 4):>7}  {_fmt(cost, 4):>9}  {_fmt(mtr, 2):>5}")
    lines.append(f"n={report['n']}  lambda={report['lambda']:g}  gap closed={_fmt(report['gap_closed'], 3)}  "
                 f"router - best single={report['router']['mean_reward'] - base['best_single']['mean_reward']:+.4f}  "
                 f"win/tie/loss vs best single={'/'.join(map(str, report['win_tie_loss_vs_best_single']))}  "
                 f"(* = best single on training data)")
    at = report.get("cost_at_best_single_quality")
    if at and at.get("cost_ratio_vs_best_single") is not None:
        lines.append(f"cost-aware: lambda={at['lambda']:g} reaches reward {at['mean_reward']:.4f} "
                     f"at {100 * at['cost_ratio_vs_best_single']:.0f}% of the best single's cost")
    elif report["pareto"]:
        lines.append("cost-aware: no lambda reaches the best single's reward")
    return "\n".join(lines)


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


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
    import json
    from pathlib import Path

    path = Path(path)
    if (path / "run.json").is_file():
        return json.loads((path / "run.json").read_text())
    if (path / "router.json").is_file():
        return json.loads((path / "router.json").read_text()).get("provenance", {})
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
    return np.array([prices[name].unit for name in labels]), "usd_per_mtok"


def aligned_rewards(data, labels: Sequence[str]) -> np.ndarray:
    """The data's reward matrix in the router's label order (NaN for a label the data never scored)."""
    r = data.rewards()
    col = {name: j for j, name in enumerate(data.candidates)}
    out = np.full((len(data), len(labels)), np.nan)
    for k, name in enumerate(labels):
        if name in col:
            out[:, k] = r[:, col[name]]
    return out


def evaluate_router(path, data_path, *, candidates: str | None = None, lam: float = 0.0,
                    best_single: str | None = None, plots: str | None = None, router=None) -> dict:
    """`zooter eval`: route every row of data_path with a run or bundle, score it, optionally plot it.

    `router`: an already open router (anything with `labels` and `probabilities(texts)`) for the
    run or bundle at `path`."""
    from pathlib import Path

    from zooter.runtime.errors import UserError
    from zooter.serving.candidates import costs_for, load_candidates
    from zooter.training.dataset import RoutingDataset
    from zooter.training.labels import entropy, reward_distribution

    facts = provenance(path)
    data = RoutingDataset.load(data_path)
    router = router or open_router(path)
    labels, probs = list(router.labels), router.probabilities(data.queries)
    rewards = aligned_rewards(data, labels)
    keep = ~np.isnan(rewards).all(axis=1)
    if not keep.any():
        raise UserError(f"{data_path}: no row scores any of the router's candidates {labels}")
    if not keep.all():
        data, rewards, probs = data.subset(np.flatnonzero(keep)), rewards[keep], probs[keep]

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

    report = evaluate(rewards, probs, labels, best, tags=[r.tags for r in data.rows], costs=costs, lam=lam)
    report["cost_unit"] = cost_unit
    report["candidates_file"] = str(cands_file) if cands_file else None
    report["router_path"] = str(path)
    report["data"] = str(data_path)
    report["data_sha256"] = data.sha256()
    report["dropped_rows_without_scores"] = int((~keep).sum())
    report["ignored_candidates"] = [c for c in data.candidates if c not in labels]

    # The paper's Figure 3: is routing easier when the reward distribution is peaked?
    choice = masked_choice(probs, ~np.isnan(rewards), costs, lam)
    correct = picked(rewards, choice) >= np.nanmax(rewards, axis=1)
    report["entropy_vs_accuracy"] = entropy_vs_correctness(entropy(reward_distribution(rewards, float(facts.get("tau", 1.0)))), correct)
    if plots:
        from zooter.training import plots as plotting

        report["plots"] = plotting.write_all(report, confusion(rewards, choice, labels), labels, plots,
                                             history=facts.get("curves"))
    return report
