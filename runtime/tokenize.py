"""Query text to model inputs, with the bad-input rules every consumer of a bundle shares.

The Router, the parity check, the benchmarks and the Triton `tokenize` model all call `encode`, so
a query is cleaned, truncated and padded the same way everywhere. Uses the `tokenizers` library
only (no transformers), so it runs inside apps and the Triton python backend.

Bad input:
  None or a non-string  -> TypeError naming the type
  bytes                 -> decoded as UTF-8, invalid sequences replaced (U+FFFD)
  a str with lone surrogates (undecodable bytes from argv or a file read with surrogateescape,
  or a "\\udcff" JSON escape) -> each replaced by U+FFFD: no tokenizer can take them
  empty or blank        -> EmptyQueryError (a ValueError)
  longer than max_length tokens -> truncated (the head and the final [SEP] are kept)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

_SURROGATE = re.compile("[\ud800-\udfff]")


class EmptyQueryError(ValueError):
    """A query with no text in it: there is nothing to route on."""


def clean_query(text) -> str:
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", errors="replace")
    elif not isinstance(text, str):
        raise TypeError(f"a query must be a str (or UTF-8 bytes), got {type(text).__name__}")
    else:
        text = _SURROGATE.sub("\ufffd", text)
    if not text.strip():
        raise EmptyQueryError("empty query: give the text to route")
    return text


def load_tokenizer(path: str | Path, max_length: int):
    """A `tokenizers.Tokenizer` from a tokenizer.json file (or a bundle folder holding one).

    Truncation is set here once and padding switched off (encode pads to the batch's longest), so
    the object is never mutated afterwards and can be shared between threads.
    """
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(int(max_length))
    return tokenizer


def _pad_id(tokenizer) -> int:
    for token in ("[PAD]", "<pad>", "<PAD>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return 0


def encode(tokenizer, texts: Sequence, max_length: int | None = None) -> dict[str, np.ndarray]:
    """Clean and tokenize a batch; returns {input_ids, attention_mask, token_type_ids} as int64 (batch, longest).

    `max_length` re-checks the cut (the tokenizer from `load_tokenizer` already truncates).
    """
    encodings = _encodings(tokenizer, texts, max_length)
    width = max(len(e.ids) for e in encodings)
    batch = len(encodings)
    ids = np.full((batch, width), _pad_id(tokenizer), dtype=np.int64)
    mask = np.zeros((batch, width), dtype=np.int64)
    types = np.zeros((batch, width), dtype=np.int64)
    for i, e in enumerate(encodings):
        n = len(e.ids)
        ids[i, :n] = e.ids
        mask[i, :n] = 1
        types[i, :n] = e.type_ids
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def encode_each(tokenizer, texts: Sequence, max_length: int | None = None) -> list[dict[str, np.ndarray]]:
    """One feed per query, each (1, its own length) and unpadded: exactly what `encode([text])` gives,
    tokenized in one encode_batch call."""
    out = []
    for e in _encodings(tokenizer, texts, max_length):
        ids = np.asarray(e.ids, dtype=np.int64)[None, :]
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids),
                    "token_type_ids": np.asarray(e.type_ids, dtype=np.int64)[None, :]})
    return out


def _encodings(tokenizer, texts: Sequence, max_length: int | None):
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"encode takes a list of queries, got {type(texts).__name__}")
    cleaned = [clean_query(t) for t in texts]
    if not cleaned:
        raise ValueError("encode needs at least one query")
    encodings = tokenizer.encode_batch(cleaned)
    if max_length is not None:
        longest = max(len(e.ids) for e in encodings)
        if longest > max_length:
            raise ValueError(f"tokenizer returned {longest} tokens for max_length {max_length}: load it with load_tokenizer")
    return encodings
