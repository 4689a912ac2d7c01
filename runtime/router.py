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

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from zooter.errors import UserError
from zooter.export.bundle import FORMAT_VERSION, sha256_file
from zooter.runtime import decision as rule
from zooter.runtime.tokenize import clean_query, encode, load_tokenizer

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class BundleError(UserError):
    """The bundle is missing a file, was modified, or does not fit together."""


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


def read_manifest(bundle: str | Path, verify: bool = True) -> dict:
    """router.json of a bundle, after checking that every listed file is there with its checksum."""
    bundle = Path(bundle)
    manifest_path = bundle / "router.json"
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such bundle folder")
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing file (not a zooter bundle?)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BundleError(f"{manifest_path}: invalid JSON: {err.msg}") from None
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(f"{manifest_path}: format_version {version!r}; this zooter reads up to {FORMAT_VERSION}")
    for key in ("labels", "max_length", "model_file", "files"):
        if key not in manifest:
            raise BundleError(f"{manifest_path}: no {key!r}")
    for name in (manifest["model_file"], "tokenizer.json"):
        if name not in manifest["files"]:
            raise BundleError(f"{manifest_path}: {name} is not listed under 'files'")
    for name, entry in manifest["files"].items():
        path = bundle / name
        if not path.is_file():
            raise BundleError(f"{path}: missing file listed in router.json")
        if verify and sha256_file(path) != entry["sha256"]:
            raise BundleError(f"{path}: checksum mismatch (sha256 differs from router.json): the file is damaged or was modified")
    return manifest


def default_providers(available: Sequence[str] | None = None) -> list[str]:
    """GPU execution providers when this onnxruntime has them, the CPU always last."""
    import onnxruntime as ort

    available = set(available if available is not None else ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]


def open_session(model_path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None,
                 spin: bool = False):
    """An onnxruntime session. Worker threads do not spin-wait between calls unless `spin`: on a
    machine whose cores are shared (an app server, a CI box), spinning workers steal the cores the
    next call needs; on dedicated cores spinning saves a few microseconds of wake-up per call."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None:
        providers = default_providers(available)
    else:
        missing = [p for p in providers if p not in available]
        if missing:
            raise UserError(f"execution provider(s) {missing} not available in this onnxruntime (has {available})")
    options = ort.SessionOptions()
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    # onnxruntime's CPU SkipLayerNormalization kernel is slower than the Add + LayerNormalization it
    # replaces (export/quantize.py): on the CPU alone, do not re-fuse them at load.
    disabled = ["SkipLayerNormFusion"] if list(providers) == ["CPUExecutionProvider"] else []
    return ort.InferenceSession(str(model_path), options, providers=list(providers), disabled_optimizers=disabled)


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
        # Costs in label order (unit price per million tokens); None when any candidate is unpriced.
        self.costs = None
        if costs and all(name in costs for name in self.labels):
            self.costs = np.array([rule.unit_cost(costs[name]) for name in self.labels], dtype=np.float64)
        self.lam = float(manifest.get("lambda", 0.0) if lam is None else lam)
        if self.lam and self.costs is None:
            raise BundleError(f"lambda={self.lam} needs a price for every candidate; router.json has no costs")
        self._check_label_count()

    @classmethod
    def load(cls, bundle: str | Path, providers: Sequence[str] | None = None, threads: int | None = None,
             lam: float | None = None, model_file: str | None = None, verify: bool = True, spin: bool = False) -> "Router":
        """Open a bundle folder. `model_file` picks another listed ONNX file (say model.onnx beside
        model.int8.onnx); `spin` lets idle onnxruntime threads spin-wait (only for dedicated cores)."""
        bundle = Path(bundle)
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

    def probabilities(self, texts: Sequence) -> np.ndarray:
        return rule.softmax(self.logits(texts))

    def _lambda(self, lam: float | None) -> float:
        lam = self.lam if lam is None else float(lam)
        if lam and self.costs is None:
            raise ValueError(f"lambda={lam} needs a price for every candidate; this bundle has no costs")
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
        decision = self._decide(self.probabilities([text]), lam, 0.0)[0]
        decision.latency_ms = (time.perf_counter() - start) * 1000
        return decision

    def route_batch(self, texts: Sequence, lam: float | None = None, batch_size: int = 32) -> list[Decision]:
        """Route many queries, `batch_size` per model call, answers in input order; latency_ms is the batch's time."""
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
            raise TypeError(f"route_batch takes a list of queries, got {type(texts).__name__}")
        lam = self._lambda(lam)
        cleaned = [clean_query(t) for t in texts]
        # Batches of similar lengths: less padding to compute, and with dynamic int8 (whose scales
        # span the whole batch, padding included) answers closer to single-query routing.
        order = sorted(range(len(cleaned)), key=lambda i: len(cleaned[i]))
        out: list[Decision | None] = [None] * len(cleaned)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            start = time.perf_counter()
            probs = self.probabilities([cleaned[j] for j in idx])
            for j, d in zip(idx, self._decide(probs, lam, (time.perf_counter() - start) * 1000)):
                out[j] = d
        return out
