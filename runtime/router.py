"""The embeddable router: load a bundle, answer "which candidate should take this query?".

numpy, onnxruntime and tokenizers only: an app installs `zooter` without the train extras and
calls

    router = Router.load("bundle/")
    d = router.route("Prove that there are infinitely many primes.")
    d.candidate, d.expected_reward, d.confidence, d.expected_rewards, d.ranking, d.latency_ms
    router.route(text, tolerance=0.02)   # the cheapest candidate expected within 0.02 reward of the choice

One Router may be shared by many threads: onnxruntime sessions are safe to run concurrently, the
tokenizer is configured once at load and never mutated, and every call keeps its state local.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from zooter.runtime import decision as rule
from zooter.runtime.bundle import BundleError, Manifest
from zooter.runtime.errors import SettingError
from zooter.runtime.session import open_session
from zooter.runtime.tokenize import clean_query, encode, encode_each, load_tokenizer

__all__ = ["Router", "Decision", "BundleError"]


@dataclass
class Decision:
    """Where one query goes, and why (zooter.runtime.decision explains the rule)."""

    candidate: str
    expected_reward: float            # the reward to expect from the candidate, in the data's reward units
    confidence: float                 # calibrated P(the candidate is a best answer for this query)
    expected_rewards: dict[str, float]
    probabilities: dict[str, float]   # the distilled probability that each candidate answers best
    ranking: list[str]                # best first: the fallback order
    anchored: bool                    # the guard kept the training-best candidate
    latency_ms: float                 # tokenize + model + decide; for a batch, the whole call's time

    def to_json(self) -> dict:
        return {"candidate": self.candidate, "expected_reward": self.expected_reward, "confidence": self.confidence,
                "expected_rewards": self.expected_rewards, "probabilities": self.probabilities, "ranking": self.ranking,
                "anchored": self.anchored, "latency_ms": self.latency_ms}


class Router:
    """A loaded bundle: tokenizer, ONNX session, labels, and the decision rule with its settings."""

    def __init__(self, session, tokenizer, manifest: Manifest | dict, bundle: Path | None = None, lam: float | None = None,
                 tolerance: float | None = None):
        self.session = session
        self.tokenizer = tokenizer
        self.manifest = manifest = Manifest.draft(manifest)   # Router.load's is validated; one built in memory is not
        self.bundle = bundle
        self.labels: list[str] = list(manifest.labels)
        self.max_length = int(manifest.max_length)
        self.outputs = [manifest.output, manifest.reward_output]
        self.input_names = [i.name for i in session.get_inputs()]
        self.rule = manifest.rule(lam, tolerance)
        self.rule.settings(None, None)     # a default cost knob without prices is refused at load
        self._check_outputs()

    @classmethod
    def load(cls, bundle: str | Path, providers: Sequence[str] | None = None, threads: int | None = None,
             lam: float | None = None, tolerance: float | None = None, model_file: str | None = None,
             verify: bool = True, spin: bool = False) -> "Router":
        """Open a bundle folder. `lam`/`tolerance` replace the bundle's default cost knobs; `model_file`
        picks another listed ONNX file (say model.onnx beside model.int8.onnx); `spin` lets idle
        onnxruntime threads spin-wait (only for dedicated cores)."""
        bundle = Path(bundle)
        if lam is not None:               # a bad setting fails before the model loads
            rule.check_weight(lam, "lambda")
        if tolerance is not None:
            rule.check_weight(tolerance, "tolerance")
        manifest = Manifest.read(bundle, verify=verify)
        name = model_file or manifest.model_file
        if name not in manifest.files:
            raise BundleError(f"{bundle}: {name} is not a file of this bundle ({sorted(manifest.files)})")
        tokenizer = load_tokenizer(bundle / "tokenizer.json", manifest.max_length)
        session = open_session(bundle / name, providers, threads, spin)
        return cls(session, tokenizer, manifest, bundle, lam, tolerance)

    @property
    def router_id(self) -> str:
        """The bundle's name in answers and metrics (Manifest.router_id)."""
        return self.manifest.router_id

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def costs(self) -> np.ndarray | None:
        return self.rule.costs

    @property
    def decision(self) -> dict:
        """The decision settings the bundle ships (router.json `decision`)."""
        return self.manifest.decision

    def _check_outputs(self) -> None:
        names = [o.name for o in self.session.get_outputs()]
        missing = [o for o in self.outputs if o not in names]
        if missing:
            raise BundleError(f"{self.bundle}: the model has no output {missing} (it has {names})")
        for out in self.session.get_outputs():
            width = out.shape[-1] if out.shape and isinstance(out.shape[-1], int) else None
            if width is not None and width != len(self.labels):
                raise BundleError(f"{self.bundle}: the model's {out.name} has {width} outputs but router.json lists "
                                  f"{len(self.labels)} labels {self.labels}; refusing to route with a mismatched label order")

    # --- inference ----------------------------------------------------------------------------
    def scores(self, texts: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """(logits, raw reward scores) of one model call over `texts` (padded to the longest)."""
        feeds = encode(self.tokenizer, texts, self.max_length)
        logits, rewards = self.session.run(self.outputs, {name: feeds[name] for name in self.input_names})
        return logits, rewards

    def outputs_of(self, texts: Sequence, batch_size: int = 32, padded: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, raw reward scores) for every text, in input order.

        Each query runs alone at its own length, exactly as route() runs it, so its answer is a
        function of the query alone: a dynamic int8 model takes its activation scales over the
        whole batch, padding included, so in a shared batch a query's decision depended on its
        companions (issue 20). `padded=True` is that older path, kept for `zooter bench` to compare
        against: `batch_size` queries of similar length per call, padded to the longest."""
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
        m = len(self.labels)
        probs, rewards = np.empty((len(cleaned), m)), np.empty((len(cleaned), m))
        if not cleaned:
            return probs, rewards
        if not padded:
            for i, feeds in enumerate(encode_each(self.tokenizer, cleaned, self.max_length, self.input_names)):
                logits, scores = self.session.run(self.outputs, feeds)
                probs[i], rewards[i] = rule.softmax(logits)[0], scores[0]
            return probs, rewards
        order = sorted(range(len(cleaned)), key=lambda i: len(cleaned[i])) if len(cleaned) > batch_size else range(len(cleaned))
        order = list(order)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            logits, scores = self.scores([cleaned[j] for j in idx])
            probs[idx], rewards[idx] = rule.softmax(logits), scores
        return probs, rewards

    def probabilities(self, texts: Sequence, batch_size: int = 32, padded: bool = False) -> np.ndarray:
        return self.outputs_of(texts, batch_size, padded)[0]

    def decide(self, probs: np.ndarray, rewards: np.ndarray, lam: float | None = None, tolerance: float | None = None,
               candidates: Sequence[str] | None = None, latency_ms: float = 0.0) -> list[Decision]:
        """Decisions from the model's outputs, by the bundle's rule; `candidates` limits the choice to a subset."""
        allowed = None
        if candidates is not None:
            unknown = [c for c in candidates if c not in self.labels]
            if unknown or not candidates:
                raise SettingError(f"candidates {unknown or '[]'} are not labels of this router ({self.labels})")
            allowed = np.array([name in set(candidates) for name in self.labels])
        made = self.rule.decide(probs, rewards, lam, tolerance, allowed)
        labels, out = self.labels, []
        # tolist() gives the Python floats and ints float() and int() would, in one call per array
        rows = zip(made.choice.tolist(), made.expected.tolist(), made.confidence.tolist(), np.asarray(probs).tolist(),
                   made.ranking.tolist(), made.anchored.tolist())
        for c, expected, confidence, p, ranking, anchored in rows:
            out.append(Decision(labels[c], expected[c], confidence, dict(zip(labels, expected)), dict(zip(labels, p)),
                                [labels[i] for i in ranking if i >= 0], anchored, latency_ms))
        return out

    def route(self, text, lam: float | None = None, tolerance: float | None = None,
              candidates: Sequence[str] | None = None) -> Decision:
        """Route one query (str, or UTF-8 bytes). Raises TypeError for other types, EmptyQueryError for blank text;
        `lam`/`tolerance` override the bundle's cost knobs, `candidates` limits the choice."""
        if isinstance(text, (list, tuple)):
            raise TypeError("route takes one query; use route_batch for a list")
        self.rule.settings(lam, tolerance)
        start = time.perf_counter()
        probs, scores = self.outputs_of([text])     # the path route_batch takes, to the last bit
        decision = self.decide(probs, scores, lam, tolerance, candidates)[0]
        decision.latency_ms = (time.perf_counter() - start) * 1000
        return decision

    def route_batch(self, texts: Sequence, lam: float | None = None, tolerance: float | None = None,
                    candidates: Sequence[str] | None = None, batch_size: int = 32, padded: bool = False) -> list[Decision]:
        """Route many queries, answers in input order, each the decision route() gives that query alone
        (see outputs_of; `padded` and `batch_size` only for comparisons); latency_ms is the whole
        call's time. A bad query raises the error route() would, naming its index."""
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
            raise TypeError(f"route_batch takes a list of queries, got {type(texts).__name__}")
        self.rule.settings(lam, tolerance)
        start = time.perf_counter()
        if not len(texts):
            return []
        probs, scores = self.outputs_of(texts, batch_size, padded)
        return self.decide(probs, scores, lam, tolerance, candidates, (time.perf_counter() - start) * 1000)
