"""A training run becomes a bundle: ONNX export -> fusions -> int8 / fp16 -> parity gate -> bundle folder.

The bundle's format and its writer live in zooter.runtime.bundle (apps read it without this
package); this module assembles what goes in: the model files, labels and max_length from the run,
costs from the candidates file, the INT8 recipe, the parity figures, provenance and evaluation.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

from zooter.runtime.bundle import MODEL_FILES, Manifest, write_bundle
from zooter.runtime.errors import UserError

# The training record a bundle carries (run.json keys); everything else in run.json stays in the run.
PROVENANCE_KEYS = ("data", "data_sha256", "dev_sha256", "backbone", "beta", "tau", "loss", "seed", "frozen",
                   "candidates_file", "best_single", "n_train", "n_dev", "tags", "config", "curves", "train_seconds",
                   "query_digests", "lifecycle", "candidate_figures")


class Validation:
    """Validation queries for the parity check, with their rewards when they are routing data."""

    def __init__(self, texts: list[str], source: str, dataset=None):
        self.texts, self.source, self.dataset = texts, source, dataset

    def rewards(self, labels, n: int):
        """(n, labels) reward matrix (NaN = not scored), or None when the rows carry no rewards for these labels."""
        import numpy as np

        if self.dataset is None or any(name not in self.dataset.candidates for name in labels):
            return None
        matrix = self.dataset.rewards()[:n]
        return matrix[:, [self.dataset.candidates.index(name) for name in labels]].astype(np.float64)


def validation_from_file(path: str | Path) -> Validation:
    """Routing data (with rewards), else any queries file zooter.runtime.queries reads."""
    from zooter.runtime.errors import DataError
    from zooter.runtime.queries import read_queries
    from zooter.training.dataset import RoutingDataset

    try:
        data = RoutingDataset.load(path)
    except DataError:  # not routing data: plain queries, one a line (or another JSON layout)
        return Validation([q.text for q in read_queries(path)[0]], str(path))
    return Validation(list(data.queries), str(path), data)


def run_dev_queries(info: dict) -> Validation | None:
    """The run's dev rows: the --dev file training used, else the same hash-held-out share of its
    --data that training held out (zooter.training.train.split_dev)."""
    from zooter.training.dataset import RoutingDataset
    from zooter.training.train import split_dev

    config = info.get("config") or {}
    if config.get("dev") and Path(config["dev"]).is_file():
        return validation_from_file(config["dev"])
    data = info.get("data")
    if isinstance(data, str) and Path(data).is_file():
        _, dev_rows = split_dev(RoutingDataset.load(data), None)
        return Validation(list(dev_rows.queries), f"{data} (training's dev hold-out)", dev_rows)
    return None


def _tokenizer_json(run: Path, hf_tokenizer, work: Path) -> Path:
    path = run / "encoder" / "tokenizer.json"
    if path.is_file():
        return path
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"{run}/encoder: no tokenizer.json and the tokenizer is not a fast one; the runtime needs tokenizer.json")
    backend.save(str(work / "tokenizer.json"))
    return work / "tokenizer.json"


def bundle_costs(candidates_file: str | Path | None, labels) -> dict | None:
    """{label: {input_per_mtok, output_per_mtok, unit}} from a candidates file; None without prices."""
    if not candidates_file:
        return None
    from zooter.runtime.decision import unit_price
    from zooter.serving.candidates import costs_for, load_candidates

    costs = costs_for(load_candidates(candidates_file), labels)
    if costs is None:
        return None
    return {name: {"input_per_mtok": c.input_per_mtok, "output_per_mtok": c.output_per_mtok, "unit": unit_price(c)}
            for name, c in costs.items()}


def export_bundle(run: str | Path, out: str | Path, quantize: str = "int8", opset: int | None = None,
                  parity_data: str | Path | None = None, allow_drift: bool = False,
                  candidates: str | Path | None = None, lam: float = 0.0, tolerance: float = 0.0,
                  parity_n: int = 1000, arch: str = "auto", keep_fp32: bool = False, force: bool = False,
                  log=print) -> Manifest:
    """RUN folder -> ONNX -> fused -> int8/fp16 -> parity gate -> BUNDLE folder; returns router.json."""
    from zooter.export.parity import gate
    from zooter.convert.quantize import Int8Recipe
    from zooter.runtime.decision import check_weight
    from zooter.training.model import RouterModel, read_run_info

    if quantize not in MODEL_FILES:
        raise UserError(f"--quantize {quantize}: choose int8, fp16 or none")
    lam, tolerance = check_weight(lam, "--lambda"), check_weight(tolerance, "--tolerance")
    recipe = Int8Recipe.for_cpu(arch) if quantize == "int8" else None
    run, out = Path(run), Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise UserError(f"{out}: exists and is not an empty folder; pass --force to replace a bundle there")
    validation = _parity_queries(run, read_run_info(run), parity_data, parity_n)
    started = time.perf_counter()
    model, hf_tokenizer, info = RouterModel.load(run)
    if model.static and quantize != "none":
        # A static encoder is a table lookup and a mean: nothing for INT8 or fp16 to speed up, and
        # fp32 decides exactly as training did.
        log(f"{run}: a static encoder ships in fp32 (--quantize {quantize} does not apply to a token table)")
        quantize = "none"
    draft = _draft(run, model, info, quantize, candidates, lam, tolerance)

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".zooter-export-", dir=out.parent) as tmp:
        work = Path(tmp)
        models, io, quantization = _convert(model, work, quantize, opset, recipe)
        tokenizer_path = _tokenizer_json(run, hf_tokenizer, work)
        draft = replace(draft, inputs=tuple(io["inputs"]), opset=io["opset"], quantization=quantization)
        parity = _parity(model, draft, models, tokenizer_path, validation, quantize)
        gate(parity, allow_drift)
        files = {MODEL_FILES[quantize]: models["shipped"], "tokenizer.json": tokenizer_path}
        if keep_fp32 and quantize != "none":
            files[MODEL_FILES["none"]] = models["fp32"]
        manifest = write_bundle(out, files, replace(draft, parity=parity), force=force)
    log(f"bundle {out}: {' + '.join(manifest.files)}, {manifest.size / 1e6:.1f} MB, "
        f"{len(manifest.labels)} labels, built in {time.perf_counter() - started:.0f} s")
    return manifest


def _parity_queries(run: Path, info: dict, parity_data, parity_n: int) -> Validation:
    """The queries the parity gate runs: --parity-data, else the run's dev rows; at most parity_n."""
    if parity_data and not Path(parity_data).is_file():
        raise UserError(f"{parity_data}: no such --parity-data file")
    validation = validation_from_file(parity_data) if parity_data else run_dev_queries(info)
    if validation is None:
        raise UserError(f"{run}: run.json names no dev rows for the parity check; pass --parity-data FILE "
                        f"(queries, or routing JSONL)")
    validation.texts = validation.texts[:parity_n]
    if not validation.texts:
        raise UserError(f"{validation.source}: no queries for the parity check")
    return validation


def _draft(run: Path, model, info: dict, quantize: str, candidates, lam: float, tolerance: float) -> Manifest:
    """router.json as far as the run tells it, before the model files exist (export fills in the rest)."""
    labels = list(model.labels)
    limit = int(getattr(model.config, "max_position_embeddings", 512) or 512)
    recorded = info.get("candidates_file")
    if not candidates and isinstance(recorded, str) and Path(recorded).is_file():
        candidates = recorded
    costs = bundle_costs(candidates, labels)
    if (lam or tolerance) and costs is None:
        raise UserError(f"--{'lambda' if lam else 'tolerance'} needs a price for every candidate: pass --candidates with costs")
    if not isinstance(info.get("decision"), dict):
        raise UserError(f"{run}: run.json has no decision layer (trained by an older zooter); train it again")
    return Manifest(labels=tuple(labels), max_length=min(int(info.get("max_length") or limit), limit),
                    model_file=MODEL_FILES[quantize], inputs=(), costs=costs,
                    decision={**info["decision"], "lambda": lam, "tolerance": tolerance},
                    provenance={**{k: info[k] for k in PROVENANCE_KEYS if k in info}, "run": str(run.resolve())},
                    evaluation={"dev": info.get("dev"), "best_single": info.get("best_single")})


def _convert(model, work: Path, quantize: str, opset: int | None, recipe) -> tuple[dict, dict, dict]:
    """ONNX export, fusions, then int8 / fp16: ({"fp32", "shipped"} model paths, the ONNX I/O, the quantization record)."""
    from tqdm import tqdm

    from zooter.convert.onnx_export import export_onnx, export_pooled_onnx
    from zooter.convert.quantize import optimize, quantize_int8

    if model.static:   # Gather, mean and the heads; no fusions to apply
        io = export_pooled_onnx(model, work / "model.onnx", opset)
        return {"fp32": work / "model.onnx", "shipped": work / "model.onnx"}, io, {"mode": "none", "encoder": "static"}
    steps = tqdm(total=3, desc="export", unit="step", leave=False)
    io = export_onnx(model, work / "model.onnx", opset)
    steps.update()
    fp32_path, fused = optimize(work / "model.onnx", model.config, work / "opt")
    steps.update()
    quant: dict = {"mode": quantize, "fused_operators": fused}
    if quantize == "int8":
        shipped, details = quantize_int8(fp32_path, work / "int8", recipe)
        quant.update(details)
    elif quantize == "fp16":
        shipped, fused16 = optimize(work / "model.onnx", model.config, work / "fp16", fp16=True)
        quant.update({"weights": "float16", "io": "float32", "fused_operators": fused16, "target": "gpu"})
    else:
        shipped = fp32_path
    steps.update()
    steps.close()
    return {"fp32": fp32_path, "shipped": shipped}, io, quant


def _parity(model, draft: Manifest, models: dict, tokenizer_path: Path, validation: Validation, quantize: str) -> dict:
    """The shipped model (and the fp32 one) against PyTorch on the validation queries, deciding by the shipped rule."""
    from tqdm import tqdm

    from zooter.export import parity as par
    from zooter.runtime.router import Router
    from zooter.runtime.session import open_session
    from zooter.runtime.tokenize import load_tokenizer
    from zooter.training.model import TorchRouter

    texts, rule = validation.texts, draft.rule()
    tokenizer = load_tokenizer(tokenizer_path, draft.max_length)
    quantized = models["shipped"] != models["fp32"]
    bar = tqdm(total=len(texts) * (3 if quantized else 2), desc="parity", unit="query", leave=False)

    def outputs(run_texts):
        result = run_texts(texts)
        bar.update(len(texts))
        return result

    reference = outputs(TorchRouter(model, tokenizer, draft.max_length).outputs_of)
    # Router.outputs_of runs each query alone, as Router.route does: what routing will answer.
    fp32 = outputs(Router(open_session(models["fp32"], ["CPUExecutionProvider"]), tokenizer, draft).outputs_of)
    exported = fp32
    if quantized:
        exported = outputs(Router(open_session(models["shipped"], ["CPUExecutionProvider"]), tokenizer, draft).outputs_of)
    bar.close()
    rewards = validation.rewards(list(draft.labels), len(texts))
    parity = par.compare(rule, reference, exported, rewards)
    parity.update(model=quantize if quantize != "none" else "fp32", reference="pytorch", data=str(validation.source),
                  rule={"margin": rule.margin, "tolerance": rule.tolerance, "lambda": rule.lam},
                  fp32=par.compare(rule, reference, fp32, rewards))
    return parity

