"""The decision layer on synthetic pools with known answers: the temperature rule, the guard that never
loses to the best single, the isotonic maps."""

from __future__ import annotations

import numpy as np
import pytest

from zooter.runtime.decision import Rule
from zooter.training.calibrate import FittingRows, fit_decision, isotonic
from zooter.training.labels import AllEqualRewards, auto_tau

LABELS = ["a", "b", "c", "d"]


def test_auto_tau_is_sharper_for_a_narrow_reward_spread():
    rng = np.random.default_rng(0)
    wide = rng.uniform(0, 1, (300, 4))
    narrow = 0.5 + (wide - 0.5) * 0.1
    assert auto_tau(narrow) < auto_tau(wide)
    assert auto_tau(narrow) == pytest.approx(auto_tau(wide) * 0.1)
    # Tied rows say nothing about the scale: adding them changes nothing.
    assert auto_tau(np.vstack([wide, np.full((300, 4), 0.4)])) == pytest.approx(auto_tau(wide))
    with pytest.raises(AllEqualRewards, match="nothing to route on"):
        auto_tau(np.full((5, 3), 0.7))


def pool(signal: bool, n: int, seed: int) -> FittingRows:
    """Four candidates, `a` best on average. With signal, each query has a topic whose specialist
    answers far better, and the router's outputs point at it; without, the outputs are noise."""
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, 4, n)
    rewards = (rng.random((n, 4)) < np.array([0.6, 0.5, 0.5, 0.5])).astype(float)
    if signal:
        rewards[np.arange(n), topic] = (rng.random(n) < 0.95).astype(float)
        scores = 0.5 + 0.4 * np.eye(4)[topic] + rng.normal(0, 0.1, (n, 4))
    else:
        scores = 0.5 + rng.normal(0, 0.15, (n, 4))
    probs = np.exp(scores * 5) / np.exp(scores * 5).sum(1, keepdims=True)
    return FittingRows(probs, scores, rewards, oof=True)


def decide(decision: dict, rows: FittingRows):
    return Rule.from_manifest({"labels": LABELS, "decision": decision}).decide(rows.probs, rows.scores)


def test_the_guard_keeps_the_best_single_where_queries_carry_no_signal():
    decision = fit_decision(pool(False, 3000, 1), LABELS, "a")
    fresh = pool(False, 3000, 2)
    made = decide(decision, fresh)
    assert made.anchored.mean() == 1.0                    # always the best single
    picked = fresh.rewards[np.arange(3000), made.choice]
    assert picked.mean() == pytest.approx(fresh.rewards[:, 0].mean())
    # Without the guard, argmax of noise would have lost to the best single.
    assert fresh.rewards[np.arange(3000), fresh.probs.argmax(1)].mean() < fresh.rewards[:, 0].mean() - 0.03


def test_the_guard_leaves_the_best_single_where_the_queries_say_so():
    decision = fit_decision(pool(True, 3000, 3), LABELS, "a")
    fresh = pool(True, 3000, 4)
    made = decide(decision, fresh)
    assert made.anchored.mean() < 0.5
    picked = fresh.rewards[np.arange(3000), made.choice]
    assert picked.mean() > fresh.rewards[:, 0].mean() + 0.15
    # Expected rewards are calibrated: the choice's expected reward matches what it earns.
    assert made.expected[np.arange(3000), made.choice].mean() == pytest.approx(picked.mean(), abs=0.03)
    # Confidence is a probability of the choice being a best answer, and means it.
    best = picked >= fresh.rewards.max(1)
    assert made.confidence.mean() == pytest.approx(best.mean(), abs=0.05)


def test_isotonic_fit_is_monotone_and_thinned():
    rng = np.random.default_rng(0)
    x = rng.random(5000)
    y = (rng.random(5000) < x).astype(float)
    table = isotonic(x, y, max_knots=16)
    assert len(table.x) <= 16 and list(table.y) == sorted(table.y)
    assert table(np.array([0.1, 0.5, 0.9])) == pytest.approx([0.1, 0.5, 0.9], abs=0.08)


def test_the_reward_head_scores_a_query_alike_from_the_fp32_and_int8_embeddings():
    """The INT8 encoder's rounding moves an embedding along a few fixed directions; stacking the two sets of
    embeddings alone still lets the head lean on those directions, the consistency penalty does not, and the
    fit to the rewards barely changes."""
    from zooter.training import calibrate

    rng = np.random.default_rng(0)
    n, hidden = 2000, 16
    x = rng.normal(size=(n, hidden))
    rewards = x[:, :4] @ rng.normal(size=(4, 3)) * 0.1 + 0.5
    rounding = rng.normal(size=(2, hidden))                    # the directions the INT8 encoder's error takes:
    rounding[:, :4] *= 0.2                                     # mostly apart from what the rewards depend on
    x_int8 = x + rng.normal(size=(n, 2)) @ rounding * 0.05
    test = rng.normal(size=(500, hidden))
    test_int8 = test + rng.normal(size=(500, 2)) @ rounding * 0.05

    def fitted(weight):
        old, calibrate.INT8_CONSISTENCY = calibrate.INT8_CONSISTENCY, weight
        try:
            head = calibrate.ridge(x, rewards, 0.3, x_int8)
        finally:
            calibrate.INT8_CONSISTENCY = old
        moved = np.abs(calibrate.scores(head, test) - calibrate.scores(head, test_int8)).mean()
        error = np.sqrt(np.mean((calibrate.scores(head, x) - rewards) ** 2))
        return moved, error

    moved_stacked, error_stacked = fitted(0.0)
    moved, error = fitted(calibrate.INT8_CONSISTENCY)
    assert moved < 0.2 * moved_stacked
    assert error < error_stacked * 1.1 + 1e-3
