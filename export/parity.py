"""Parity gate: does the exported model decide like the PyTorch router it came from?

Every engine sees the same token ids (runtime.tokenize.encode), so the figures measure the model
conversion alone. Decisions use the shared rule (runtime.decision.choose, lambda = 0).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from zooter.errors import UserError
from zooter.runtime import decision as rule
from zooter.runtime.tokenize import encode

MIN_AGREEMENT = 0.99


class ParityError(UserError):
    """The quantized model disagrees with PyTorch too often to ship."""


def _batches(tokenizer, texts: Sequence[str], max_length: int, batch_size: int):
    # Batches of similar length waste little compute on padding; results come back in input order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, encode(tokenizer, [texts[i] for i in idx], max_length)


def torch_probabilities(model, tokenizer, texts, max_length: int, inputs: Sequence[str], batch_size: int = 32, progress=None) -> np.ndarray:
    import torch

    out = np.zeros((len(texts), len(model.labels)))
    with torch.inference_mode():
        for idx, feeds in _batches(tokenizer, texts, max_length, batch_size):
            logits = model(**{k: torch.from_numpy(feeds[k]) for k in inputs})["logits"]
            out[idx] = rule.softmax(logits.float().numpy())
            if progress:
                progress.update(len(idx))
    return out


def onnx_probabilities(session, tokenizer, texts, max_length: int, batch_size: int = 32, progress=None) -> np.ndarray:
    names = [i.name for i in session.get_inputs()]
    out = None
    for idx, feeds in _batches(tokenizer, texts, max_length, batch_size):
        logits = session.run(["logits"], {k: feeds[k] for k in names})[0]
        if out is None:
            out = np.zeros((len(texts), logits.shape[-1]))
        out[idx] = rule.softmax(logits)
        if progress:
            progress.update(len(idx))
    return out


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
