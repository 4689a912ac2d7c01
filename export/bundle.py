"""The bundle: a folder an app or Triton loads without the training code.

    BUNDLE/model.int8.onnx   (or model.onnx for --quantize none, model.fp16.onnx for fp16)
    BUNDLE/tokenizer.json    the backbone's tokenizer (tokenizers library format)
    BUNDLE/router.json       the manifest below

router.json:
    format_version  FORMAT_VERSION; readers refuse newer versions
    labels          candidate names in logit order (every consumer takes them from here)
    max_length      tokens per query after truncation
    model_file, inputs, output   the ONNX file to load, its input names, its output name ("logits")
    files           {file name: {"sha256", "bytes"}} for every file but router.json
    quantization    {"mode": "int8"|"fp16"|"none", optimizer and quantizer settings}
    costs           {candidate: {"input_per_mtok", "output_per_mtok", "unit"}} or null
    lambda          the default cost weight of the decision rule (0 = plain argmax)
    provenance      the run's training record (data_sha256, backbone, beta, tau, loss, seed, ...)
    parity          {"decision_agreement", "max_prob_diff", "n", ...} of the shipped model vs PyTorch
    evaluation      the run's dev figures, copied from run.json

This module imports only the standard library at the top: the runtime reads FORMAT_VERSION.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST = "router.json"
MODEL_FILES = {"int8": "model.int8.onnx", "fp16": "model.fp16.onnx", "none": "model.onnx"}
# run.json keys that describe training, copied as provenance; "labels"/"max_length" get their own fields.
PROVENANCE_SKIP = {"labels", "max_length", "costs", "evaluation", "dev", "dev_metrics"}
EVALUATION_KEYS = ("evaluation", "dev", "dev_metrics", "best_single")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def evaluation_from_run(info: dict) -> dict:
    out = {key: info[key] for key in EVALUATION_KEYS if key in info}
    out.update({k: v for k, v in info.items() if k.startswith("dev_") and k not in out and k != "dev_data"})
    return out


def provenance_from_run(info: dict, run: Path) -> dict:
    out = {k: v for k, v in info.items() if k not in PROVENANCE_SKIP and not k.startswith("dev_")}
    out["run"] = str(Path(run).resolve())
    return out


def write_bundle(out: Path, files: dict[str, Path], manifest: dict, force: bool = False) -> dict:
    """Copy `files` ({bundle name: source path}) into `out` with their checksums and write router.json.

    The bundle is assembled beside `out` and renamed into place, so a failed export never leaves
    a half-written bundle where an app expects a whole one.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            from zooter.errors import UserError

            raise UserError(f"{out}: exists and is not empty; pass --force to replace it")
        if not (out / MANIFEST).is_file():
            from zooter.errors import UserError

            raise UserError(f"{out}: exists and is not a bundle; refusing to replace it")
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    entries = {}
    for name, src in files.items():
        shutil.copyfile(src, staging / name)
        entries[name] = {"sha256": sha256_file(staging / name), "bytes": (staging / name).stat().st_size}
    manifest = {"format_version": FORMAT_VERSION, **manifest, "files": entries}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return manifest


def bundle_bytes(manifest: dict) -> int:
    return sum(entry["bytes"] for entry in manifest["files"].values())


# --- run -> bundle --------------------------------------------------------------------------------
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


def _routing_or_lines(path: str | Path) -> Validation:
    from zooter.runtime.bench import read_queries
    from zooter.training.dataset import DataError, RoutingDataset

    try:
        data = RoutingDataset.load(path)
    except (DataError, UnicodeDecodeError):  # not routing data: plain queries, one a line (or another JSON layout)
        return Validation(read_queries(path), str(path))
    return Validation(list(data.queries), str(path), data)


def run_dev_queries(run: Path, info: dict) -> Validation | None:
    """The run's dev rows: the --dev file training used, else the same hash-held-out share of its
    --data that training held out (training.train.split_dev), else RUN/dev.jsonl."""
    config = info.get("config") if isinstance(info.get("config"), dict) else {}
    dev = config.get("dev") or info.get("dev_data")
    if isinstance(dev, str) and Path(dev).is_file():
        return _routing_or_lines(dev)
    data = info.get("data") or config.get("data")
    if isinstance(data, str) and Path(data).is_file():
        from zooter.training.dataset import RoutingDataset
        from zooter.training.train import split_dev

        _, dev_rows = split_dev(RoutingDataset.load(data), None)
        return Validation(list(dev_rows.queries), f"{data} (training's dev hold-out)", dev_rows)
    if (run / "dev.jsonl").is_file():
        return _routing_or_lines(run / "dev.jsonl")
    return None


def _tokenizer_json(run: Path, hf_tokenizer, work: Path) -> Path:
    path = run / "encoder" / "tokenizer.json"
    if path.is_file():
        return path
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        from zooter.errors import UserError

        raise UserError(f"{run}/encoder: no tokenizer.json and the tokenizer is not a fast one; the runtime needs tokenizer.json")
    backend.save(str(work / "tokenizer.json"))
    return work / "tokenizer.json"


def _costs(candidates_file, labels, info: dict) -> dict | None:
    if candidates_file:
        from zooter.training.candidates import costs_for, load_candidates

        costs = costs_for(load_candidates(candidates_file), labels)
        if costs is None:
            return None
        return {name: {"input_per_mtok": c.input_per_mtok, "output_per_mtok": c.output_per_mtok, "unit": c.unit}
                for name, c in costs.items()}
    costs = info.get("costs")
    if isinstance(costs, dict) and all(name in costs for name in labels):
        out = {}
        for name in labels:
            c = costs[name]
            if isinstance(c, dict) and "input_per_mtok" in c and "output_per_mtok" in c:
                unit = (float(c["input_per_mtok"]) + float(c["output_per_mtok"])) / 2
                out[name] = {"input_per_mtok": float(c["input_per_mtok"]), "output_per_mtok": float(c["output_per_mtok"]), "unit": unit}
            else:
                return None
        return out
    return None


def export_bundle(run: str | Path, out: str | Path, quantize: str = "int8", opset: int | None = None,
                  calib: str | Path | None = None, allow_drift: bool = False, candidates: str | Path | None = None,
                  lam: float = 0.0, parity_n: int = 1000, arch: str = "auto", keep_fp32: bool = False,
                  force: bool = False, log=print) -> dict:
    """RUN folder -> ONNX -> fused -> int8/fp16 -> parity gate -> BUNDLE folder; returns router.json."""
    import tempfile
    import time

    from tqdm import tqdm

    from zooter.errors import UserError
    from zooter.export import parity as par
    from zooter.export.onnx_export import export_onnx
    from zooter.export.quantize import OPTIMIZATION_LEVEL, optimize, quantize_int8
    from zooter.runtime.router import open_session
    from zooter.runtime.tokenize import load_tokenizer
    from zooter.training.model import RouterModel

    if quantize not in MODEL_FILES:
        raise UserError(f"--quantize {quantize}: choose int8, fp16 or none")
    run, out = Path(run), Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: exists and is not empty; pass --force to replace it")
    info = read_run_info(run)
    if calib and not Path(calib).is_file():
        raise UserError(f"{calib}: no such --calib file")
    validation = _routing_or_lines(calib) if calib else run_dev_queries(run, info)
    if validation is None:
        raise UserError(f"{run}: run.json names no dev rows for the parity check; pass --calib FILE (queries, or routing JSONL)")
    texts, calib_path = validation.texts[:parity_n], validation.source
    if not texts:
        raise UserError(f"{calib_path}: no queries for the parity check")
    recorded = info.get("candidates_file")
    if not candidates and isinstance(recorded, str) and Path(recorded).is_file():
        candidates = recorded

    started = time.perf_counter()
    model, hf_tokenizer, info = RouterModel.load(run)
    labels = list(model.labels)
    limit = int(getattr(model.config, "max_position_embeddings", 512) or 512)
    max_length = int(info.get("max_length") or min(getattr(hf_tokenizer, "model_max_length", limit), limit))
    max_length = min(max_length, limit)
    costs = _costs(candidates, labels, info)
    if lam and costs is None:
        raise UserError(f"--lambda {lam} needs a price for every candidate: pass --candidates with costs")

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".zooter-export-", dir=out.parent) as tmp:
        work = Path(tmp)
        steps = tqdm(total=4, desc="export", unit="step", leave=False)
        io = export_onnx(model, work / "model.onnx", opset)
        steps.update()
        fp32_path, fused = optimize(work / "model.onnx", model.config, work / "opt")
        steps.update()
        quant: dict = {"mode": quantize, "optimization_level": OPTIMIZATION_LEVEL, "fused_operators": fused}
        if quantize == "int8":
            shipped, details = quantize_int8(fp32_path, work / "int8", arch)
            quant.update(details)
        elif quantize == "fp16":
            shipped, fused16 = optimize(work / "model.onnx", model.config, work / "fp16", fp16=True)
            quant.update({"weights": "float16", "io": "float32", "fused_operators": fused16, "target": "gpu"})
        else:
            shipped = fp32_path
        steps.update()
        tokenizer_path = _tokenizer_json(run, hf_tokenizer, work)
        steps.update()
        steps.close()

        tokenizer = load_tokenizer(tokenizer_path, max_length)
        bar = tqdm(total=len(texts) * (3 if shipped != fp32_path else 2), desc="parity", unit="query", leave=False)
        reference = par.torch_probabilities(model, tokenizer, texts, max_length, io["inputs"], progress=bar)
        fp32_probs = par.onnx_probabilities(open_session(fp32_path, ["CPUExecutionProvider"]), tokenizer, texts, max_length, progress=bar)
        # One query per call, as Router.route runs it: dynamic int8 scales come from the whole batch
        # (padding included), so a batched check would not measure what single-query routing does.
        shipped_probs = fp32_probs if shipped == fp32_path else par.onnx_probabilities(
            open_session(shipped, ["CPUExecutionProvider"]), tokenizer, texts, max_length, batch_size=1, progress=bar)
        bar.close()
        parity = par.compare(reference, shipped_probs)
        parity.update(model=quantize if quantize != "none" else "fp32", reference="pytorch", data=str(calib_path),
                      threshold=par.MIN_AGREEMENT, fp32=par.compare(reference, fp32_probs))
        rewards = validation.rewards(labels, len(texts))
        if rewards is not None:
            parity["routed_reward"] = par.routed_reward(rewards, reference, shipped_probs)
        parity["passed"] = parity["decision_agreement"] >= par.MIN_AGREEMENT
        par.gate(parity, allow_drift)

        files = {MODEL_FILES[quantize]: shipped, "tokenizer.json": tokenizer_path}
        if keep_fp32 and quantize != "none":
            files[MODEL_FILES["none"]] = fp32_path
        manifest = {
            "labels": labels,
            "max_length": max_length,
            "model_file": MODEL_FILES[quantize],
            "inputs": io["inputs"],
            "output": io["output"],
            "opset": io["opset"],
            "quantization": quant,
            "costs": costs,
            "lambda": float(lam),
            "provenance": provenance_from_run(info, run),
            "parity": parity,
            "evaluation": evaluation_from_run(info),
        }
        manifest = write_bundle(out, files, manifest, force=force)
    log(f"bundle {out}: {' + '.join(manifest['files'])}, {bundle_bytes(manifest) / 1e6:.1f} MB, "
        f"{len(labels)} labels, built in {time.perf_counter() - started:.0f} s")
    return manifest


def read_run_info(run: Path) -> dict:
    path = Path(run) / "run.json"
    if not path.is_file():
        from zooter.errors import UserError

        raise UserError(f"{run}: not a zooter run (no run.json)")
    return json.loads(path.read_text(encoding="utf-8"))
