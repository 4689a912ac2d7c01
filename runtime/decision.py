"""Turning router logits into a decision: probabilities, the chosen candidate, and the cost-aware rule.

Shared by the Router, evaluation and the Triton `zooter_decide` model, so that every consumer
decides the same way. numpy only.

Cost-aware rule: choose argmax_i  p_i - lambda * c_i / max(c)
  p_i  the router's probability that candidate i is best (its distilled reward share),
  c_i  the candidate's price (per million tokens, or per answer), normalised by the dearest.
lambda = 0 is plain ZOOTER (argmax); larger lambda buys cheaper candidates at some quality.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from zooter.runtime.errors import SettingError


def check_weight(value, name: str = "lambda") -> float:
    """A decision setting (cost weight, tolerance, margin): a finite number >= 0, else a SettingError.

    NaN would make every utility NaN and argmax pick the first label, silently; a negative weight
    would prefer dearer candidates. Both are refused everywhere the rule is configured.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise SettingError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise SettingError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def unit_price(input_per_mtok: float, output_per_mtok: float) -> float:
    """One price per candidate for the rule (the router chooses before any answer's length is known)."""
    return (float(input_per_mtok) + float(output_per_mtok)) / 2


def unit_cost(cost) -> float:
    """The unit price of a bundle's cost entry: {"unit"}, {"input_per_mtok", "output_per_mtok"}, or a number."""
    if isinstance(cost, dict):
        if "unit" in cost:
            return float(cost["unit"])
        return unit_price(cost["input_per_mtok"], cost["output_per_mtok"])
    return float(cost)


def utilities(probs: np.ndarray, costs: Sequence[float] | None = None, lam: float = 0.0) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    lam = check_weight(lam)
    if not lam or costs is None:
        return probs
    c = np.asarray(costs, dtype=np.float64)
    if c.shape[-1] != probs.shape[-1]:
        raise ValueError(f"{c.shape[-1]} costs for {probs.shape[-1]} candidates")
    scale = c.max() if c.max() > 0 else 1.0
    return probs - lam * c / scale


def choose(probs: np.ndarray, costs: Sequence[float] | None = None, lam: float = 0.0) -> np.ndarray:
    """Index of the chosen candidate per row (or a scalar for a 1-D input)."""
    return np.argmax(utilities(probs, costs, lam), axis=-1)


def ranked(probs: np.ndarray, costs: Sequence[float] | None = None, lam: float = 0.0) -> np.ndarray:
    """Candidate indices best first: the fallback order when the chosen candidate fails."""
    return np.argsort(-utilities(probs, costs, lam), axis=-1, kind="stable")
