"""Parity gate: does the exported model decide like the PyTorch router it came from?

Both are run on the same token ids (zooter.runtime.tokenize.encode, used by the Router and the
TorchRouter alike), so the figures measure the model conversion alone, and both decide by the rule
the bundle ships (zooter.runtime.decision.Rule: guard and default tolerance included).

The gate fails when quantization changes decisions that matter:
  - agreement on the CLEAR decisions is below 99%: decisions where PyTorch's distilled choice leads
    the runner-up by more than 0.05 in log probability and the guard is not within 0.01 reward of
    its margin (a flip there is a real change, not a rounding of a near-tie);
  - the routed reward moves by more than 0.003 (when the rows carry rewards), or, without rewards,
    the expected regret (PyTorch's expected reward of its own choice minus that of the exported
    model's choice) is above 0.002.
Overall agreement is recorded too; docs/export-runtime.md explains the definition.
"""

from __future__ import annotations

import numpy as np

from zooter.runtime.decision import Rule
from zooter.runtime.errors import UserError

MIN_CLEAR_AGREEMENT = 0.99
MAX_REWARD_CHANGE = 0.003
MAX_EXPECTED_REGRET = 0.002
CLEAR_LOG_P_GAP = 0.05
CLEAR_GUARD_SLACK = 0.01


class ParityError(UserError):
    """The quantized model changes decisions that matter too often to ship."""


def compare(rule: Rule, reference: tuple[np.ndarray, np.ndarray], exported: tuple[np.ndarray, np.ndarray],
            rewards: np.ndarray | None = None) -> dict:
    """Parity figures of `exported` (probabilities, raw reward scores) against `reference`."""
    ref_probs, ref_scores = reference
    probs, scores = exported
    if ref_probs.shape != probs.shape or ref_scores.shape != scores.shape:
        raise ParityError(f"output shapes differ: {ref_probs.shape} vs {probs.shape}")
    allowed = None if rewards is None else ~np.isnan(rewards)
    ref, got = rule.decide(ref_probs, ref_scores, allowed=allowed), rule.decide(probs, scores, allowed=allowed)
    same = ref.choice == got.choice
    rows = np.arange(len(same))
    log_p = np.sort(np.log(np.clip(ref_probs, 1e-30, None)), axis=1)
    gap = log_p[:, -1] - log_p[:, -2]
    distilled = np.argmax(ref_probs if allowed is None else np.where(allowed, ref_probs, -np.inf), axis=1)
    slack = np.abs(ref.expected[rows, distilled] - ref.expected[:, rule.anchor] - rule.margin)
    clear = (gap > CLEAR_LOG_P_GAP) & (slack > CLEAR_GUARD_SLACK)
    out = {"n": int(len(same)), "decision_agreement": float(same.mean()),
           "clear_share": float(clear.mean()), "clear_agreement": float(same[clear].mean()) if clear.any() else 1.0,
           "expected_regret": float(np.mean(ref.expected[rows, ref.choice] - ref.expected[rows, got.choice])),
           "max_prob_diff": float(np.abs(ref_probs - probs).max()),
           "max_expected_reward_diff": float(np.abs(ref.expected - got.expected).max()),
           # how near the flips were: PyTorch's log-p lead of its distilled choice
           "reference_log_p_gap_p50": float(np.median(gap)),
           "max_flipped_log_p_gap": float(gap[~same].max()) if (~same).any() else 0.0}
    if rewards is not None:
        torch_reward = float(np.nanmean(rewards[rows, ref.choice]))
        exported_reward = float(np.nanmean(rewards[rows, got.choice]))
        out["routed_reward"] = {"pytorch": torch_reward, "exported": exported_reward,
                                "difference": exported_reward - torch_reward}
    out["passed"] = bool(out["clear_agreement"] >= MIN_CLEAR_AGREEMENT and (
        abs(out["routed_reward"]["difference"]) <= MAX_REWARD_CHANGE if rewards is not None
        else out["expected_regret"] <= MAX_EXPECTED_REGRET))
    return out


def gate(parity: dict, allow_drift: bool) -> None:
    if parity["passed"]:
        return
    message = (f"parity gate: the {parity.get('model', 'exported')} model agrees with PyTorch on "
               f"{parity['clear_agreement']:.2%} of the {parity['clear_share']:.0%} clear decisions of {parity['n']} "
               f"(needs >= {MIN_CLEAR_AGREEMENT:.0%}; all decisions {parity['decision_agreement']:.2%})")
    if "routed_reward" in parity:
        r = parity["routed_reward"]
        message += (f"; mean routed reward {r['exported']:.4f} vs PyTorch {r['pytorch']:.4f} "
                    f"(may move by {MAX_REWARD_CHANGE})")
    else:
        message += f"; expected regret {parity['expected_regret']:.4f} (at most {MAX_EXPECTED_REGRET})"
    if not allow_drift:
        raise ParityError(message + "; try --quantize none or fp16, or pass --allow-drift to ship it anyway")
