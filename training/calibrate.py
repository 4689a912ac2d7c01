"""The decision layer of a router, fitted after its distilled head; zooter.runtime.decision.Rule applies it.

    reward head   ridge regression of the rewards on the pooled embeddings, in closed form. With the
                  INT8 encoder's embeddings stacked under the fp32 ones and a penalty on the difference
                  of a query's two scores (the least-squares form of quantization-aware training). Its
                  strength is chosen by out-of-fold error.
    fitting rows  held-out predictions: the dev rows and, for head-only runs, every training row
                  predicted by heads fitted without it (folds by query hash)
    calibration   isotonic regression of the realised reward on the head's score, pooled over the
                  (row, scored candidate) pairs of the fitting rows: E, the expected reward
    margin        the guard's: of a grid, the one whose paired gain over the anchor (the training-best
                  candidate) on the fitting rows has the best lower confidence bound, mean - sd/sqrt(n);
                  when no margin's bound is above 0, the router always keeps the anchor. An added
                  candidate's gain where it is not labelled is imputed from its estimated reward and
                  that estimate's error on its labelled rows (_margin)
    confidence    isotonic map from the choice's expected-reward lead over the best other candidate to
                  "the choice was a best answer"
docs/training.md has the measurements behind each choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zooter.runtime.decision import Rule, Table

STRENGTHS = (0.3, 1.0, 3.0, 10.0)     # ridge strength, in units of the mean feature variance
MARGINS = (-0.1, -0.05, -0.03, -0.02, -0.01, 0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2)
MAX_KNOTS = 64
# How much more a difference between a query's fp32 and INT8 scores costs than a fit error of the same size.
# Stacking alone left the guard's E(choice) - E(anchor) moving by 0.005 (median) under INT8 rounding, and on
# dcrouter's full file ~2% of decisions flipped between two near-equal candidates: the INT8 gate failed for
# 3 of 3 seeds (+0.0035..+0.0053). At 1000 it passed for 3 of 3 with routing unchanged in 5-fold CV
# (+0.0266 vs +0.0267); docs/training.md, "Why the default is the head-only router".
INT8_CONSISTENCY = 1000.0
INNER_FOLD_SEED = 3                   # independent of the data split (0), dev hold-out (1) and CV folds (2)


def inner_folds(queries, k: int) -> list[np.ndarray]:
    """k folds of row indices by query hash (the same query always lands in the same fold)."""
    from zooter.training.splits import query_hash

    fold = np.array([min(int(query_hash(q, seed=INNER_FOLD_SEED) * k), k - 1) for q in queries])
    return [np.flatnonzero(fold == j) for j in range(k)]


def ridge(x: np.ndarray, rewards: np.ndarray, strength: float, x_int8: np.ndarray | None = None):
    """(weight (labels, hidden), bias (labels,)) of the expected-reward head. A null reward counts as the
    candidate's mean (it pulls nothing either way). With the INT8 encoder's embeddings, the loss also holds
    INT8_CONSISTENCY * ||(x - x_int8) W||^2: the head learns to score a query alike from both encoders."""
    xs = np.vstack([x, x_int8]) if x_int8 is not None else x
    ys = np.vstack([rewards, rewards]) if x_int8 is not None else rewards
    xs, ys = xs.astype(np.float64), ys.astype(np.float64)
    mean_x, mean_y = xs.mean(0), np.nanmean(ys, 0)
    z, y = xs - mean_x, np.nan_to_num(ys - mean_y)
    lam = strength * z.var(0).mean() * len(z)
    penalty = 0.0
    if x_int8 is not None:
        d = (x - x_int8).astype(np.float64)
        penalty = INT8_CONSISTENCY * (d.T @ d)
    weight = np.linalg.solve(z.T @ z + lam * np.eye(z.shape[1]) + penalty, z.T @ y).T
    return weight, mean_y - weight @ mean_x


def scores(head, x: np.ndarray) -> np.ndarray:
    weight, bias = head
    return x.astype(np.float64) @ weight.T + bias


def choose_strength(x, rewards, folds, x_int8=None) -> float:
    """The ridge strength with the least out-of-fold squared error over the scored rewards."""
    scored = ~np.isnan(rewards)

    def error(strength):
        total = 0.0
        for held in folds:
            rest = np.setdiff1d(np.arange(len(x)), held)
            head = ridge(x[rest], rewards[rest], strength, None if x_int8 is None else x_int8[rest])
            diff = scores(head, x[held]) - rewards[held]
            total += float(np.sum(np.where(scored[held], diff, 0.0) ** 2))
        return total

    return min(STRENGTHS, key=error)


def weighted_se(d: np.ndarray, w: np.ndarray) -> float:
    """The standard error of np.average(d, weights=w), sd / sqrt(n) when the weights are equal."""
    n = len(d)
    share = w / np.sum(w)
    return float(np.sqrt(n / (n - 1) * np.sum(share ** 2 * (d - np.sum(share * d)) ** 2)))


def isotonic(x, y, max_knots: int = MAX_KNOTS) -> Table:
    """Pool-adjacent-violators fit of y on x, as at most `max_knots` knots for np.interp."""
    order = np.argsort(np.asarray(x, dtype=np.float64), kind="stable")
    x, y = np.asarray(x, dtype=np.float64)[order], np.asarray(y, dtype=np.float64)[order]
    values, weights, centres = [], [], []
    for xi, yi in zip(x, y):
        values.append(yi), weights.append(1.0), centres.append(xi)
        while len(values) > 1 and values[-2] >= values[-1]:
            w = weights[-2] + weights[-1]
            values[-2:] = [(values[-2] * weights[-2] + values[-1] * weights[-1]) / w]
            centres[-2:] = [(centres[-2] * weights[-2] + centres[-1] * weights[-1]) / w]
            weights[-2:] = [w]
    centres, values = np.array(centres), np.array(values)
    if len(centres) > max_knots:
        keep = np.unique(np.linspace(0, len(centres) - 1, max_knots).round().astype(int))
        centres, values = centres[keep], values[keep]
    return Table(tuple(float(v) for v in centres), tuple(float(v) for v in values))


def lead(expected: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """The choice's expected reward minus the best other candidate's."""
    rows = np.arange(len(choice))
    others = expected.copy()
    others[rows, choice] = -np.inf
    return expected[rows, choice] - others.max(axis=1)


@dataclass
class FittingRows:
    """Held-out predictions the decision layer is fitted on."""

    probs: np.ndarray          # (n, m) distilled probabilities
    scores: np.ndarray         # (n, m) raw expected-reward scores
    rewards: np.ndarray        # (n, m) realised rewards (NaN: not scored)
    oof: bool                  # training rows predicted out of fold are among them
    partial: tuple = ()        # candidates labelled on some rows only (added ones): their gain where unlabelled
                               # is imputed for the margin (see _margin)
    weights: np.ndarray | None = None   # (n, m) a partial candidate's labelled rows' weights: 1 / the chance
                                        # each was picked for labelling, scaled (None: equal)
    estimates: np.ndarray | None = None   # (n, m) a partial candidate's reward estimated on every row, held out
                                          # where it is labelled (lifecycle.held_out_estimates); NaN elsewhere


def fit_decision(rows: FittingRows, labels: list[str], anchor: str) -> dict:
    """router.json's `decision` block (less the knobs' defaults): calibration, margin, confidence."""
    r, s = rows.rewards, rows.scores
    scored = ~np.isnan(r)
    expected_reward = isotonic(s[scored], r[scored])
    expected = expected_reward(s)
    a = labels.index(anchor)
    span = max(expected_reward.y) - min(expected_reward.y)
    margin = _margin(rows.probs, expected, r, a, span, rows.partial, rows.weights, rows.estimates)
    # With the margin fitted: how often the guarded choice is a best answer, by its expected-reward lead.
    rule = Rule(tuple(labels), a, margin, expected_reward, Table((0.0,), (1.0,)))
    choice = rule.decide(rows.probs, s, allowed=scored).choice
    picked = r[np.arange(len(r)), choice]
    best = np.nanmax(r, axis=1)
    leads = lead(np.where(scored, expected, -np.inf), choice)
    # A row with one scored candidate has no lead (inf): it says nothing about confidence.
    ok = np.isfinite(leads)
    confidence = (isotonic(leads[ok], (picked >= best - 1e-12)[ok].astype(float)) if ok.any()
                  else Table((0.0,), (1.0,)))
    return {"anchor": anchor, "margin": margin, "expected_reward": expected_reward.to_json(),
            "confidence": confidence.to_json(),
            "fitted_on": {"rows": int(len(r)), "out_of_fold": rows.oof}}


def _margin(probs, expected, rewards, anchor: int, span: float, partial=(), weights=None, estimates=None) -> float:
    """The guard's margin (see the module's doc). "Always keep the anchor" is a margin above any
    possible gain (the span of expected rewards), so it stays a finite number in router.json.

    A `partial` candidate (added, labelled on some rows) may be chosen on every row; where it is chosen
    but not labelled, its gain over the anchor is imputed: its estimated gain on that row (`estimates`, its
    reward estimated from the other candidates' rewards on the row and its embedding, less the anchor's
    reward; 0 without estimates) plus the mean error of that estimate on its labelled rows where it is
    chosen too and the anchor's reward is in the same quarter (anchor_cells), weighted by `weights` (1 /
    each row's chance to be picked for labelling). A difference estimate: only the estimate's error is
    sampled, not the gain itself, so the imputed gain follows the row (on dcrouter the mean of 500 labelled
    rows' gains alone shut the guard on folds where the newcomer gains; docs/training.md, fourth pass).
    The rows it was labelled on may have been picked where the anchor scored low (`pick --how anchor`),
    never by more than the anchor's reward, so within a cell they stand for the others; and the anchor's
    reward is known on every row. The bound's standard error adds each imputed mean's own
    (post-stratification). When the added candidate is the anchor, the gain is known only on its labelled
    rows: there the mean and its standard error weight each row by its weight (Horvitz-Thompson)."""
    rows = np.arange(len(probs))
    scored = ~np.isnan(rewards)
    allowed = scored.copy()
    allowed[:, list(partial)] = True
    choice = np.argmax(np.where(allowed, probs, -np.inf), axis=1)
    gain = expected[rows, choice] - expected[:, anchor]
    base = rewards[:, anchor]
    cells = anchor_cells(base) if len(partial) else None
    own = None if weights is None or anchor not in partial else weights[:, anchor]
    if own is not None and len(np.unique(own[~np.isnan(base)])) < 2:
        own = None                 # picked uniformly: equal weights, the plain mean
    best, best_bound = round(span + 0.01, 4), 0.0
    for margin in (-(span + 0.01), *MARGINS):
        picked = np.where(gain > margin, choice, anchor)
        d = rewards[rows, picked] - base
        extra = 0.0
        for j in partial:
            prior = None if estimates is None else estimates[:, j] - base
            extra += _impute(d, (picked == j) & ~np.isnan(base), cells,
                             np.ones(len(d)) if weights is None else weights[:, j], prior)
        ok = ~np.isnan(d)
        d = d[ok]
        if len(d) < 2:
            continue
        if own is None:
            se = d.std(ddof=1) / np.sqrt(len(d))   # (a trained run: as before, to the last bit)
            bound = d.mean() - (np.sqrt(se ** 2 + extra / len(d) ** 2) if extra else se)
        else:
            bound = np.average(d, weights=own[ok]) - np.sqrt(weighted_se(d, own[ok]) ** 2 + extra / len(d) ** 2)
        if bound > best_bound + 1e-12:
            best, best_bound = float(margin), bound
    return best


def anchor_cells(base: np.ndarray) -> np.ndarray:
    """Each row's quarter of the anchor's reward (fewer cells where rewards tie, as 0/1 rewards do)."""
    known = base[~np.isnan(base)]
    edges = np.unique(np.quantile(known, [0.25, 0.5, 0.75])) if len(known) else np.zeros(0)
    return np.searchsorted(edges, base, side="left")


def _impute(d: np.ndarray, chosen: np.ndarray, cells: np.ndarray, weights: np.ndarray, prior=None) -> float:
    """Fill d where `chosen` and unknown (see _margin), in place: `prior` (its estimate on each row, 0 where
    None or NaN) plus the mean error of the prior on the known rows of the cell. Returns the sum over the
    filled rows of that mean's variance (times the rows filled from it, squared)."""
    known = ~np.isnan(d)
    prior = np.zeros(len(d)) if prior is None else np.nan_to_num(prior)
    extra = 0.0
    for c in np.unique(cells[chosen]):
        miss = chosen & (cells == c) & ~known
        if not miss.any():
            continue
        lab = chosen & (cells == c) & known
        if lab.sum() < 2:          # too few labelled rows in the cell: the candidate's labelled rows where chosen
            lab = chosen & known
        if lab.sum() < 2:
            continue               # nothing to impute from: these rows stay out, as unscored rows did
        w, error = weights[lab], d[lab] - prior[lab]
        d[miss] = prior[miss] + np.average(error, weights=w)
        extra += miss.sum() ** 2 * weighted_se(error, w) ** 2
    return extra
