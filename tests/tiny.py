"""What several test modules build from: the tiny router (labels, prices, queries, an untrained run
with clear margins) and synthetic routing data whose best candidate follows the query's topic.
Fixtures that build them once per session are in conftest.py."""

from __future__ import annotations

import random
from pathlib import Path

from zooter.training.dataset import RoutingDataset, Row

LABELS = ["alpha-7b", "beta-70b", "gamma-8b", "delta-1b"]
PRICES = {"alpha-7b": (0.2, 0.2), "beta-70b": (0.9, 0.9), "gamma-8b": (0.1, 0.1), "delta-1b": (0.02, 0.04)}

# Varied queries (short, long, code, maths) for the parity check and the decision comparisons.
SEEDS = ["What is 17 times 23?", "Write a sonnet about the sea.", "def add(a, b): return a + b  # explain",
         "Translate 'good morning' to French.", "Which planet has the most moons?",
         "Prove that there are infinitely many primes.", "Summarise the plot of Hamlet in two sentences.",
         "How do I reverse a linked list in C?", "Give three tips for a job interview.",
         "A bat and a ball cost 1.10 in total; the bat costs 1.00 more than the ball. How much is the ball?"]
TEXTS = [f"{a} {b}" if i % 3 else a for i, (a, b) in enumerate((a, b) for a in SEEDS for b in SEEDS[:4])]


def plain_decision(labels: list[str]) -> dict:
    """A decision layer that leaves routing to the distilled head: the guard never holds the anchor
    (a margin below any gain), expected rewards are the raw scores, confidence rises with the lead."""
    return {"anchor": labels[0], "margin": -100.0, "expected_reward": {"x": [-100.0, 100.0], "y": [-100.0, 100.0]},
            "confidence": {"x": [-1.0, 1.0], "y": [0.0, 1.0]}, "fitted_on": {"rows": 0, "out_of_fold": False}}


def make_tiny_run(backbone: Path, run: Path, seed: int = 1) -> Path:
    """An untrained router on the tiny backbone whose head reads the embedding's deviation from the mean
    query, scaled to unit spread: decisions then vary from query to query with clear margins, as a
    trained router's do, instead of one candidate winning everything by a hair. Another `seed`: other heads on
    the same encoder (a router that can replace this one in service)."""
    import torch

    from zooter.training.model import RouterModel

    torch.manual_seed(seed)
    model, tokenizer = RouterModel.from_backbone(backbone, LABELS)
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        emb = model.eval().embed(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        mean, std = emb.mean(0), emb.std(0).clamp(min=1e-6)
        weight = torch.randn(len(LABELS), emb.shape[1]) / std / emb.shape[1] ** 0.5 * 10
        model.head.weight.copy_(weight)
        model.head.bias.copy_(-(weight @ mean))
        # Expected rewards: other directions of the same spread, about 0.5 +- 0.2 around the mean query.
        reward = torch.randn(len(LABELS), emb.shape[1]) / std / emb.shape[1] ** 0.5 * 0.2
        model.set_reward_head(reward.numpy(), (0.5 - reward @ mean).numpy())
    model.save(run, tokenizer, {"max_length": 128, "data_sha256": "0" * 64, "backbone": str(backbone), "beta": 0.3,
                                "tau": 1.0, "loss": "kl", "seed": seed,
                                "best_single": {"candidate": "alpha-7b", "mean_reward": 0.5},
                                "dev": {"mean_reward": 0.5, "n": len(TEXTS)}, "decision": plain_decision(LABELS)})
    return run



CANDIDATES = ["mathy", "poet", "coder"]
TOPICS = {
    "mathy": ["solve for x: {n} x + {m} = 0", "what is {n} times {m}?", "compute the integral of x^{n}"],
    "poet": ["write a poem about the {w}", "a haiku on {w} please", "compose a sonnet about {w}"],
    "coder": ["fix this python function: def f({w}): return {n}", "write a sql query selecting {w}", "debug my javascript {w} loop"],
}
WORDS = ["sea", "moon", "city", "forest", "rain", "train", "river", "snow", "fire", "glass"]


def synthetic(n: int, seed: int) -> RoutingDataset:
    """Queries whose best candidate is their topic's specialist (with some noise); tags name the topic."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = CANDIDATES[i % 3]
        text = rng.choice(TOPICS[topic]).format(n=rng.randint(2, 99), m=rng.randint(2, 99), w=rng.choice(WORDS))
        rewards = {c: round(rng.uniform(0.0, 0.3), 3) for c in CANDIDATES}
        rewards[topic] = round(rng.uniform(0.7, 1.0), 3)
        rows.append(Row(f"{seed}-{i}", f"{text} #{i}", rewards, [f"topic:{topic}"], source="synthetic"))
    return RoutingDataset(rows, CANDIDATES)
