"""A decision is a function of the query alone (issue 20): whatever else is in the list and however
long its companions are, Router.route_batch answers each query exactly as Router.route answers it
alone, for the dynamic INT8 bundle whose padded batches used to change decisions."""

import numpy as np

from tiny import SEEDS
from zooter.runtime.router import Router

# Short queries (about 5-10 tokens) beside long ones (about 10x longer), interleaved, so every batch
# mixes lengths and the short ones are padded to the long ones in a shared batch.
SHORT = ["hi", "Why?", *SEEDS]
LONG = [" ".join(SEEDS[i:] + SEEDS[:i]) for i in range(len(SHORT))]
MIXED = [q for pair in zip(SHORT, LONG) for q in pair] * 2   # 48 queries


def decision(d) -> dict:
    out = d.to_json()
    out.pop("latency_ms")
    return out


def test_the_fixture_is_one_where_padded_batches_change_answers(bundles):
    """Today's padded batches answer differently from routing alone on these queries: the test below
    has something to catch."""
    router = Router.load(bundles["int8"])
    tokens = [len(router.tokenizer.encode(q).ids) for q in SHORT + LONG]
    assert max(tokens) >= 10 * min(tokens)
    alone = np.vstack([router.outputs_of([q])[0] for q in MIXED])
    padded = router.outputs_of(MIXED, batch_size=32, padded=True)[0]
    assert np.abs(padded - alone).max() > 1e-4


def test_route_batch_equals_route_for_every_batch_size_and_mix_of_lengths(bundles):
    router = Router.load(bundles["int8"])
    alone = [decision(router.route(q)) for q in MIXED]
    assert len({d["candidate"] for d in alone}) >= 2
    for size in (1, 8, 32, len(MIXED)):
        got = [decision(d) for start in range(0, len(MIXED), size)
               for d in router.route_batch(MIXED[start:start + size], batch_size=size)]
        assert got == alone, f"batches of {size}"
    # The same query answers the same beside a long companion, a short one, or many of itself.
    query = SHORT[3]
    for companions in ([LONG[0]], [SHORT[0]], [query] * 7, LONG):
        assert decision(router.route_batch([*companions, query])[-1]) == decision(router.route(query))
