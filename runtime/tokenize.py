"""Query text to model inputs, with the bad-input rules every consumer of a bundle shares.

The Router, the parity check, the benchmarks and the Triton `tokenize` model all call `encode`, so
a query is cleaned, truncated and padded the same way everywhere. Uses the `tokenizers` library
only (no transformers), so it runs inside apps and the Triton python backend.

ASCII queries skip the `tokenizers` call when the tokenizer is BERT's (BertNormalizer, BertPreTokenizer,
WordPiece: MiniLM's and the static tables'): `AsciiWordPiece` gives the same ids with a regex and
dict lookups in about a fifth of the time (11-14 against 55-62 us for 64 tokens), which is most of a static
router's route. Anything else (a non-ASCII character, text that holds an added token such as
"[SEP]", another tokenizer) goes through `tokenizers`.

Bad input:
  None or a non-string  -> TypeError naming the type
  bytes                 -> decoded as UTF-8, invalid sequences replaced (U+FFFD)
  a str with lone surrogates (undecodable bytes from argv or a file read with surrogateescape,
  or a "\\udcff" JSON escape) -> each replaced by U+FFFD: no tokenizer can take them
  empty or blank        -> EmptyQueryError (a ValueError)
  longer than max_length tokens -> truncated (the head and the final [SEP] are kept)
"""

from __future__ import annotations

import json
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
    """A `tokenizers.Tokenizer` from a tokenizer.json file (or a bundle folder holding one), wrapped in a
    QueryTokenizer that adds the ASCII fast path.

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
    return QueryTokenizer(tokenizer, int(max_length))


class QueryTokenizer:
    """A `tokenizers.Tokenizer` (every attribute passes through: encode_batch, token_to_id, ...) with the
    ASCII fast path `ids_of` beside it, built once from the same settings."""

    def __init__(self, backend, max_length: int):
        self.backend = backend
        self.fast = AsciiWordPiece.of(backend, max_length)

    def __getattr__(self, name):
        if name == "backend":      # not set yet (a copy being built): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.backend, name)

    def ids_of(self, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """(ids, type_ids) of each cleaned text: the fast path where it applies, `tokenizers` for the rest."""
        out = [self.fast(t) if self.fast is not None else None for t in texts]
        rest = [i for i, ids in enumerate(out) if ids is None]
        if rest:
            for i, e in zip(rest, self.backend.encode_batch([texts[i] for i in rest])):
                out[i] = (e.ids, e.type_ids)
        return out


_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")   # clean_text drops ASCII Cc but tab, newline, return


class AsciiWordPiece:
    """BERT's tokenization of ASCII text, as `tokenizers` does it for one sequence, in plain Python.

    For ASCII the BertNormalizer only drops control characters and lowercases (no Chinese characters,
    nothing for NFD or accent stripping to change); the BertPreTokenizer splits at whitespace and
    isolates each punctuation mark (every printable ASCII character but letters and digits); WordPiece
    matches the longest vocabulary entry from the left, "##" before a word's later pieces, and turns a
    word it cannot cover, or longer than max_input_chars_per_word, into one [UNK]; truncation keeps the
    head, room left for the special tokens the post-processor adds. `of` builds one only for a
    tokenizer configured exactly so, and `__call__` answers None for text it does not cover.
    tests/test_tokenize.py checks it id for id against `tokenizers` on the public queries and on fuzz.
    """

    def __init__(self, vocab: dict[str, int], unk: int, prefix: str, longest_word: int, lowercase: bool,
                 head: list[int], tail: list[int], type_ids: tuple[int, int, int], room: int, added: list[str]):
        self.vocab, self.unk, self.prefix, self.longest_word = vocab, unk, prefix, longest_word
        # a word longer than longest_word is [UNK] even if listed (BERT's vocabularies list none)
        too_long = max(map(len, vocab), default=0) > longest_word
        self.whole = {w: i for w, i in vocab.items() if len(w) <= longest_word} if too_long else vocab
        self.lowercase, self.head, self.tail, self.room, self.added = lowercase, head, tail, room, added
        self.type_ids = type_ids
        self.words = re.compile(r"[a-z0-9]+|[^a-z0-9 \t\n\r]" if lowercase else r"[A-Za-z0-9]+|[^A-Za-z0-9 \t\n\r]")

    @classmethod
    def of(cls, tokenizer, max_length: int) -> "AsciiWordPiece | None":
        """The fast path of a `tokenizers.Tokenizer` truncating at max_length, or None when its settings
        are not the ones this class reproduces."""
        try:
            spec = json.loads(tokenizer.to_str())
            norm, pre, model = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}, spec.get("model") or {}
            if (norm.get("type") != "BertNormalizer" or norm.get("clean_text") is not True
                    or pre.get("type") != "BertPreTokenizer" or model.get("type") != "WordPiece"):
                return None
            trunc = spec.get("truncation") or {}
            if (trunc.get("max_length") != max_length or trunc.get("stride", 0) != 0
                    or trunc.get("direction", "Right") != "Right" or spec.get("padding")):
                return None
            vocab = model["vocab"]
            head, tail, types = _template(spec.get("post_processor"), vocab)
            room = max_length - len(head) - len(tail)
            if room < 1:
                return None
            tokens = spec.get("added_tokens") or []
            if any(t.get("normalized") and not re.fullmatch(r"[!-~]+", t.get("content") or "") for t in tokens):
                return None     # tokenizers matches such a token in the normalised text, not in the raw text
            added = [t["content"].lower() for t in tokens if t.get("content")]
            return cls(vocab, vocab[model["unk_token"]], model["continuing_subword_prefix"],
                       int(model["max_input_chars_per_word"]), bool(norm.get("lowercase")), head, tail, types,
                       room, added)
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    def __call__(self, text: str) -> tuple[list[int], list[int]] | None:
        """(ids, type_ids) as `tokenizers` gives them, or None when the text is not plain ASCII or holds an
        added token (those are split out before normalisation, which this path does not do)."""
        if not text.isascii():
            return None
        text = _CONTROL.sub("", text)
        lowered = text.lower()
        for token in self.added:
            if token in lowered:
                return None
        # Every word gives at least one token, so the first `room` words hold the truncated query.
        words = self.words.findall(lowered if self.lowercase else text)[:self.room]
        whole = self.whole
        ids = [whole.get(word, -1) for word in words]
        if -1 in ids:     # words to split into pieces, spliced in from the last (list.index scans in C)
            misses, at = [], -1
            try:
                while True:
                    at = ids.index(-1, at + 1)
                    misses.append(at)
            except ValueError:
                pass
            for at in reversed(misses):
                ids[at:at + 1] = self._pieces(words[at])
        ids = self.head + ids[:self.room] + self.tail
        first, middle, last = self.type_ids
        if first == middle == last:
            return ids, [middle] * len(ids)
        return ids, [first] * len(self.head) + [middle] * (len(ids) - len(self.head) - len(self.tail)) + [last] * len(self.tail)

    def _pieces(self, word: str) -> list[int]:
        """WordPiece's greedy longest-match-first split of a word not in the vocabulary (or too long)."""
        if len(word) > self.longest_word:
            return [self.unk]
        pieces, start, n = [], 0, len(word)
        while start < n:
            end = n
            while end > start:
                found = self.vocab.get(word[start:end] if start == 0 else self.prefix + word[start:end])
                if found is not None:
                    break
                end -= 1
            else:
                return [self.unk]
            pieces.append(found)
            start = end
        return pieces


def _template(post, vocab) -> tuple[list[int], list[int], tuple[int, int, int]]:
    """(ids before, ids after, (type id before, of the text, after)) that a BERT post-processor puts around
    one sequence; a ValueError for any other post-processor."""
    if post is None:
        return [], [], (0, 0, 0)
    if post.get("type") == "BertProcessing":
        return [int(post["cls"][1])], [int(post["sep"][1])], (0, 0, 0)
    if post.get("type") != "TemplateProcessing":
        raise ValueError(post.get("type"))
    items, specials = post["single"], post["special_tokens"]
    at = [i for i, item in enumerate(items) if "Sequence" in item]
    if len(at) != 1 or items[at[0]]["Sequence"]["id"] != "A":
        raise ValueError("template")

    def ids(part):
        out, types = [], set()
        for item in part:
            token = item["SpecialToken"]
            out += [int(i) for i in specials[token["id"]]["ids"]]
            types.add(int(token["type_id"]))
        if len(types) > 1:
            raise ValueError("type ids")
        return out, next(iter(types), 0)

    (head, first), (tail, last) = ids(items[:at[0]]), ids(items[at[0] + 1:])
    return head, tail, (first, int(items[at[0]]["Sequence"]["type_id"]), last)


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
    width = max(len(ids) for ids, _ in encodings)
    batch = len(encodings)
    ids = np.full((batch, width), _pad_id(tokenizer), dtype=np.int64)
    mask = np.zeros((batch, width), dtype=np.int64)
    types = np.zeros((batch, width), dtype=np.int64)
    for i, (token_ids, type_ids) in enumerate(encodings):
        n = len(token_ids)
        ids[i, :n] = token_ids
        mask[i, :n] = 1
        types[i, :n] = type_ids
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def encode_each(tokenizer, texts: Sequence, max_length: int | None = None,
                names: Sequence[str] | None = None) -> list[dict[str, np.ndarray]]:
    """One feed per query, each (1, its own length) and unpadded: exactly what `encode([text])` gives,
    tokenized in one call. `names`: the inputs the model takes (all three by default); a static table
    takes no token_type_ids, and at tens of microseconds a query an unused array is worth not making."""
    types = names is None or "token_type_ids" in names
    out = []
    for token_ids, type_ids in _encodings(tokenizer, texts, max_length):
        ids = np.array([token_ids], dtype=np.int64)
        arrays = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if types:
            arrays["token_type_ids"] = np.array([type_ids], dtype=np.int64)
        out.append(arrays if names is None else {name: arrays[name] for name in names})
    return out


def _encodings(tokenizer, texts: Sequence, max_length: int | None) -> list[tuple[list[int], list[int]]]:
    """(ids, type_ids) of each query, cleaned."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"encode takes a list of queries, got {type(texts).__name__}")
    cleaned = [clean_query(t) for t in texts]
    if not cleaned:
        raise ValueError("encode needs at least one query")
    if isinstance(tokenizer, QueryTokenizer):
        encodings = tokenizer.ids_of(cleaned)
    else:
        encodings = [(e.ids, e.type_ids) for e in tokenizer.encode_batch(cleaned)]
    if max_length is not None:
        longest = max(len(ids) for ids, _ in encodings)
        if longest > max_length:
            raise ValueError(f"tokenizer returned {longest} tokens for max_length {max_length}: load it with load_tokenizer")
    return encodings
