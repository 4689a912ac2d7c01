"""The paper's reward-model ranking (RMR) baseline: run every candidate, keep the answer a reward model ranks best.

RMR needs a second reward model: the one that ranks at inference time must not be the one that grades,
or the baseline grades itself and ties the oracle. So it takes two routing datasets over the same queries:
  eval_data  the rewards every method is scored by (the router, single candidates, the oracle);
  rmr_data   the ranking reward model's scores of the same answers (`zooter score` with another model).
For each query, RMR picks the candidate with the best rmr reward and earns that candidate's eval reward.

Its price is what the router avoids: per query, N candidate generations plus N reward-model passes,
against the router's one router pass plus one generation.
"""

from __future__ import annotations

import numpy as np

from zooter.runtime.decision import unit_price
from zooter.runtime.errors import UserError
from zooter.training.dataset import RoutingDataset


def rmr_baseline(eval_data: RoutingDataset, rmr_data: RoutingDataset, costs: dict | None = None) -> dict:
    """RMR's score under the eval rewards, on the queries both datasets share (matched by id).

    Keys follow the evaluation report: mean_reward, mean_cost (None without costs), plus what RMR needs
    said: picks, skipped queries and its cost in calls. A candidate without an rmr reward for a query cannot
    be picked for it; a pick without an eval reward cannot be graded and is counted apart. `costs`
    ({candidate: Cost}, optional) gives mean_cost as the summed unit price of all candidates, the
    unit of the report's router mean_cost for data without responses.
    """
    names = list(eval_data.candidates)
    rmr_index = {row.id: row for row in rmr_data.rows}
    shared = [(i, rmr_index[row.id]) for i, row in enumerate(eval_data.rows) if row.id in rmr_index]
    if not shared:
        raise UserError(f"RMR: no query id of {eval_data.path} appears in {rmr_data.path}; "
                        f"score the same answers file with a second reward model")
    rankable = [n for n in names if n in set(rmr_data.candidates)]
    if not rankable:
        raise UserError(f"RMR: {rmr_data.path} scores none of the candidates {names}")
    ranked = eval_data.rewards()
    picks: list[int] = []
    scores: list[float] = []
    oracle: list[float] = []
    agree = no_rmr = ungraded = 0
    choices = {n: 0 for n in names}
    by_source: dict[str, list[float]] = {}
    eligible_counts = []
    for i, rmr_row in shared:
        rmr = np.array([np.nan if rmr_row.rewards.get(n) is None else rmr_row.rewards[n] for n in names], dtype=float)
        eligible = ~np.isnan(rmr)
        if not eligible.any():
            no_rmr += 1
            continue
        eligible_counts.append(int(eligible.sum()))
        pick = int(np.nanargmax(rmr))  # ties go to the first candidate in the eval order
        picks.append(pick)
        choices[names[pick]] += 1
        value = ranked[i, pick]
        if np.isnan(value):
            ungraded += 1
            continue
        scores.append(float(value))
        best = np.nanmax(ranked[i])
        oracle.append(float(best))
        agree += bool(value == best)
        by_source.setdefault(eval_data.rows[i].source or "(none)", []).append(float(value))
    n = len(names)
    result = {
        "method": "reward-model ranking: run every candidate, keep the answer the second reward model ranks best",
        "rmr_file": rmr_data.path,
        "mean_reward": float(np.mean(scores)) if scores else None,
        "mean_cost": None,
        "queries": len(scores),
        "oracle_mean_reward_same_queries": float(np.mean(oracle)) if oracle else None,
        "picks_oracle_best": agree / len(scores) if scores else None,
        "choices": choices,
        "by_source": {src: float(np.mean(v)) for src, v in sorted(by_source.items())},
        "skipped": {"not_in_rmr_file": len(eval_data.rows) - len(shared), "no_rmr_reward": no_rmr,
                    "pick_has_no_eval_reward": ungraded},
        "cost": {
            "rmr": {"generations_per_query": n, "reward_model_passes_per_query": n,
                    "mean_answers_ranked": float(np.mean(eligible_counts)) if eligible_counts else 0.0},
            "router": {"generations_per_query": 1, "router_passes_per_query": 1},
            "note": f"RMR runs all {n} candidates and the reward model on each answer; the router runs itself once "
                    f"and one candidate",
        },
    }
    if costs and all(name in costs for name in names):
        # In the evaluation report's unit (price per million tokens): RMR pays for every candidate's answer.
        result["mean_cost"] = float(sum(unit_price(costs[name]) for name in names))
    return result
