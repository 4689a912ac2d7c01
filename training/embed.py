"""Encoder embeddings of many queries: batched by length, cached per query text.

A frozen router trains only its head, on the pooled encoder embeddings (the head's input). They are
computed once here; with a cache folder, once per query text across folds, splits and variants.

Quantization-aware training also needs the embeddings of the INT8 encoder that export will ship:
zooter.convert.int8_encoder builds it exactly as export does (`Int8Encoder`), and `int8_embeddings`
runs it over the queries. Its `key` (the recipe as JSON data) keys the cache, so a changed recipe
never reuses stale embeddings.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np


def in_length_order(texts: Sequence[str], tokenizer, max_length: int, batch_size: int, fn: Callable, device="cpu",
                    progress: str | None = None) -> np.ndarray:
    """fn(tokenized batch) -> (batch, k) tensor over all texts, batched by length; rows in input order."""
    import torch
    from tqdm.auto import tqdm

    lengths = np.array([len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]])
    order = np.argsort(-lengths, kind="stable")
    out = None
    with torch.no_grad():
        for s in tqdm(range(0, len(order), batch_size), desc=progress, disable=progress is None, leave=False):
            idx = order[s:s + batch_size]
            enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt").to(device)
            values = fn(enc).float().cpu().numpy()
            if out is None:
                out = np.empty((len(texts), values.shape[1]), dtype=np.float32)
            out[idx] = values
    return out


def int8_embeddings(encoder, model, tokenizer, texts: Sequence[str], max_length: int,
                    progress: str | None = None) -> np.ndarray:
    """Pooled embeddings of `texts` from `encoder` (zooter.convert.int8_encoder.Int8Encoder) built for
    `model`, rows in input order.

    One query per call, as Router.route runs it: dynamic int8 takes its activation scales from the
    whole batch, padding included, so a query's rounding depends on its batch-mates.
    """
    import torch

    with tempfile.TemporaryDirectory(prefix="zooter-int8-") as tmp:
        session = encoder.session(model, Path(tmp))
        names = {i.name for i in session.get_inputs()}

        def run(enc):
            feeds = {k: v.numpy().astype(np.int64) for k, v in enc.items() if k in names}
            return torch.from_numpy(session.run(["logits"], feeds)[0])

        return in_length_order(list(texts), tokenizer, max_length, 1, run, progress=progress)


def cache_key(model, max_length: int, int8=None) -> str:
    """What the embeddings depend on: the encoder (its path and depth), max_length, and for INT8 the recipe."""
    key = [str(model.encoder.name_or_path), max_length, model.encoder.config.num_hidden_layers]
    if int8 is not None:
        key.append(int8.key)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def embed_texts(model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 64,
                cache: str | Path | None = None, progress: str | None = "embedding", int8=None) -> np.ndarray:
    """The router's pooled encoder embeddings of `texts` (rows in input order); with `int8` (an
    Int8Encoder), those of the INT8 encoder it builds.

    With a cache folder, vectors are kept per query text (one .npz per cache_key), so folds, splits
    and variants that share queries embed each query once.
    """
    texts = list(texts)

    def compute(some: list[str]) -> np.ndarray:
        model.eval()
        if int8 is not None:
            return int8_embeddings(int8, model, tokenizer, some, max_length, progress=progress)
        return in_length_order(some, tokenizer, max_length, batch_size, lambda enc: model.embed(**enc), progress=progress)

    if not cache:
        return compute(texts)
    path = Path(cache) / f"embeddings-{cache_key(model, max_length, int8)}.npz"
    known: dict[str, np.ndarray] = {}
    if path.is_file():
        saved = np.load(path)
        known = dict(zip(saved["keys"].tolist(), saved["vectors"]))
    keys = [hashlib.sha1(t.encode("utf-8")).hexdigest() for t in texts]
    missing = sorted({k: i for i, k in enumerate(keys) if k not in known}.values())
    if missing:
        fresh = compute([texts[i] for i in missing])
        known.update({keys[i]: v for i, v in zip(missing, fresh)})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")  # processes of one launch write apart
        np.savez(tmp, keys=np.array(list(known)), vectors=np.stack(list(known.values())))
        tmp.replace(path)
    return np.stack([known[k] for k in keys]).astype(np.float32)
