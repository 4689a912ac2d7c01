"""The ASCII fast path of runtime/tokenize.py gives exactly the ids `tokenizers` gives.

`AsciiWordPiece` re-does BERT's tokenization in plain Python for ASCII text (a fifth of the time of a
`tokenizers` call, most of a static router's route), so every id it gives is checked against
`tokenizers` itself: on the public queries, on seeded fuzz of ASCII text made to hit the edge cases
(control characters, punctuation, words longer than WordPiece's limit, words only pieces cover, added
tokens such as [SEP] in the text, truncation), for MiniLM's tokenizer and for a static table's (no
[CLS]/[SEP]). Whatever it does not cover goes to `tokenizers`, and the Router answers the same
either way.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from zooter.runtime.tokenize import AsciiWordPiece, QueryTokenizer, encode, encode_each, load_tokenizer


def minilm_spec() -> dict:
    from zooter.training.model import default_backbone

    return json.loads((Path(default_backbone()) / "tokenizer.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=["minilm", "static", "cased"])
def tokenizer_file(request, tmp_path_factory) -> Path:
    spec = minilm_spec()
    if request.param == "static":      # model2vec's layout: no special tokens around the text
        spec["post_processor"], spec["truncation"], spec["padding"] = None, None, None
    if request.param == "cased":       # a BERT tokenizer that keeps case (the vocabulary's capitals become pieces)
        spec["normalizer"]["lowercase"] = False
    path = tmp_path_factory.mktemp(request.param) / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def public_queries(data_dir: Path) -> list[str]:
    rows = json.loads((data_dir / "dcrouter" / "train.json").read_text(encoding="utf-8"))
    queries = [r["question"] for r in rows]
    alpaca = next((data_dir / "alpaca_eval" / "results").glob("*/weighted_alpaca_eval_gpt4_turbo/annotations.json"))
    queries += [r["instruction"] for r in json.loads(alpaca.read_text(encoding="utf-8"))]
    for line in (data_dir / "mt_bench" / "question.jsonl").read_text(encoding="utf-8").splitlines():
        queries += json.loads(line)["turns"]
    return queries


def fuzz(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = [chr(i) for i in range(128)]
    words = ["the", "unaffable", "##able", "[SEP]", "[cls]", "[MASK]", "[UNK]", "[pad]", "x" * 101, "a" * 100,
             "qzxjvk", "Hello", "WORLD", "e.g.", "  ", "\t", "\r\n", "\x0b", "\x0c", "\x1c", "\x7f", "\x00",
             "1234567", "don't", "C++", "<br/>", "antidisestablishmentarianism"]
    out = []
    for _ in range(count):
        parts = [rng.choice(words) if rng.random() < 0.4 else "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
                 for _ in range(rng.randint(1, 14))]
        out.append(("" if rng.random() < 0.5 else " ").join(parts))
    return out


@pytest.mark.parametrize("max_length", [128, 7])
def test_fast_path_gives_the_ids_of_tokenizers(tokenizer_file, data_dir, max_length):
    tokenizer = load_tokenizer(tokenizer_file, max_length)
    assert isinstance(tokenizer, QueryTokenizer) and tokenizer.fast is not None
    taken = 0
    for text in public_queries(data_dir) + fuzz(max_length, 4000):
        fast = tokenizer.fast(text)
        if fast is None:
            continue
        taken += 1
        reference = tokenizer.backend.encode(text)
        assert fast == (reference.ids, reference.type_ids), repr(text)
    assert taken > 5000     # most public queries are plain ASCII: the path is really taken


def test_fast_path_leaves_what_it_does_not_cover_to_tokenizers(tokenizer_file):
    fast = load_tokenizer(tokenizer_file, 128).fast
    assert fast("café au lait") is None                    # not ASCII: accents, NFD, Chinese characters
    assert fast("a question [SEP] with a separator") is None   # added tokens are matched before normalising
    assert fast("what is [mask]?") is None
    assert fast("What is 2 + 2?") is not None

    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    from tokenizers import AddedToken, Tokenizer

    for change in ({"normalizer": {"type": "Lowercase"}}, {"pre_tokenizer": {"type": "Whitespace"}},
                   {"post_processor": {"type": "RobertaProcessing", "sep": ["[SEP]", 102], "cls": ["[CLS]", 101],
                                       "trim_offsets": True, "add_prefix_space": False}},
                   {"normalizer": {**spec["normalizer"], "clean_text": False}}):
        other = Tokenizer.from_str(json.dumps({**spec, **change}))
        other.no_padding()
        other.enable_truncation(128)
        assert AsciiWordPiece.of(other, 128) is None, change
    assert AsciiWordPiece.of(load_tokenizer(tokenizer_file, 128).backend, 64) is None   # truncation not as asked
    # An added token that tokenizers matches after normalising it (a control character dropped, accents stripped):
    # the raw text does not show it, so such a tokenizer keeps to tokenizers.
    for content in ("Foo\x01bar", "\u00e9t\u00e9", "two words"):
        other = Tokenizer.from_str(json.dumps(spec))
        other.add_tokens([AddedToken(content, normalized=True)])
        other.no_padding()
        other.enable_truncation(128)
        assert AsciiWordPiece.of(other, 128) is None, content


def test_encode_and_the_router_answer_the_same_with_and_without_the_fast_path(tokenizer_file, bundles):
    from zooter.runtime.router import Router

    tokenizer = load_tokenizer(tokenizer_file, 16)
    texts = ["What is the capital of Australia?", "café ☕ and [SEP] and tea", "x" * 300, "a\tb\x01c\r\nd " * 20,
             b"bytes \xff too"]
    for batch in (texts, texts[:1], texts[1:2]):
        fast, plain = encode(tokenizer, batch, 16), encode(tokenizer.backend, batch, 16)
        assert fast.keys() == plain.keys()
        for name in fast:
            np.testing.assert_array_equal(fast[name], plain[name])
        for a, b, c in zip(encode_each(tokenizer, batch, 16), encode_each(tokenizer.backend, batch, 16),
                           encode_each(tokenizer, batch, 16, ["input_ids", "attention_mask"])):   # a static model's inputs
            assert list(c) == ["input_ids", "attention_mask"]
            for name in a:
                np.testing.assert_array_equal(a[name], b[name])
                if name in c:
                    np.testing.assert_array_equal(a[name], c[name])

    router = Router.load(bundles["int8"])
    assert isinstance(router.tokenizer, QueryTokenizer) and router.tokenizer.fast is not None
    plain = Router(router.session, router.tokenizer.backend, router.manifest)
    for text in texts + ["Prove that there are infinitely many primes."]:
        a, b = router.route(text).to_json(), plain.route(text).to_json()
        a.pop("latency_ms"), b.pop("latency_ms")
        assert a == b
    np.testing.assert_array_equal(router.outputs_of(texts)[0], plain.outputs_of(texts)[0])
    np.testing.assert_array_equal(router.outputs_of(texts)[1], plain.outputs_of(texts)[1])
