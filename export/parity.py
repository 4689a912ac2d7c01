"""Parity gate: does the exported model decide like the PyTorch router it came from?

The caller runs every engine on the same token ids (zooter.runtime.tokenize.encode, used by both the
Router and the TorchRouter), so the figures measure the model conversion alone. Decisions use the
shared rule (zooter.runtime.decision.choose, lambda = 0).
"""

from __future__ import annotations

import numpy as np

from zooter.runtime import decision as rule
from zooter.runtime.errors import UserError

MIN_AGREEMENT = 0.99


class ParityError(UserError):
    """The quantized model disagrees with PyTorch too often to ship."""


def compare(reference: np.ndarray, probs: np.ndarray) -> dict:
    """Decision agreement (share of identical argmax choices) and the largest probability difference."""
    if reference.shape != probs.shape:
        raise ParityError(f"probability shapes differ: {reference.shape} vs {probs.shape}")
    same = rule.choose(reference) == rule.choose(probs)
    top2 = np.sort(reference, axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]  # PyTorch's lead of its choice over the runner-up
    return {"decision_agreement": float(np.mean(same)), "max_prob_diff": float(np.abs(reference - probs).max()),
            "n": int(len(probs)),
            # Flips on near-ties are expected from any rounding; these say how near.
            "reference_margin_p50": float(np.median(margin)),
            "max_flipped_margin": float(margin[~same].max()) if (~same).any() else 0.0}


def routed_reward(rewards: np.ndarray, reference: np.ndarray, probs: np.ndarray) -> dict:
    """Mean reward of the candidates each model chooses (unscored pairs skipped): what a flipped
    decision costs. Flips on near-ties between equally good candidates cost nothing."""
    rows = np.arange(len(rewards))

    def mean(p):
        return float(np.nanmean(rewards[rows, rule.choose(p)]))

    torch_reward, quantized_reward = mean(reference), mean(probs)
    return {"pytorch": torch_reward, "exported": quantized_reward, "difference": quantized_reward - torch_reward}


def gate(parity: dict, allow_drift: bool, threshold: float = MIN_AGREEMENT) -> None:
    if parity["decision_agreement"] >= threshold:
        return
    message = (f"parity gate: the {parity.get('model', 'quantized')} model agrees with PyTorch on "
               f"{parity['decision_agreement']:.2%} of {parity['n']} decisions (needs >= {threshold:.0%}; "
               f"max probability difference {parity['max_prob_diff']:.4f}")
    if "max_flipped_margin" in parity:
        message += f"; flips where PyTorch's top two were within {parity['max_flipped_margin']:.4f}"
    if "routed_reward" in parity:
        r = parity["routed_reward"]
        message += f"; mean routed reward {r['exported']:.4f} vs PyTorch {r['pytorch']:.4f}"
    message += ")"
    if not allow_drift:
        raise ParityError(message + "; try --quantize none or fp16, or pass --allow-drift to ship it anyway")
