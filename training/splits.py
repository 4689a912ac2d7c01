"""Deterministic splits by a hash of the normalised query, de-duplication across files, and the
compact record of a run's queries that lets `zooter eval` tell how much of its data the router saw.

Hashing the query (not the row id or position) means one query text never lands in two splits,
and the same file always splits the same way for a given seed. Exact duplicates across files are a
known trap: the public dcrouter test split repeats 119 of its train queries; `dedupe` removes them.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Sequence

from zooter.training.dataset import RoutingDataset

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    return _SPACE.sub(" ", text.strip().lower())


def query_hash(text: str, seed: int = 0) -> float:
    """A number in [0, 1) fixed by the normalised text and the seed."""
    digest = hashlib.sha256(f"{seed}\x00{normalize(text)}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_indices(queries: Sequence[str], dev: float = 0.1, test: float = 0.1, seed: int = 0) -> dict[str, list[int]]:
    if not (0 <= dev < 1 and 0 <= test < 1 and dev + test < 1):
        raise ValueError(f"dev={dev} and test={test} must be fractions in [0, 1) summing below 1")
    out: dict[str, list[int]] = {"train": [], "dev": [], "test": []}
    for i, text in enumerate(queries):
        h = query_hash(text, seed)
        name = "test" if h < test else "dev" if h < test + dev else "train"
        out[name].append(i)
    return out


def split(data: RoutingDataset, dev: float = 0.1, test: float = 0.1, seed: int = 0) -> dict[str, RoutingDataset]:
    return {name: data.subset(idx) for name, idx in split_indices(data.queries, dev, test, seed).items()}


def dedupe(data: RoutingDataset, against: RoutingDataset) -> tuple[RoutingDataset, int]:
    """Rows of `data` whose normalised query does not occur in `against`; returns (kept, removed count)."""
    seen = {normalize(q) for q in against.queries}
    keep = [i for i, q in enumerate(data.queries) if normalize(q) not in seen]
    return data.subset(keep), len(data) - len(keep)


DIGEST_BYTES = 8
DIGEST_SCHEME = f"sha256 of the normalised query (zooter.training.splits.normalize), first {DIGEST_BYTES} bytes, sorted, base64"


def _digest(text: str) -> bytes:
    return hashlib.sha256(normalize(text).encode("utf-8")).digest()[:DIGEST_BYTES]


def query_digests(queries: Sequence[str]) -> str:
    """The set of the queries' normalised texts, DIGEST_SCHEME: 8 bytes a distinct query (about
    48 kB of run.json for dcrouter's 4,536 training queries), and no query text in it."""
    return base64.b64encode(b"".join(sorted({_digest(q) for q in queries}))).decode("ascii")


def seen_in(queries: Sequence[str], digests: str) -> list[bool]:
    """For each query, whether its normalised text is in the set `query_digests` recorded."""
    raw = base64.b64decode(digests)
    known = {raw[i:i + DIGEST_BYTES] for i in range(0, len(raw), DIGEST_BYTES)}
    return [_digest(q) in known for q in queries]
