"""Leave-one-candidate-out benchmark of `zooter candidates add` (docs/training.md has its figures).

For each held-out candidate C and each cross-validation fold (k folds by query hash, as `zooter
reproduce` folds): train a frozen router on all candidates (the retrain, the target), add C with its
rewards on k random training rows of the fold (the rest of its column unknown, as for a new model
labelled on a budget; or k rows picked as `zooter candidates pick` picks them), and route the fold's test rows with each through the shipped rule (guard
included). Everything runs on one set of cached embeddings (head-only, --layers N), so the rows compare
the candidate lifecycle and nothing else. Reported per (C, k), pooled over all rows: the mean routed
reward, its paired difference from the retrain and from the best single candidate with 95% bootstrap
intervals, and the seconds an add takes (labelling and embedding excluded).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from zooter.training.dataset import RoutingDataset, Row

ALL = None   # k = every training row of the fold


def _with_column(data: RoutingDataset, idx: np.ndarray, name: str, keep: np.ndarray | None) -> RoutingDataset:
    """Rows `idx` of `data`; `name`'s reward kept only on the rows in `keep` (None: everywhere)."""
    keep_set = None if keep is None else set(keep.tolist())
    rows = []
    for i in idx:
        r = data.rows[i]
        rewards = dict(r.rewards)
        if keep_set is not None and i not in keep_set:
            rewards[name] = None
        rows.append(Row(r.id, r.query, rewards, list(r.tags), None, r.source))
    return RoutingDataset(rows, data.candidates, data.path)


def _route(fitted, x: np.ndarray, labels: list[str]) -> np.ndarray:
    from zooter.runtime.decision import Rule, softmax

    rule = Rule.from_manifest({"labels": labels, "decision": fitted.decision})
    probs = softmax(x.astype(np.float64) @ fitted.head[0].T + fitted.head[1])
    scores = x.astype(np.float64) @ fitted.reward_head[0].T + fitted.reward_head[1]
    return rule.decide(probs, scores).choice


def bench(data_path: str, names: Sequence[str], ks: Sequence[int | None] = (50, 100, 250, 500, ALL), folds: int = 5,
          layers: int = 2, cache: str | None = None, backbone: str | None = None, oof_folds: int = 0, seed: int = 0,
          picked: str = "random", log=print) -> dict:
    """`picked`: which k rows are labelled, "random" or "anchor" (lifecycle.pick: half random, half where the
    router without the candidate has its anchor scoring lowest)."""
    from zooter.training.embed import embed_texts
    from zooter.training.evaluate import paired_bootstrap
    from zooter.training.labels import auto_tau
    from zooter.training.lifecycle import fit_router, pick
    from zooter.training.model import RouterModel, keep_first_layers
    from zooter.training.reproduce import hash_folds
    from zooter.training.splits import split_indices
    from zooter.training.train import Problem, TrainConfig

    data = RoutingDataset.load(data_path)
    labels = list(data.candidates)
    unknown = [n for n in names if n not in labels]
    if unknown:
        from zooter.runtime.errors import UserError

        raise UserError(f"--names: {unknown} are not candidates of {data_path} ({', '.join(labels)})")
    cfg = TrainConfig(data=data_path, out="", frozen=True, layers=layers, int8_consistency=0, oof_folds=oof_folds,
                      backbone=backbone, cache=cache, seed=seed).resolved()
    model, tokenizer = RouterModel.from_backbone(cfg.backbone, labels)
    keep_first_layers(model.encoder, layers)
    x = embed_texts(model, tokenizer, data.queries, cfg.max_length, cache=cache, progress="embedding")
    rewards = data.rewards()
    routed = {}                  # (variant) -> per-row reward of the routed choice on the test rows
    seconds: dict = {}
    n = len(data)

    def put(key, held, values):
        routed.setdefault(key, np.full(n, np.nan))[held] = values

    for f, held in enumerate(hash_folds(data.queries, folds)):
        held = np.array(held)
        rest = np.setdiff1d(np.arange(n), held)
        parts = split_indices([data.queries[i] for i in rest], dev=0.1, test=0.0, seed=1)
        tr, dv = rest[parts["train"]], rest[parts["dev"]]
        rng = np.random.default_rng(seed + f)

        def fit(columns: list[str], keep_name=None, keep=None, tau=None, chance=None):
            full = RoutingDataset([Row(r.id, r.query, {c: r.rewards.get(c) for c in columns}, r.tags, None, r.source)
                                   for r in data.rows], columns, data.path)
            train, dev = (_with_column(full, i, keep_name, keep) if keep_name else full.subset(i) for i in (tr, dv))
            problem = Problem(train, dev, np.zeros(0), {"tau": tau or auto_tau(train.rewards())})
            col_x = x[tr], x[dv]
            estimated = [columns.index(keep_name)] if keep is not None else []
            weights = None
            if chance is not None:   # as `add` weights rows that carry their chance to be picked
                w = np.ones(n)
                w[keep] = 1.0 / chance
                w[keep] /= w[keep].mean()
                weights = {columns.index(keep_name): (w[tr], w[dv])}
            started = time.time()
            fitted = fit_router(cfg, problem, *col_x, estimated, weights=weights)
            elapsed = time.time() - started
            choice = _route(fitted, x[held], columns)
            order = [labels.index(c) for c in columns]
            return rewards[held][:, order][np.arange(len(held)), choice], fitted, elapsed, problem.meta["tau"]

        got, fitted, _, _ = fit(labels)
        put("retrain", held, got)
        anchor = labels.index(fitted.anchor["candidate"])
        put("best single", held, rewards[held, anchor])
        log(f"fold {f}: retrain {np.mean(got):.4f}, best single {np.mean(rewards[held, anchor]):.4f}")
        for name in names:
            others = [c for c in labels if c != name]
            got, without, _, tau = fit(others)
            low = rewards[tr, labels.index(without.anchor["candidate"])]
            put((name, "without"), held, got)
            pool = np.concatenate([tr, dv])
            for k in ks:
                chance = None
                if k is ALL:
                    keep = pool
                elif picked == "anchor":
                    chosen, chance = pick(low, k, len(pool), seed=int(rng.integers(1 << 31)), how="anchor")
                    keep = pool[chosen]
                else:
                    keep = rng.choice(pool, size=min(k, len(pool)), replace=False)
                got, _, elapsed, _ = fit(others + [name], name, keep, tau, chance)
                put((name, k), held, got)
                seconds.setdefault((name, k), []).append(elapsed)
                log(f"fold {f}: {name} added on {len(keep)} rows: {np.mean(got):.4f} ({elapsed:.1f} s)")

    base, single = routed["retrain"], routed["best single"]
    table = {"rows": n, "folds": folds, "layers": layers, "oof_folds": oof_folds, "picked": picked,
             "retrain": float(np.mean(base)), "best_single": float(np.mean(single)), "candidates": {}}
    for name in names:
        entry = {"without": _compare(routed[(name, "without")], base, single, paired_bootstrap)}
        for k in ks:
            key = "all" if k is ALL else str(k)
            entry[key] = _compare(routed[(name, k)], base, single, paired_bootstrap)
            entry[key]["add_seconds"] = float(np.mean(seconds[(name, k)]))
        table["candidates"][name] = entry
    return table


def _compare(got, base, single, paired_bootstrap) -> dict:
    vs_retrain, vs_single = paired_bootstrap(got - base), paired_bootstrap(got - single)
    return {"mean_reward": float(np.mean(got)), "vs_retrain": vs_retrain["mean"], "vs_retrain_ci95": vs_retrain["ci95"],
            "vs_best_single": vs_single["mean"], "vs_best_single_ci95": vs_single["ci95"]}


def format_table(table: dict) -> str:
    lines = [f"{table['rows']} rows, {table['folds']}-fold CV, frozen {table['layers']} layers; retrain on all "
             f"candidates {table['retrain']:.4f}, best single {table['best_single']:.4f}",
             f"| added candidate | k | mean reward | vs retrain [95% CI] | vs best single [95% CI] | add s |",
             "|---|---|---|---|---|---|"]
    for name, entry in table["candidates"].items():
        for key, row in entry.items():
            ci, cs = row["vs_retrain_ci95"], row["vs_best_single_ci95"]
            secs = f"{row['add_seconds']:.1f}" if "add_seconds" in row else "-"
            lines.append(f"| {name} | {key} | {row['mean_reward']:.4f} | {row['vs_retrain']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}] "
                         f"| {row['vs_best_single']:+.4f} [{cs[0]:+.4f}, {cs[1]:+.4f}] | {secs} |")
    return "\n".join(lines)
