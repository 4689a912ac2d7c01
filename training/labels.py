"""Training targets from rewards: ZOOTER's reward distribution, tag-based label enhancement, hard labels.

    s(q)  = softmax(r(q) / tau) over the candidates that have a reward (null rewards get probability 0)
    tau   "auto": 0.1 x the median, over training rows whose rewards differ, of the row's reward std
    s_t   = mean of s(q) over the TRAINING rows tagged t
    s*(q) = beta * s(q) + (1 - beta) * mean_{t in T(q)} s_t

beta = 1 is plain reward distillation; the paper's best is beta = 0.3. Hard labels (the paper's
ablation) put all mass on the best-rewarded candidate, with no tag mixing. A reward known only as an
estimate of a 0/1 outcome (a candidate added on some rows, training/lifecycle.py) gives s(q) averaged
over its two outcomes (two_point_distribution). numpy only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


AUTO_TAU_SCALE = 0.1   # docs/training.md: how the rule was chosen against a grid scored on dev


class AllEqualRewards(ValueError):
    """Every training row gives all its candidates the same reward: there is nothing to route on."""


def auto_tau(rewards: np.ndarray, scale: float = AUTO_TAU_SCALE) -> float:
    """The temperature for reward data of this scale: `scale` x the median spread (std) of a row's rewards,
    over the rows whose rewards are not all equal. With rewards in [0, 1] and tau = 1 the distribution is
    nearly flat; tied rows say nothing about the scale, so they are left out."""
    r = np.asarray(rewards, dtype=np.float64)
    with np.errstate(all="ignore"):
        spread = np.nanmax(r, axis=1) - np.nanmin(r, axis=1)
    varied = spread > 0
    if not varied.any():
        raise AllEqualRewards("every training row gives all its candidates the same reward, so there is nothing to "
                              "route on (pass --tau explicitly to train anyway)")
    return float(scale * np.median(np.nanstd(r[varied], axis=1)))


def reward_distribution(rewards: np.ndarray, tau: float = 1.0) -> np.ndarray:
    """Row-wise softmax(r / tau) with NaN (not scored) masked out, never read as zero."""
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    r = np.asarray(rewards, dtype=np.float64)
    scored = ~np.isnan(r)
    if not scored.any(axis=-1).all():
        raise ValueError("a row has no scored candidate")
    z = np.where(scored, r / tau, -np.inf)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.where(scored, np.exp(z), 0.0)
    return e / e.sum(axis=-1, keepdims=True)


def two_point_distribution(rewards: np.ndarray, tau: float, chance: np.ndarray, low: np.ndarray,
                           high: np.ndarray) -> np.ndarray:
    """reward_distribution averaged over the outcomes of the cells known only as an estimate: where `chance`
    (rows x candidates) is a number, candidate j's reward is high[j] with that chance, else low[j],
    independently of the row's other such cells; NaN: the reward in `rewards` is known. An estimated 0/1
    reward of 0.7 is a 1 seven times in ten, and its targets are those of its outcomes, averaged, as a
    model labelled there would get them: softmax(0.7 / tau) beside others' 1s gives it far less."""
    from itertools import product

    chance = np.asarray(chance, dtype=np.float64)
    columns = [j for j in range(chance.shape[1]) if (~np.isnan(chance[:, j])).any()]
    out = np.zeros(np.shape(rewards))
    for outcome in product((True, False), repeat=len(columns)):
        r, p = np.array(rewards, dtype=np.float64, copy=True), np.ones(len(out))
        for up, j in zip(outcome, columns):
            has = ~np.isnan(chance[:, j])
            r[has, j] = high[j] if up else low[j]
            # a known cell takes part in the "high" branch only, with the whole chance
            p *= np.where(has, chance[:, j] if up else 1.0 - chance[:, j], 1.0 if up else 0.0)
        if p.any():
            out += p[:, None] * reward_distribution(r, tau)
    return out


def tag_distributions(dists: np.ndarray, tags: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    """s_t for every tag: the mean reward distribution of the rows carrying it. Pass training rows only."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for dist, row_tags in zip(dists, tags):
        for tag in dict.fromkeys(row_tags):  # a tag listed twice on a row counts once
            sums[tag] = sums.get(tag, 0.0) + dist
            counts[tag] = counts.get(tag, 0) + 1
    return {tag: sums[tag] / counts[tag] for tag in sums}


def enhance(dists: np.ndarray, tags: Sequence[Sequence[str]], tag_dists: dict[str, np.ndarray], beta: float) -> np.ndarray:
    """s* = beta * s + (1 - beta) * mean of the row's tag distributions.

    A row with no tag known to `tag_dists` keeps its own s(q): there is nothing to mix it with.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    out = np.array(dists, dtype=np.float64, copy=True)
    if beta == 1.0:
        return out
    for i, row_tags in enumerate(tags):
        known = [tag_dists[t] for t in dict.fromkeys(row_tags) if t in tag_dists]
        if known:
            out[i] = beta * out[i] + (1.0 - beta) * np.mean(known, axis=0)
    return out


def hard_labels(rewards: np.ndarray, tie_order: Sequence[float] | None = None) -> np.ndarray:
    """One-hot on the best-rewarded scored candidate.

    Ties are common with 0/1 task metrics; they go to the candidate ranked first by `tie_order`
    (higher is better; we pass the candidates' training mean reward), else to the first column.
    """
    r = np.asarray(rewards, dtype=np.float64)
    masked = np.where(np.isnan(r), -np.inf, r)
    best = masked == masked.max(axis=-1, keepdims=True)
    order = np.zeros(r.shape[-1]) if tie_order is None else np.asarray(tie_order, dtype=np.float64)
    # Among the tied best, pick the highest tie_order; stable argmax keeps the first column otherwise.
    choice = np.argmax(np.where(best, order[None, :], -np.inf), axis=-1)
    out = np.zeros_like(r)
    out[np.arange(len(r)), choice] = 1.0
    return out


def training_targets(rewards: np.ndarray, tags: Sequence[Sequence[str]], *, tau: float = 1.0, beta: float = 0.3,
                     loss: str = "kl", outcomes=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The targets for the training rows, and the tag distributions s_t they were built with.

    loss "kl": s*(q), tag-enhanced when beta < 1. loss "hard": the one-hot argmax, unmixed (cross
    entropy on the argmax is the paper's ablation; mixing tags into it would make it soft again).
    `outcomes`: (chance, low, high) of the rewards known only as an estimate (two_point_distribution);
    "kl" only.
    """
    if loss == "hard":
        return hard_labels(rewards, tie_order=np.nanmean(rewards, axis=0)), {}
    if loss != "kl":
        raise ValueError(f"unknown loss {loss!r}; expected 'kl' or 'hard'")
    base = reward_distribution(rewards, tau) if outcomes is None else two_point_distribution(rewards, tau, *outcomes)
    tag_dists = tag_distributions(base, tags)
    return enhance(base, tags, tag_dists, beta), tag_dists


def entropy(dists: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row; zero-probability entries contribute nothing."""
    p = np.asarray(dists, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=-1)
