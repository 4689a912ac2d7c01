"""Taggers for label enhancement: k-means over encoder embeddings (offline), or an LLM endpoint.

The paper tags queries with InsTag, a 7B LLM. Offline we cluster the router encoder's own mean-pooled
embeddings with k-means (cosine: unit vectors, spherical k-means) and give each query the ids of its
`per_query` nearest centroids, so a query near a boundary shares both clusters' label means.
Tags look like "kmeans:7". The optional LLM tagger asks an OpenAI-compatible chat endpoint for 1-3
short task tags a query ("llm:math").
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from zooter.runtime.errors import UserError
from zooter.training.dataset import Row, RoutingDataset


def kmeans(x: np.ndarray, k: int, seed: int = 0, iterations: int = 50) -> np.ndarray:
    """Spherical k-means with k-means++ seeding; returns unit-norm centroids (k, dim)."""
    x = _unit(np.asarray(x, dtype=np.float64))
    if len(x) < k:
        raise UserError(f"k-means needs at least k={k} queries, got {len(x)}")
    rng = np.random.default_rng(seed)
    centroids = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        # k-means++: the next seed is far (in cosine distance) from the seeds so far, with high probability.
        dist = np.clip(1.0 - np.max(x @ np.array(centroids).T, axis=1), 0.0, None)
        p = dist / dist.sum() if dist.sum() > 0 else None
        centroids.append(x[rng.choice(len(x), p=p)])
    c = np.array(centroids)
    for _ in range(iterations):
        assign = np.argmax(x @ c.T, axis=1)
        new = np.array([x[assign == j].sum(0) if (assign == j).any() else c[j] for j in range(k)])
        new = _unit(new)
        if np.allclose(new, c):
            break
        c = new
    return c


def nearest(x: np.ndarray, centroids: np.ndarray, per_query: int) -> np.ndarray:
    """Indices of each row's `per_query` nearest centroids, nearest first."""
    sims = _unit(np.asarray(x, dtype=np.float64)) @ centroids.T
    return np.argsort(-sims, axis=1, kind="stable")[:, :per_query]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


def kmeans_tags(queries: Sequence[str], *, k: int = 16, per_query: int = 2, backbone: str | None = None,
                max_length: int = 128, centroids: str | None = None, seed: int = 0) -> tuple[list[list[str]], dict]:
    """Tags "kmeans:<id>" for each query; centroids loaded from / saved to an .npz when a path is given."""
    from zooter.training.model import RouterModel, default_backbone
    from zooter.training.embed import embed_texts

    backbone = backbone or default_backbone()
    model, tokenizer = RouterModel.from_backbone(backbone, ["_", "__"])  # the head is unused: embeddings only
    x = embed_texts(model, tokenizer, list(queries), max_length, progress="embedding")
    path = Path(centroids) if centroids else None
    if path is not None and path.is_file():
        saved = np.load(path)
        c, source = saved["centroids"], f"loaded from {path}"
        if c.shape[1] != x.shape[1]:
            raise UserError(f"{path}: centroids are {c.shape[1]}-dimensional but {backbone} embeds in {x.shape[1]}")
    else:
        c = kmeans(x, k, seed=seed)
        source = "fitted here"
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, centroids=c, backbone=str(backbone), max_length=max_length)
            source = f"fitted and saved to {path}"
    if per_query > len(c):
        raise UserError(f"--per-query {per_query} exceeds the {len(c)} centroids")
    ids = nearest(x, c, per_query)
    return [[f"kmeans:{j}" for j in row] for row in ids], {"k": len(c), "source": source}


def with_tags(data: RoutingDataset, new_tags: Sequence[Sequence[str]], replace: bool = False) -> RoutingDataset:
    """A copy of the data with the new tags added to (or replacing) each row's tags."""
    rows = []
    for row, extra in zip(data.rows, new_tags):
        merged = list(extra) if replace else list(dict.fromkeys([*row.tags, *extra]))
        rows.append(Row(row.id, row.query, dict(row.rewards), merged,
                        None if row.responses is None else dict(row.responses), row.source))
    return RoutingDataset(rows, data.candidates, data.path)


def tag_counts(data: RoutingDataset) -> dict[str, int]:
    return dict(Counter(t for row in data.rows for t in dict.fromkeys(row.tags)))


# --- optional LLM tagger --------------------------------------------------------------------------
PROMPT = ("Give 1 to 3 short tags (one or two lowercase words each) naming the task type and domain of this "
          "request, e.g. 'math, word problem' or 'code, python'. Answer with the tags only, comma-separated.\n\n"
          "Request:\n{query}")


def llm_tags(queries: Sequence[str], base_url: str, model: str, key_env: str = "OPENAI_API_KEY",
             timeout: float = 60.0) -> list[list[str]]:
    """Tags from an OpenAI-compatible /chat/completions endpoint, "llm:<tag>", at most 3 a query."""
    from tqdm.auto import tqdm

    from zooter.serving.clients import CallError, OpenAIClient, Sampling

    serve = {"openai_base_url": base_url, "model": model, "api_key_env": key_env if os.environ.get(key_env) else None}
    client = OpenAIClient(serve, Sampling(max_tokens=24, temperature=0, timeout_s=timeout), "tagger")
    out = []
    for query in tqdm(queries, desc="LLM tagging"):
        try:
            answer = client.complete(PROMPT.format(query=query[:2000]))
        except CallError as err:
            raise UserError(f"LLM tagger failed: {err}") from None
        out.append(parse_llm_tags(answer.text))
    return out


def parse_llm_tags(answer: str) -> list[str]:
    """'Math, word problems.' -> ['llm:math', 'llm:word-problems'] (at most 3, normalised)."""
    tags = []
    for part in re.split(r"[,\n;]", answer):
        tag = re.sub(r"[^a-z0-9]+", "-", part.strip().lower()).strip("-")
        if tag and f"llm:{tag}" not in tags:
            tags.append(f"llm:{tag}")
    return tags[:3]
