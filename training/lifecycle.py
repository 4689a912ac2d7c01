"""The candidate lifecycle: add a candidate to a trained router, or retire one, on the fixed encoder.

A router's encoder is fixed once trained; what depends on the candidate set is linear or fitted in
closed form on its pooled embeddings, so a new or retired candidate means refitting those, not
training again:

    rows          the run's training and dev rows (its --data/--dev, split as training split them),
                  plus every rows file added since (kept in the run, RUN/added/NAME.jsonl)
    estimate      an added candidate is labelled on some rows only. Its reward on the others is
                  estimated from what is known of those rows: the other candidates' rewards on the
                  same query (a least-squares map from the rows where both are known: the new model
                  resembles some of the old ones) plus a ridge on the embeddings for the rest
                  (calibrate.ridge, strength by out-of-fold error on the labelled rows)
    distilled     the head refitted on the fixed embeddings from the targets of the completed
                  reward matrix (train.fit_head, the run's tau, beta and seed); an estimated 0/1 reward
                  gives the targets of its two outcomes averaged by its chance (two_point_outcomes)
    reward head   ridge on the completed matrix; the decision layer (train.decision_layer) on the
                  realised rewards, so the guard's margin is measured on real outcomes: on every
                  fitting row, the added candidate's gain where it is chosen but not labelled imputed
                  from its estimate on that row plus the estimate's error on its labelled rows with the
                  anchor's reward in the same quarter (held_out_estimates, calibrate._margin)
    anchor        the best single candidate by a paired estimate (a partly labelled candidate is
                  compared with a fully labelled one on the rows both have)
    weights       rows picked unevenly for labelling (`pick --how anchor`) carry the chance they had to
                  be picked (INCLUSION, written by pick_queries); every mean over an added candidate's
                  labelled rows that stands for all rows (the anchor's paired estimate, the guard's
                  imputed gains) weights each row by 1 / that chance (Horvitz-Thompson), so an uneven
                  sample is read as the population it was drawn from. The estimate's map, a regression
                  on the other candidates' rewards (the anchor's, which the picking used, among them),
                  needs none.

A frozen run's distilled head is refitted from scratch, so removing a candidate gives the run trained
without it, and add-then-remove gives the original run back. A fine-tuned run's head is refitted on its
fine-tuned embeddings when a candidate is added; a removal drops the candidate's rows of both heads.
run.json's `lifecycle` records how each candidate entered and every add/remove.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zooter.runtime.errors import UserError
from zooter.training.dataset import RoutingDataset, Row

ADDED = "added"   # the run's folder of added rows files
INCLUSION = "inclusion_probability"   # a picked row's chance to be picked, in the rows pick_queries writes
LOW_SHARE = 0.5   # `pick --how anchor`: the share of the budget spent where the anchor scored lowest


# --- the run's rows -----------------------------------------------------------------------------------
@dataclass
class RunRows:
    train: RoutingDataset
    dev: RoutingDataset
    # per added candidate: (training rows' weights, dev rows' weights), 1 / the chance a row was picked for
    # labelling scaled to mean 1 over its labelled rows (all 1 for rows picked uniformly); 1 elsewhere
    weights: dict = field(default_factory=dict)


def base_rows(run: Path, info: dict) -> RunRows:
    """The training and dev rows the run was trained on, checked against the hashes it recorded."""
    from zooter.training.train import split_dev

    config = info.get("config") or {}
    data = config.get("data") or info.get("data")
    if not data or not Path(data).is_file():
        raise UserError(f"{run}: its training data {data!r} is not there (run.json config.data); the lifecycle "
                        f"refits on the run's own rows")
    original = [n for n in info.get("lifecycle", {}).get("trained", info["labels"])]
    full = RoutingDataset.load(data)
    train, dev = split_dev(full, config.get("dev"))
    if dev.candidates != full.candidates:
        dev = RoutingDataset(dev.rows, full.candidates, dev.path)
    if info.get("data_sha256") and train.sha256() != info["data_sha256"]:
        raise UserError(f"{data}: not the rows {run} was trained on (its hash differs from run.json data_sha256)")
    if info.get("dev_sha256") and dev.sha256() != info["dev_sha256"]:
        raise UserError(f"{config.get('dev') or data}: not the dev rows {run} was trained on (dev_sha256 differs)")
    missing = [n for n in original if n not in train.candidates]
    if missing:
        raise UserError(f"{data}: no rewards column for {missing}, which {run} was trained on")
    return RunRows(_columns(train, original), _columns(dev, original))


def _columns(data: RoutingDataset, names: list[str]) -> RoutingDataset:
    rows = [Row(r.id, r.query, {n: r.rewards.get(n) for n in names}, list(r.tags), r.responses, r.source)
            for r in data.rows]
    return RoutingDataset(rows, names, data.path)


def run_rows(run: Path, info: dict) -> RunRows:
    """The run's rows as they stand: the trained rows, then each add and remove in order."""
    rows = base_rows(run, info)
    for event in info.get("lifecycle", {}).get("events", []):
        if event["op"] == "add":
            labels = list(rows.train.candidates) + [event["name"]]
            path = run / event["rows_file"]
            rows, _ = merge(rows, RoutingDataset.load(path, labels), event["name"], labels,
                            inclusion(path, event["name"]))
        else:
            keep = [n for n in rows.train.candidates if n != event["name"]]
            rows = RunRows(_columns(rows.train, keep), _columns(rows.dev, keep),
                           {n: w for n, w in rows.weights.items() if n != event["name"]})
    return rows


def inclusion(path: str | Path, name: str) -> dict[str, float] | None:
    """{query: chance it was picked} from the INCLUSION field of the rows scoring `name` in a rows file,
    or None when no row has it (picked uniformly, or labelled without `pick`). Every scored row must
    then have one, in (0, 1]."""
    from zooter.runtime.files import read_jsonl

    found, missing = {}, None
    for line, obj in read_jsonl(path, "routing-data file"):
        if not isinstance(obj, dict) or (obj.get("rewards") or {}).get(name) is None:
            continue
        p = obj.get(INCLUSION)
        if p is None:
            missing = missing or line
            continue
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise UserError(f"{path}:{line}: {INCLUSION} is {p!r}, expected a number in (0, 1] (the chance "
                            f"`zooter candidates pick` gave the row)")
        found[obj["query"]] = float(p)
    if found and missing:
        raise UserError(f"{path}:{missing}: no {INCLUSION}, which other rows have; label the rows `zooter candidates "
                        f"pick` wrote, keeping the field on every row, or drop it from every row")
    return found or None


def merge(rows: RunRows, added: RoutingDataset, name: str, labels: list[str],
          probabilities: dict[str, float] | None = None) -> tuple[RunRows, dict]:
    """The run's rows with `name`'s rewards from `added`: a query the run knows (train or dev, by its
    text) gets the new column; a new query joins the training rows with its rewards. `probabilities`
    ({query: chance it was picked}, from inclusion()) become the rows' weights. Returns the rows and what
    was used: {"train": n, "dev": n, "new_queries": n}."""
    where = {}
    for part in ("train", "dev"):
        for i, row in enumerate(getattr(rows, part).rows):
            where.setdefault(row.query, (part, i))
    parts = {p: [Row(r.id, r.query, {**{n: r.rewards.get(n) for n in labels if n != name}, name: None},
                     list(r.tags), r.responses, r.source) for r in getattr(rows, p).rows] for p in ("train", "dev")}
    used = {"train": 0, "dev": 0, "new_queries": 0}
    ids = {r.id for r in parts["train"]} | {r.id for r in parts["dev"]}
    for row in added.rows:
        value = row.rewards.get(name)
        if value is None:
            continue
        if row.query in where:
            part, i = where[row.query]
            parts[part][i].rewards[name] = value
            used[part] += 1
            continue
        others = {n: row.rewards.get(n) for n in labels if n != name}
        if all(v is None for v in others.values()):
            raise UserError(f"{added.path}: row {row.id!r} is a query the run has not seen and scores only {name}; "
                            f"a new query needs a reward for at least one of the run's candidates too")
        row_id = row.id if row.id not in ids else f"{name}:{row.id}"
        ids.add(row_id)
        parts["train"].append(Row(row_id, row.query, {**others, name: value}, list(row.tags), None, row.source))
        used["train"] += 1
        used["new_queries"] += 1
    grown = len(parts["train"]) - len(rows.train)   # new queries: earlier candidates' weights 1 there
    weights = {n: (np.concatenate([tw, np.ones(grown)]), dw) for n, (tw, dw) in rows.weights.items()}
    weights[name] = _weights(parts, name, probabilities)
    return RunRows(RoutingDataset(parts["train"], labels, rows.train.path),
                   RoutingDataset(parts["dev"], labels, rows.dev.path), weights), used


def _weights(parts: dict, name: str, probabilities: dict[str, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """(training rows', dev rows') weights of `name`'s labelled rows: 1 / their chance to be picked, scaled
    to mean 1 over them; 1 everywhere else, and everywhere when the rows carry no chance (uniform)."""
    out = {p: np.ones(len(parts[p])) for p in ("train", "dev")}
    if not probabilities or len(set(probabilities.values())) == 1:   # uniform: exactly 1, as unweighted
        return out["train"], out["dev"]
    for p in ("train", "dev"):
        for i, row in enumerate(parts[p]):
            if row.rewards.get(name) is not None and row.query in probabilities:
                out[p][i] = 1.0 / probabilities[row.query]
    labelled = {p: np.array([r.rewards.get(name) is not None for r in parts[p]], bool) for p in ("train", "dev")}
    scale = np.concatenate([out[p][labelled[p]] for p in ("train", "dev")]).mean()
    for p in ("train", "dev"):
        out[p][labelled[p]] /= scale
    return out["train"], out["dev"]


# --- fitting on fixed embeddings ----------------------------------------------------------------------
TWO_VALUED = 0.9   # share of an added candidate's labelled rewards at their min or max that makes them 0/1-like


@dataclass
class Estimate:
    """An added candidate's reward predicted from what is known of a row: a (lightly ridged) least-squares
    map from the other candidates' rewards on the same row, plus a ridge on its embedding for what that map
    leaves (see the module's doc). Fitted by fit_estimate."""

    j: int
    fill: np.ndarray          # each other candidate's mean, standing for its reward where it has none
    coef: np.ndarray          # the map: intercept, then one weight per other candidate
    head: tuple | None        # the residual's ridge; None under 10 labelled rows
    low: float
    high: float

    def mapped(self, rewards: np.ndarray) -> np.ndarray:
        others = np.delete(rewards, self.j, axis=1)
        others = np.where(np.isnan(others), self.fill, others)
        return np.column_stack([np.ones(len(others)), others]) @ self.coef

    def __call__(self, x: np.ndarray, rewards: np.ndarray) -> np.ndarray:
        """On rows `x` whose candidates' rewards are `rewards` (column j is not read)."""
        from zooter.training.calibrate import scores

        value = self.mapped(rewards)
        if self.head is not None:
            value = value + scores(self.head, x)[:, 0]
        return np.clip(value, self.low, self.high)


def fit_estimate(x: np.ndarray, rewards: np.ndarray, j: int, rows: np.ndarray | None = None,
                 residual: bool = True) -> Estimate:
    """The Estimate of column j fitted on `rows` (default: every row scoring j); no residual ridge when
    `residual` is False (reward_map)."""
    from zooter.training.calibrate import choose_strength, inner_folds, ridge

    y = rewards[:, j]
    rows = np.flatnonzero(~np.isnan(y)) if rows is None else rows
    others = np.delete(rewards, j, axis=1)
    means = np.nanmean(others, axis=0)
    fill = np.where(np.isnan(means), 0.0, means)
    a = np.column_stack([np.ones(len(rows)), np.where(np.isnan(others[rows]), fill, others[rows])])
    # A light ridge: with 50 labelled rows and 8 other candidates the plain solution overfits.
    lam = 1.0 * np.eye(a.shape[1])
    lam[0, 0] = 0.0
    coef = np.linalg.solve(a.T @ a + lam, a.T @ y[rows])
    estimate = Estimate(j, fill, coef, None, float(np.nanmin(rewards)), float(np.nanmax(rewards)))
    if residual and len(rows) >= 10:
        xk, left = x[rows], (y[rows] - a @ coef)[:, None]
        folds = [f for f in inner_folds([str(i) for i in range(len(xk))], 5) if len(f)]
        estimate.head = ridge(xk, left, choose_strength(xk, left, folds))
    return estimate


def estimate_column(x: np.ndarray, rewards: np.ndarray, j: int) -> np.ndarray:
    """Column j of `rewards` completed where it is NaN by fit_estimate. Rows labelled for j keep their reward."""
    y = rewards[:, j]
    return np.where(~np.isnan(y), y, fit_estimate(x, rewards, j)(x, rewards))


def held_out_estimates(train_x: np.ndarray, rewards: np.ndarray, dev_x: np.ndarray, dev_rewards: np.ndarray,
                       j: int, folds: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Column j estimated on every training and dev row, never by an estimate fitted on that row: on the
    training rows labelled for j, by estimates fitted without them (`folds` folds of those rows); elsewhere
    by the one fitted on all of them. What the guard's imputation measures the estimate's error with
    (calibrate._margin): an estimate judged on its own rows would look exact there."""
    from zooter.training.calibrate import inner_folds

    known = np.flatnonzero(~np.isnan(rewards[:, j]))
    full = fit_estimate(train_x, rewards, j, known)
    train_est, dev_est = full(train_x, rewards), full(dev_x, dev_rewards)
    if len(known) >= 2 * folds:
        for held in inner_folds([str(i) for i in known], folds):
            rows = known[held]
            train_est[rows] = fit_estimate(train_x, rewards, j, np.setdiff1d(known, rows))(train_x[rows], rewards[rows])
    else:   # too few to hold out: no estimate, the guard imputes the gain's mean alone
        train_est[:], dev_est[:] = np.nan, np.nan
    return train_est, dev_est


def two_point_outcomes(realised: np.ndarray, completed: np.ndarray, estimated: list[int]):
    """labels.two_point_distribution's (chance, low, high) for the estimated cells of the columns whose
    labelled rewards are two-valued (at least TWO_VALUED of them at their min or max: 0/1 task scores), or
    None when there is none; other columns keep softmax of their estimate."""
    m = realised.shape[1]
    chance, low, high = np.full(realised.shape, np.nan), np.zeros(m), np.ones(m)
    for j in estimated:
        y = realised[:, j][~np.isnan(realised[:, j])]
        if len(y) < 2 or y.max() <= y.min() or np.mean((y == y.min()) | (y == y.max())) < TWO_VALUED:
            continue
        low[j], high[j] = y.min(), y.max()
        miss = np.isnan(realised[:, j])
        chance[miss, j] = np.clip((completed[miss, j] - low[j]) / (high[j] - low[j]), 0.0, 1.0)
    return (chance, low, high) if (~np.isnan(chance)).any() else None


def reward_map(rewards: np.ndarray, j: int) -> np.ndarray:
    """Column j predicted on every row by the Estimate's map from the other candidates' rewards alone,
    fitted on the rows scoring j."""
    return fit_estimate(np.zeros((len(rewards), 0)), rewards, j, residual=False).mapped(rewards)


def paired_means(rewards: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Each candidate's mean reward over all rows (the plain mean for a fully scored one). A partly scored
    one's is a difference estimate: reward_map's prediction averaged over every row, plus its error
    averaged over the scored rows with `weights` (rows x candidates, None: equal; see the module's doc).
    The other candidates' rewards are known everywhere, so only the map's error is sampled: on dcrouter
    (500 of ~4,500 rows) its spread is 0.014 against 0.019 for the gap to the anchor on the rows both
    have, and the anchor comes out wrong in 9-10% of draws instead of 16% (docs/training.md)."""
    weights = np.ones(rewards.shape) if weights is None else weights
    out = np.full(rewards.shape[1], -np.inf)
    scored = ~np.isnan(rewards)
    for j in range(rewards.shape[1]):
        if scored[:, j].all():
            out[j] = float(np.mean(rewards[:, j]))
        elif scored[:, j].sum() >= 2:
            mapped = reward_map(rewards, j)
            error = np.average((rewards[:, j] - mapped)[scored[:, j]], weights=weights[scored[:, j], j])
            out[j] = float(np.mean(mapped) + error)
    return out


@dataclass
class Fitted:
    head: tuple            # (weight, bias) of the distilled head
    reward_head: tuple     # (weight, bias)
    decision: dict
    dev_logits: np.ndarray
    anchor: dict           # run.json best_single


def fit_router(cfg, problem, train_x, dev_x, estimated: list[int], int8=None, head=None, weights=None) -> Fitted:
    """Distilled head (unless `head` is given), reward head and decision layer for `problem`'s labels on
    fixed embeddings; columns in `estimated` are completed by estimate_column first. `weights`: {column:
    (training rows' weights, dev rows' weights)} of partly labelled columns (RunRows.weights)."""
    import torch

    from zooter.runtime.decision import softmax
    from zooter.training.calibrate import inner_folds
    from zooter.training.labels import training_targets
    from zooter.training.train import decision_layer, fit_head

    realised = problem.train.rewards()
    completed = realised.copy()
    estimates = None
    if estimated:
        dev_r = problem.dev.rewards()
        estimates = (np.full(realised.shape, np.nan), np.full(dev_r.shape, np.nan))
    for j in estimated:
        completed[:, j] = estimate_column(train_x, realised, j)
        estimates[0][:, j], estimates[1][:, j] = held_out_estimates(train_x, realised, dev_x, dev_r, j)
    column_w = (np.ones(realised.shape), np.ones((len(dev_x), realised.shape[1])))
    for j, w in (weights or {}).items():
        column_w[0][:, j], column_w[1][:, j] = w
    means = paired_means(realised, column_w[0])
    best = int(np.argmax(means))
    problem.meta["best_single"] = {"candidate": problem.labels[best], "mean_reward": float(means[best])}
    train_q, dev_q = (None, None) if int8 is None else int8
    threads = torch.get_num_threads()
    if not cfg.threads:
        torch.set_num_threads(1)   # as train_head: a linear head gains nothing from threads
    try:
        outcomes = two_point_outcomes(realised, completed, estimated) if cfg.loss == "kl" else None
        targets = torch.tensor(training_targets(completed, [r.tags for r in problem.train.rows], tau=problem.meta["tau"],
                                                beta=cfg.beta, loss=cfg.loss, outcomes=outcomes)[0], dtype=torch.float32)
        tx = torch.tensor(train_x)
        tq = None if train_q is None else torch.tensor(train_q)
        if head is None:
            module, _ = fit_head(cfg, tx, targets, np.random.default_rng(cfg.seed), tq)
            head = (module.weight.detach().numpy().astype(np.float64), module.bias.detach().numpy().astype(np.float64))
        dev_logits = dev_x.astype(np.float64) @ head[0].T + head[1]
        oof = None
        if cfg.frozen and cfg.oof_folds:
            oof = np.zeros(targets.shape)
            queries = problem.train.queries
            for k, held in enumerate(inner_folds(queries, cfg.oof_folds)):
                rest = np.setdiff1d(np.arange(len(queries)), held)
                fold_head, _ = fit_head(cfg, tx[rest], targets[rest], np.random.default_rng(cfg.seed + 1 + k),
                                        None if tq is None else tq[rest], seed=cfg.seed + 1 + k)
                with torch.no_grad():
                    oof[held] = softmax(fold_head(tx[held]).numpy())
    finally:
        torch.set_num_threads(threads)
    reward_head, decision = decision_layer(problem, train_x, dev_x, softmax(dev_logits), train_q, oof,
                                           fit_rewards=completed, partial=estimated, weights=column_w,
                                           estimates=estimates)
    return Fitted(head, reward_head, decision, dev_logits, problem.meta["best_single"])


# --- which queries to label ----------------------------------------------------------------------------
def pick(anchor_rewards: np.ndarray, budget: int, pool: int, seed: int = 0, how: str = "random",
         low_share: float = LOW_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """Which of `pool` rows (training rows first, then dev rows) to label for a new candidate within
    `budget`, from what is known before any label, and each picked row's chance to be picked. "random": a
    uniform sample. "anchor": a stratified sample: `low_share` of the budget among the training rows (the
    first len(anchor_rewards)) where the router's anchor scored lowest (only there can a newcomer gain over
    it: those at or below the anchor's reward on the budget's low share-th lowest row, ties included), the
    rest uniformly among all the other rows. Within a stratum each row has the same chance, which `add`
    turns into its weight (see the module's doc)."""
    if how not in ("random", "anchor"):
        raise UserError(f"--how must be random or anchor, not {how!r}")
    rng = np.random.default_rng(seed)
    budget = min(budget, pool)
    if how == "random":
        return rng.choice(pool, size=budget, replace=False), np.full(budget, budget / pool)
    low = np.where(np.isnan(anchor_rewards), np.inf, anchor_rewards)
    n_low = min(int(round(budget * low_share)), len(low))
    stratum = np.zeros(pool, bool)
    if n_low:
        stratum[:len(low)] = low <= np.sort(low)[n_low - 1]
    lows, rest = np.flatnonzero(stratum), np.flatnonzero(~stratum)
    n_rest = min(budget - n_low, len(rest))
    n_low = budget - n_rest          # fewer other rows than their share: the low stratum makes it up
    chosen = [rng.choice(rest, size=n_rest, replace=False), rng.choice(lows, size=n_low, replace=False)]
    chance = [np.full(n_rest, n_rest / max(len(rest), 1)), np.full(n_low, n_low / max(len(lows), 1))]
    return np.concatenate(chosen).astype(int), np.concatenate(chance)


def pick_queries(run: str | Path, name: str, budget: int, out: str | Path, seed: int = 0, how: str = "random") -> dict:
    """`zooter candidates pick`: the run's queries to label for NAME (training rows first, then dev rows),
    written as routing rows with NAME's reward to fill in; `add` takes them back once labelled."""
    import json

    run, info = _load(run)
    labels = list(info["labels"])
    if name in labels:
        raise UserError(f"--name {name}: already a candidate of {run} ({', '.join(labels)})")
    if budget < 2:
        raise UserError(f"--budget must be at least 2, got {budget}")
    rows = run_rows(run, info)
    anchor = info.get("best_single", {}).get("candidate")
    if anchor not in labels:
        raise UserError(f"{run}: run.json names no anchor (best_single) among its candidates")
    every = rows.train.rows + rows.dev.rows
    chosen, chance = pick(rows.train.rewards()[:, labels.index(anchor)], budget, len(every), seed, how)
    text = "".join(json.dumps({"id": every[i].id, "query": every[i].query, "rewards": {name: None},
                               "tags": list(every[i].tags), INCLUSION: round(float(p), 12)}) + "\n"
                   for i, p in zip(chosen, chance))
    Path(out).write_text(text)
    return {"rows": len(chosen), "of": len(every), "anchor": anchor, "how": how}


# --- the commands -------------------------------------------------------------------------------------
def _load(run: str | Path):
    from zooter.training.model import read_run_info

    run = Path(run)
    info = read_run_info(run)
    if "decision" not in info or not isinstance(info.get("config"), dict):
        raise UserError(f"{run}: not a trained run (run.json has no config or decision layer); train it with zooter train")
    return run, info


def _config(info: dict):
    from zooter.training.train import TrainConfig

    known = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in info["config"].items() if k in known})
    if not cfg.frozen:   # a fine-tuned run's distilled head is refitted as a frozen head is trained
        from zooter.training.train import FROZEN

        cfg.epochs, cfg.lr, cfg.int8_consistency = FROZEN["epochs"], FROZEN["lr"], 0.0
    return cfg


def _embedder(run: Path, info: dict, cfg):
    """(model, tokenizer) whose embed() gives the run's pooled embeddings. A frozen run's encoder is its
    backbone cut to --layers: loaded from there, it keys the same embedding cache training filled."""
    from zooter.training.model import RouterModel, keep_first_layers

    if cfg.frozen and cfg.encoder != "static" and cfg.backbone and (Path(cfg.backbone) / "config.json").is_file():
        model, tokenizer = RouterModel.from_backbone(cfg.backbone, info["labels"])
        if cfg.layers is not None:
            keep_first_layers(model.encoder, cfg.layers)
        return model, tokenizer
    model, tokenizer, _ = RouterModel.load(run)
    return model, tokenizer


def _embed(model, tokenizer, rows: RunRows, cfg, cache):
    from zooter.training.embed import embed_texts

    kw = {"cache": cache, "progress": None}
    train_x = embed_texts(model, tokenizer, rows.train.queries, cfg.max_length, **kw)
    dev_x = embed_texts(model, tokenizer, rows.dev.queries, cfg.max_length, **kw)
    int8 = None
    if cfg.frozen and cfg.int8_consistency:   # trained quantization-aware: its heads need the INT8 encoder's embeddings
        from zooter.convert.int8_encoder import Int8Encoder

        both = embed_texts(model, tokenizer, rows.train.queries + rows.dev.queries, cfg.max_length, int8=Int8Encoder(), **kw)
        int8 = (both[:len(rows.train)], both[len(rows.train):])
    return train_x, dev_x, int8


def _problem(info: dict, rows: RunRows):
    from zooter.training.train import Problem

    meta = {k: v for k, v in info.items() if k not in ("labels", "pooling", "decision", "dev", "curves")}
    return Problem(rows.train, rows.dev, np.zeros((len(rows.train), len(rows.train.candidates))), meta)


def _summary(fitted: Fitted, rows: RunRows, dev_x: np.ndarray, labels: list[str]) -> dict:
    """run.json's `dev` block and each candidate's dev figures (mean reward where scored, share chosen)."""
    from zooter.runtime.decision import Rule, softmax
    from zooter.training.train import routed_reward

    dev_r = rows.dev.rewards()
    rule = Rule.from_manifest({"labels": labels, "decision": fitted.decision})
    scores = dev_x.astype(np.float64) @ fitted.reward_head[0].T + fitted.reward_head[1]
    scored = ~np.isnan(dev_r)
    allowed = scored | ~scored.any(axis=1, keepdims=True)    # a row scoring nobody: any choice (it counts NaN)
    choice = rule.decide(softmax(fitted.dev_logits), scores, allowed=allowed).choice if len(dev_r) else np.zeros(0, int)
    routed = dev_r[np.arange(len(dev_r)), choice]
    per = {n: {"dev_mean_reward": float(np.nanmean(dev_r[:, j])) if scored[:, j].any() else None,
               "dev_scored": int(scored[:, j].sum()), "dev_chosen": float(np.mean(choice == j)) if len(choice) else 0.0}
           for j, n in enumerate(labels)}
    r = np.where(scored, dev_r, -np.inf)
    dev = {"mean_reward": routed_reward(dev_r, fitted.dev_logits), "epoch": None, "n": len(rows.dev),
           "routed_reward_rule": float(np.nanmean(routed)) if len(routed) else None,
           "oracle": float(np.mean(r.max(axis=1))) if len(r) else None,
           "best_single_from_train": per[fitted.anchor["candidate"]]["dev_mean_reward"]}
    return {"dev": dev, "candidates": per}


def _check_out(run: Path, out: str | Path) -> None:
    """Before any work: the new run never overwrites the one it is made from."""
    if Path(out).resolve() == run.resolve():
        raise UserError(f"--out {out}: is the run itself; write the new router to another folder")


def _write(run: Path, out: str | Path, force: bool, labels: list[str], fitted: Fitted, meta: dict,
           copy_rows: dict[str, Path]) -> dict:
    """RUN2: the run's encoder copied unchanged, the new heads and run.json, the added rows files."""
    import torch

    from zooter.training.model import RouterModel
    from zooter.training.train import RunFolder

    folder = RunFolder(out, force=force)
    folder.start()
    try:
        shutil.copytree(run / "encoder", folder.work / "encoder")
        for name in ("config.json", "curves.json"):
            if (run / name).is_file():
                shutil.copy2(run / name, folder.work / name)
        if (run / ADDED).is_dir():
            shutil.copytree(run / ADDED, folder.work / ADDED)
        for target, source in copy_rows.items():
            (folder.work / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder.work / target)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(run / "encoder")
        model = RouterModel(_stub_encoder(config), labels)
        with torch.no_grad():
            model.head.weight.copy_(torch.as_tensor(fitted.head[0], dtype=torch.float32))
            model.head.bias.copy_(torch.as_tensor(fitted.head[1], dtype=torch.float32))
        model.set_reward_head(*fitted.reward_head)
        model.save_head(folder.work, meta)
    except BaseException:
        shutil.rmtree(folder.work, ignore_errors=True)
        raise
    return folder.finish(keep_state=False)


def _stub_encoder(config):
    import torch

    class Stub(torch.nn.Module):
        """Stands for the encoder when only the heads are written (the encoder folder is copied)."""

        def __init__(self):
            super().__init__()
            self.config = config

    return Stub()


def _by_column(rows: RunRows, labels: list[str]) -> dict:
    return {labels.index(n): w for n, w in rows.weights.items() if n in labels}


def _entered(info: dict) -> dict:
    life = info.get("lifecycle") or {}
    return dict(life.get("entered") or {n: {"how": "trained"} for n in info["labels"]})


def _lifecycle(info: dict, entered: dict, event: dict) -> dict:
    life = info.get("lifecycle") or {}
    return {"trained": life.get("trained", list(info["labels"])), "entered": entered,
            "events": list(life.get("events", [])) + [event]}


def _costs_file(candidates: str | None, labels: list[str], info: dict) -> str | None:
    """--candidates (else the run's): its file must price every label when it prices any."""
    path = candidates or info.get("candidates_file")
    if candidates:
        from zooter.serving.candidates import costs_for, load_candidates

        listed = load_candidates(candidates)
        names = {c.name for c in listed}
        missing = [n for n in labels if n not in names]
        if missing:
            raise UserError(f"{candidates}: no entry for {missing}; list every candidate the router routes to")
        costs_for(listed, labels)
    return str(path) if path else None


def add_candidate(run: str | Path, name: str, rows_path: str | Path, out: str | Path, candidates: str | None = None,
                  cache: str | None = None, force: bool = False) -> dict:
    """`zooter candidates add`: returns the new run's run.json."""
    started = time.time()
    run, info = _load(run)
    _check_out(run, out)
    labels = list(info["labels"])
    if name in labels:
        raise UserError(f"--name {name}: already a candidate of {run} ({', '.join(labels)}); remove it first to replace it")
    new_labels = labels + [name]
    added = RoutingDataset.load(rows_path, new_labels)   # a column that is neither names its line
    if not any(r.rewards.get(name) is not None for r in added.rows):
        raise UserError(f"{rows_path}: no row scores {name!r}")
    costs = _costs_file(candidates, new_labels, info)
    cfg = _config(info)
    rows, used = merge(run_rows(run, info), added, name, new_labels, inclusion(rows_path, name))
    if used["train"] == 0:
        raise UserError(f"{rows_path}: {name!r} is scored only on the run's dev rows; the heads need training rows")
    model, tokenizer = _embedder(run, info, cfg)
    train_x, dev_x, int8 = _embed(model, tokenizer, rows, cfg, cache or cfg.cache)
    problem = _problem(info, rows)
    fit_started = time.time()
    estimated = [new_labels.index(n) for n, e in _entered(info).items() if e["how"] == "added" and n in new_labels]
    fitted = fit_router(cfg, problem, train_x, dev_x, estimated + [len(labels)], int8, weights=_by_column(rows, new_labels))
    summary = _summary(fitted, rows, dev_x, new_labels)
    entered = _entered(info)
    entered[name] = {"how": "added", "rows": used["train"] + used["dev"], **used}
    digest = hashlib.sha256(Path(rows_path).read_bytes()).hexdigest()
    rows_file = f"{ADDED}/{name.replace('/', '_')}-{digest[:8]}.jsonl"
    event = {"op": "add", "name": name, "rows_file": rows_file, "rows_sha256": digest, "source": str(rows_path), **used,
             "seconds": round(time.time() - fit_started, 1)}
    meta = dict(problem.meta, candidates_file=costs, decision=fitted.decision, dev=summary["dev"],
                candidate_figures=summary["candidates"], lifecycle=_lifecycle(info, entered, event),
                n_train=len(rows.train), n_dev=len(rows.dev), max_length=info["max_length"])
    result = _write(run, out, force, new_labels, fitted, meta, {rows_file: Path(rows_path)})
    result["add_seconds"] = round(time.time() - started, 1)
    return result


def remove_candidate(run: str | Path, name: str, out: str | Path, candidates: str | None = None,
                     cache: str | None = None, force: bool = False) -> dict:
    """`zooter candidates remove`: returns the new run's run.json."""
    run, info = _load(run)
    _check_out(run, out)
    labels = list(info["labels"])
    if name not in labels:
        raise UserError(f"--name {name}: not a candidate of {run} ({', '.join(labels)})")
    if len(labels) <= 2:
        raise UserError(f"--name {name}: {run} routes between {len(labels)} candidates; a router needs at least 2 to remain")
    keep = [n for n in labels if n != name]
    costs = _costs_file(candidates, keep, info) if candidates else info.get("candidates_file")
    cfg = _config(info)
    rows = run_rows(run, info)
    rows = RunRows(_columns(rows.train, keep), _columns(rows.dev, keep), {n: w for n, w in rows.weights.items() if n in keep})
    model, tokenizer = _embedder(run, info, cfg)
    train_x, dev_x, int8 = _embed(model, tokenizer, rows, cfg, cache or cfg.cache)
    head = None
    if not cfg.frozen:   # a fine-tuned head belongs with its encoder: drop the candidate's row only
        from zooter.training.model import RouterModel

        full, _, _ = RouterModel.load(run)
        idx = [labels.index(n) for n in keep]
        head = (full.head.weight.detach().numpy()[idx].astype(np.float64), full.head.bias.detach().numpy()[idx].astype(np.float64))
    entered = {n: e for n, e in _entered(info).items() if n in keep}
    estimated = [keep.index(n) for n, e in entered.items() if e["how"] == "added"]
    problem = _problem(info, rows)
    fitted = fit_router(cfg, problem, train_x, dev_x, estimated, int8, head=head, weights=_by_column(rows, keep))
    summary = _summary(fitted, rows, dev_x, keep)
    event = {"op": "remove", "name": name, "anchor_was": info.get("best_single", {}).get("candidate"),
             "anchor_now": fitted.anchor["candidate"]}
    meta = dict(problem.meta, candidates_file=costs, decision=fitted.decision, dev=summary["dev"],
                candidate_figures=summary["candidates"], lifecycle=_lifecycle(info, entered, event),
                n_train=len(rows.train), n_dev=len(rows.dev), max_length=info["max_length"])
    return _write(run, out, force, keep, fitted, meta, {})


def describe(path: str | Path) -> list[dict]:
    """`zooter candidates list`: each candidate of a run or bundle, how it entered, its dev figures."""
    from zooter.training.model import read_run_info

    path = Path(path)
    if (path / "run.json").is_file():
        info = read_run_info(path)
        labels = info["labels"]
    elif (path / "router.json").is_file():
        from zooter.runtime.bundle import Manifest

        manifest = Manifest.read(path, verify=False)
        labels, info = list(manifest.labels), manifest.provenance or {}
    else:
        raise UserError(f"{path}: neither a run (run.json) nor a bundle (router.json)")
    entered = _entered({**info, "labels": labels})
    figures = info.get("candidate_figures") or {}
    anchor = (info.get("best_single") or {}).get("candidate")
    out = []
    for n in labels:
        e = entered.get(n, {"how": "trained"})
        how = "trained" if e["how"] == "trained" else f"added on {e['rows']} rows"
        out.append({"name": n, "entered": how, "anchor": n == anchor, **figures.get(n, {})})
    return out
