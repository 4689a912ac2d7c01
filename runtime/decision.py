"""The decision rule: from the router's two outputs to the chosen candidate, the same everywhere.

The Router, evaluation, the export parity gate and Triton's routing models all decide through
`Rule.decide`, with the settings the bundle ships (router.json `decision`). numpy only.

The model gives, for each candidate i:
    p_i   the distilled probability that i answers best (softmax of the logits): it ranks;
    s_i   the expected-reward head's raw score, mapped by an isotonic table (fitted on held-out
          training rows) to E_i, the reward to expect from i, in the data's reward units.
The rule, in order:
    1. choice   c = argmax_i  p_i - lambda * cost_i / max(cost)   (lambda 0: argmax p, the paper's rule)
    2. guard    keep the anchor a, the candidate best on the training rows, unless E_c - E_a > margin;
                the margin was chosen on held-out rows so that routing does not fall below a
    3. tolerance X: the cheapest candidate whose E is within X of E_choice (X = 0 keeps the choice)
    ranking     the choice, then the others by E: the fallback order
    confidence  P(the choice is a best answer for the query): an isotonic map of E_c's lead over the
                best other candidate, fitted on held-out rows
Candidates outside `allowed` are never chosen or ranked (unscored candidates in evaluation, a
request's allowed subset in the gateway). lambda is the older cost knob, kept for compatibility: it
trades probability share for price, while tolerance trades reward units for price (docs/training.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from zooter.runtime.errors import SettingError


def check_weight(value, name: str = "lambda") -> float:
    """A cost setting (lambda, tolerance): a finite number >= 0, else a SettingError.

    NaN would make every utility NaN and argmax pick the first label, silently; a negative weight
    would prefer dearer candidates. Both are refused everywhere the rule is configured.
    """
    number = _finite(value)
    if number is None or number < 0:
        raise SettingError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def check_number(value, name: str) -> float:
    """Any finite number (a guard margin may be negative), else a SettingError naming the setting."""
    number = _finite(value)
    if number is None:
        raise SettingError(f"{name} must be a finite number, got {value!r}")
    return number


def _finite(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.array(logits, dtype=np.float64)        # a copy, then in place: one array for the whole call
    z -= z.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


def unit_price(cost) -> float:
    """The rule's one price for a candidate, USD per million tokens: the mean of its input and output prices
    (the router chooses before any answer's length is known). The one home of that price: the Router,
    `zooter eval`'s decisions, the Triton repository and export all take it from here.

    `cost`: a bundle's cost entry (its exported "unit" when it has one), anything with input_per_mtok and
    output_per_mtok (zooter.serving.candidates.Cost), or a number (already a unit price)."""
    if isinstance(cost, dict):
        if "unit" in cost:
            return float(cost["unit"])
        return (float(cost["input_per_mtok"]) + float(cost["output_per_mtok"])) / 2
    if hasattr(cost, "input_per_mtok"):
        return (float(cost.input_per_mtok) + float(cost.output_per_mtok)) / 2
    return float(cost)


def unit_prices(costs, labels) -> np.ndarray | None:
    """unit_price of every label's cost ({label: cost}), in label order; None without costs."""
    if not costs:
        return None
    return np.array([unit_price(costs[name]) for name in labels], dtype=np.float64)


@dataclass(frozen=True)
class Table:
    """A monotone map shipped as knots and applied with np.interp, clamped at the ends."""

    x: tuple[float, ...]
    y: tuple[float, ...]

    @cached_property
    def knots(self) -> tuple[np.ndarray, np.ndarray]:
        """x and y as arrays, made once: np.interp would convert the tuples at every call."""
        return np.array(self.x, dtype=np.float64), np.array(self.y, dtype=np.float64)

    def __call__(self, values) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if len(self.x) == 1:
            return np.full(values.shape, self.y[0])
        return np.interp(values, *self.knots)

    def to_json(self) -> dict:
        return {"x": list(self.x), "y": list(self.y)}

    @classmethod
    def from_json(cls, obj, name: str) -> "Table":
        if not isinstance(obj, dict) or not isinstance(obj.get("x"), list) or not isinstance(obj.get("y"), list):
            raise SettingError(f"{name} must be an object {{x: [...], y: [...]}}")
        if not obj["x"] or len(obj["x"]) != len(obj["y"]):
            raise SettingError(f"{name}: x and y must be non-empty lists of the same length")
        x = [check_number(v, f"{name}.x") for v in obj["x"]]
        y = [check_number(v, f"{name}.y") for v in obj["y"]]
        if any(b < a for a, b in zip(x, x[1:])) or any(b < a for a, b in zip(y, y[1:])):
            raise SettingError(f"{name}: x and y must be non-decreasing (a monotone map)")
        return cls(tuple(x), tuple(y))


@dataclass
class Choices:
    """Decisions for a batch of queries (n rows, m candidates in label order)."""

    choice: np.ndarray        # (n,) index of the chosen candidate
    ranking: np.ndarray       # (n, m) candidate indices, choice first; -1 pads rows with disallowed candidates
    expected: np.ndarray      # (n, m) expected reward E of every candidate
    confidence: np.ndarray    # (n,) P(the choice is a best answer)
    anchored: np.ndarray      # (n,) the guard kept the anchor


@dataclass(frozen=True)
class Rule:
    labels: tuple[str, ...]
    anchor: int                   # index of the candidate best on the training rows
    margin: float                 # leave the anchor only when E_choice - E_anchor > margin
    expected_reward: Table        # raw reward-head score -> expected reward
    confidence_map: Table         # E lead of the choice over the best other -> P(choice is a best answer)
    costs: np.ndarray | None = None   # unit price per label; None when the bundle has no prices
    lam: float = 0.0
    tolerance: float = 0.0

    @classmethod
    def from_manifest(cls, manifest: dict, lam: float | None = None, tolerance: float | None = None) -> "Rule":
        """The rule router.json ships ({labels, decision, costs}, validated by zooter.runtime.bundle);
        lam/tolerance override its defaults."""
        labels = manifest["labels"]
        return cls.of(labels, manifest["decision"], unit_prices(manifest.get("costs"), labels), lam, tolerance)

    @classmethod
    def of(cls, labels, d: dict, prices=None, lam: float | None = None, tolerance: float | None = None) -> "Rule":
        """The rule from its settings (router.json `decision`) and unit prices in label order (unit_prices)."""
        labels = tuple(labels)
        return cls(labels=labels, anchor=labels.index(d["anchor"]), margin=float(d["margin"]),
                   expected_reward=Table.from_json(d["expected_reward"], "decision.expected_reward"),
                   confidence_map=Table.from_json(d["confidence"], "decision.confidence"),
                   costs=None if prices is None else np.asarray(prices, dtype=np.float64),
                   lam=check_weight(d.get("lambda", 0.0) if lam is None else lam, "lambda"),
                   tolerance=check_weight(d.get("tolerance", 0.0) if tolerance is None else tolerance, "tolerance"))

    def settings(self, lam: float | None, tolerance: float | None) -> tuple[float, float]:
        lam = self.lam if lam is None else check_weight(lam, "lambda")
        tolerance = self.tolerance if tolerance is None else check_weight(tolerance, "tolerance")
        if (lam or tolerance) and self.costs is None:
            raise SettingError(f"{'lambda' if lam else 'tolerance'} needs a price for every candidate; "
                               f"this bundle has no costs")
        return lam, tolerance

    def decide(self, probs, scores, lam: float | None = None, tolerance: float | None = None,
               allowed=None, guard: bool = True) -> Choices:
        """Decisions for (n, m) probabilities and raw reward scores. `allowed`: (m,) or (n, m) booleans."""
        lam, tolerance = self.settings(lam, tolerance)
        probs = np.atleast_2d(np.asarray(probs, dtype=np.float64))
        expected = self.expected_reward(np.atleast_2d(np.asarray(scores, dtype=np.float64)))
        n, m = probs.shape
        if expected.shape != (n, m) or m != len(self.labels):
            raise ValueError(f"probabilities {probs.shape} and rewards {expected.shape} for {len(self.labels)} labels")
        # `ok is None`: every candidate allowed (routing's usual call); each np.where(ok, x, -inf) is then x
        # itself, so that case skips them: a numpy call on one row costs about a microsecond.
        ok = None if allowed is None else np.broadcast_to(np.asarray(allowed, dtype=bool), (n, m))
        if ok is not None and not ok.any(axis=1).all():
            raise SettingError("every candidate of a query is excluded: allow at least one")
        rows = np.arange(n)
        utility = probs - (lam * self.costs / max(self.costs.max(), 1e-12) if lam else 0.0)
        choice = np.argmax(utility if ok is None else np.where(ok, utility, -np.inf), axis=1)
        anchored = np.zeros(n, dtype=bool)
        if guard:
            gain = expected[rows, choice] - expected[:, self.anchor]
            anchored = gain <= self.margin if ok is None else ok[:, self.anchor] & (gain <= self.margin)
            choice = np.where(anchored, self.anchor, choice)
        if tolerance:
            near = expected >= expected[rows, choice][:, None] - tolerance - 1e-12
            if ok is not None:
                near &= ok
            # cheapest first; among equal prices the higher expected reward
            key = np.where(near, -self.costs[None, :] * 1e6 + expected, -np.inf)
            choice = np.argmax(key, axis=1)
        others = expected.copy() if ok is None else np.where(ok, expected, -np.inf)
        chosen = expected[rows, choice]
        others[rows, choice] = np.inf
        ranking = np.argsort(-others, axis=1, kind="stable")
        if ok is not None:
            ranking = np.where(np.take_along_axis(ok, ranking, axis=1), ranking, -1)
        others[rows, choice] = -np.inf
        best_other = others.max(axis=1)
        lead = chosen - np.where(np.isfinite(best_other), best_other, chosen)
        return Choices(choice, ranking, expected, self.confidence_map(lead), anchored)
