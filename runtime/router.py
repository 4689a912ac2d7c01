"""The embeddable router: load a bundle, answer "which candidate should take this query?".

numpy, onnxruntime and tokenizers only: an app installs `zooter` without the train extras and
calls

    router = Router.load("bundle/")
    decision = router.route("Prove that there are infinitely many primes.")
    decision.candidate, decision.confidence, decision.probabilities, decision.latency_ms

One Router may be shared by many threads: onnxruntime sessions are safe to run concurrently, the
tokenizer is configured once at load and never mutated, and every call keeps its state local.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from zooter.runtime import decision as rule
from zooter.runtime.bundle import BundleError, read_manifest
from zooter.runtime.errors import SettingError
from zooter.runtime.session import open_session
from zooter.runtime.tokenize import clean_query, encode, load_tokenizer

__all__ = ["Router", "Decision", "BundleError"]


@dataclass
class Decision:
    candidate: str
    probabilities: dict[str, float]
    confidence: float  # the chosen candidate's probability
    latency_ms: float  # tokenize + model + decide; for a batch, the whole batch's time
    ranking: list[str] = field(default_factory=list)  # best first: the fallback order

    def to_json(self) -> dict:
        return {"candidate": self.candidate, "confidence": self.confidence, "probabilities": self.probabilities,
                "ranking": self.ranking, "latency_ms": self.latency_ms}


class Router:
    """A loaded bundle: tokenizer, ONNX session, labels, costs and the decision rule."""

    def __init__(self, session, tokenizer, manifest: dict, bundle: Path | None = None, lam: float | None = None):
        self.session = session
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.bundle = bundle
        self.labels: list[str] = list(manifest["labels"])
        self.max_length = int(manifest["max_length"])
        self.output = manifest.get("output", "logits")
        self.input_names = [i.name for i in session.get_inputs()]
        costs = manifest.get("costs") or None
        # Costs in label order (unit price per million tokens); None when the bundle has none.
        self.costs = None
        if costs:
            self.costs = np.array([rule.unit_cost(costs[name]) for name in self.labels], dtype=np.float64)
        self.lam = rule.check_weight(manifest.get("lambda", 0.0) if lam is None else lam, "lambda")
        if self.lam and self.costs is None:
            raise BundleError(f"lambda={self.lam} needs a price for every candidate; router.json has no costs")
        self._check_label_count()

    @classmethod
    def load(cls, bundle: str | Path, providers: Sequence[str] | None = None, threads: int | None = None,
             lam: float | None = None, model_file: str | None = None, verify: bool = True, spin: bool = False) -> "Router":
        """Open a bundle folder. `model_file` picks another listed ONNX file (say model.onnx beside
        model.int8.onnx); `spin` lets idle onnxruntime threads spin-wait (only for dedicated cores)."""
        bundle = Path(bundle)
        if lam is not None:
            rule.check_weight(lam, "lambda")    # before the model loads: a bad setting fails fast
        manifest = read_manifest(bundle, verify=verify)
        name = model_file or manifest["model_file"]
        if name not in manifest["files"]:
            raise BundleError(f"{bundle}: {name} is not a file of this bundle ({sorted(manifest['files'])})")
        tokenizer = load_tokenizer(bundle / "tokenizer.json", manifest["max_length"])
        session = open_session(bundle / name, providers, threads, spin)
        return cls(session, tokenizer, manifest, bundle, lam)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def _check_label_count(self) -> None:
        dims = self.session.get_outputs()[0].shape
        width = dims[-1] if dims and isinstance(dims[-1], int) else None
        if width is None:  # symbolic output width: ask the model
            width = self.logits(["label count check"]).shape[-1]
        if width != len(self.labels):
            raise BundleError(f"{self.bundle}: the model has {width} outputs but router.json lists {len(self.labels)} labels "
                              f"{self.labels}; refusing to route with a mismatched label order")

    # --- inference ----------------------------------------------------------------------------
    def logits(self, texts: Sequence) -> np.ndarray:
        feeds = encode(self.tokenizer, texts, self.max_length)
        feeds = {name: feeds[name] for name in self.input_names}
        return self.session.run([self.output], feeds)[0]

    def probabilities(self, texts: Sequence, batch_size: int = 32) -> np.ndarray:
        """(len(texts), labels) probabilities in input order, `batch_size` queries per model call.

        Batches are formed from queries of similar length: less padding to compute, and with
        dynamic int8 (whose activation scales span the whole batch, padding included) answers
        closer to routing each query alone."""
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
            raise TypeError(f"expected a list of queries, got {type(texts).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise SettingError(f"batch_size must be a positive integer, got {batch_size!r}")
        cleaned = []
        for i, t in enumerate(texts):
            try:
                cleaned.append(clean_query(t))
            except (TypeError, ValueError) as err:
                raise type(err)(f"query {i}: {err}" if len(texts) > 1 else str(err)) from None
        if len(cleaned) <= batch_size:
            return rule.softmax(self.logits(cleaned))
        order = sorted(range(len(cleaned)), key=lambda i: len(cleaned[i]))
        out = np.empty((len(cleaned), len(self.labels)), dtype=np.float64)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            out[idx] = rule.softmax(self.logits([cleaned[j] for j in idx]))
        return out

    def _lambda(self, lam: float | None) -> float:
        lam = self.lam if lam is None else rule.check_weight(lam, "lambda")
        if lam and self.costs is None:
            raise SettingError(f"lambda={lam} needs a price for every candidate; this bundle has no costs")
        return lam

    def _decide(self, probs: np.ndarray, lam: float, latency_ms: float) -> list[Decision]:
        costs = self.costs if lam else None
        order = rule.ranked(probs, costs, lam)
        out = []
        for row, ranking in zip(probs, order):
            best = int(ranking[0])
            out.append(Decision(self.labels[best], {n: float(p) for n, p in zip(self.labels, row)}, float(row[best]),
                                latency_ms, [self.labels[int(i)] for i in ranking]))
        return out

    def route(self, text, lam: float | None = None) -> Decision:
        """Route one query (str, or UTF-8 bytes). Raises TypeError for other types, EmptyQueryError for blank text."""
        if isinstance(text, (list, tuple)):
            raise TypeError("route takes one query; use route_batch for a list")
        lam = self._lambda(lam)
        start = time.perf_counter()
        decision = self._decide(rule.softmax(self.logits([text])), lam, 0.0)[0]
        decision.latency_ms = (time.perf_counter() - start) * 1000
        return decision

    def route_batch(self, texts: Sequence, lam: float | None = None, batch_size: int = 32) -> list[Decision]:
        """Route many queries, `batch_size` per model call (see probabilities), answers in input order;
        latency_ms is the whole call's time. A bad query raises the error route() would, naming its index."""
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
            raise TypeError(f"route_batch takes a list of queries, got {type(texts).__name__}")
        lam = self._lambda(lam)
        start = time.perf_counter()
        probs = self.probabilities(texts, batch_size) if len(texts) else np.zeros((0, len(self.labels)))
        return self._decide(probs, lam, (time.perf_counter() - start) * 1000)
