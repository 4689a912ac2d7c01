"""Latency benchmarks of a bundle: PyTorch eager, ONNX fp32 and the shipped (INT8) model, side by side.

Every engine answers the same texts through the same tokenizer code, and the engines take turns
call by call, so a noisy machine slows them alike and the ratios stay fair. Timed: one call from
text to probabilities (tokenize + model + softmax), per query length and per batch size; plus the
user's own queries at their natural lengths, which `--budget-ms` checks (p99 of the shipped model).

PyTorch is measured only when the bundle's run folder is present and torch is installed; ONNX fp32
comes from the bundle when it carries model.onnx, else it is re-exported from the run.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from zooter.errors import UserError
from zooter.runtime import decision as rule
from zooter.runtime.tokenize import encode

LENGTHS = (16, 64, 256, 512)
BATCHES = (1, 8, 32)
RATIO_TOKENS = 64  # the single-query length whose p50 ratios the report headlines

# A built-in mix of the kinds of query a router sees: short chat, questions, code, long instructions.
BUILTIN_QUERIES = [
    "hi",
    "What is the capital of Australia?",
    "Translate 'where is the train station' into German.",
    "Write a haiku about autumn leaves.",
    "If a train travels 120 km in 1.5 hours, what is its average speed in km/h?",
    "Explain the difference between a process and a thread, with an example of when to use each.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n# Why is this slow for n = 40, and how would you fix it?",
    "Five houses stand in a row, each painted a different colour. The Englishman lives in the red house. "
    "The Spaniard owns the dog. Coffee is drunk in the green house. The Ukrainian drinks tea. "
    "The green house is immediately to the right of the ivory house. Who owns the zebra?",
    "Summarise the causes of the French Revolution in three bullet points, then give one counter-argument "
    "that historians have raised against the most common explanation.",
    "A patient presents with fatigue, pale skin and shortness of breath on exertion. Blood tests show low "
    "haemoglobin and low ferritin. What is the most likely diagnosis, and what follow-up questions would a "
    "clinician ask before starting treatment?",
    "Write a Python function that parses an ISO-8601 timestamp with an optional timezone offset and returns "
    "a timezone-aware datetime. Include tests for the edge cases: a trailing Z, fractional seconds, negative "
    "offsets, and an invalid month. Explain any library choices you make.",
    "Which of these is a prime number: 51, 57, 61 or 87? Show your reasoning.",
    "Draft a polite email to a landlord asking for the heating to be repaired before the weekend.",
    "Prove that the square root of 2 is irrational.",
    "You are given a list of meeting intervals [[0,30],[5,10],[15,20]]. Find the minimum number of rooms needed.",
    "What are the trade-offs between optimistic and pessimistic locking in a relational database?",
]


def read_queries(path: str | Path) -> list[str]:
    """Queries from a file: one a line, or JSON lines with "query" (routing data), "text", "prompt" or "turns"."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such queries file")
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if not lines or not lines[0].lstrip().startswith("{"):
        return lines
    out = []
    for number, line in enumerate(lines, start=1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: invalid JSON: {err.msg}") from None
        text = obj.get("query") or obj.get("text") or obj.get("prompt") or (obj.get("turns") or [None])[0]
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{path}:{number}: no query text (expected 'query', 'text', 'prompt' or 'turns')")
        out.append(text)
    return out


def texts_of_length(tokenizer_path: Path, pool: Sequence[str], tokens: int, count: int) -> list[str]:
    """`count` different texts of about `tokens` tokens each ([CLS] and [SEP] included), cut from the pool."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.no_truncation()
    tok.no_padding()
    text = " ".join(pool)
    enc = tok.encode(text, add_special_tokens=False)
    while len(enc.ids) < tokens * 2 + count:
        text = text + " " + text
        enc = tok.encode(text, add_special_tokens=False)
    body = max(1, tokens - 2)
    out = []
    step = max(1, (len(enc.ids) - body) // max(count, 1))
    for i in range(count):
        start = (i * step) % (len(enc.ids) - body)
        out.append(text[enc.offsets[start][0]:enc.offsets[start + body - 1][1]])
    return out


def percentiles(ms: Sequence[float], batch: int, cpu_ms: Sequence[float] | None = None) -> dict:
    a = np.asarray(ms)
    out = {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
           "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()),
           "qps": float(batch * 1000 / a.mean()), "n": int(len(a))}
    if cpu_ms is not None:
        # CPU time of this process per call: on a shared machine, close to what the call takes on a
        # core of its own (with one thread); with more threads it sums them.
        out["cpu_p50_ms"] = float(np.percentile(cpu_ms, 50))
    return out


# --- engines: each turns a list of texts into probabilities ---------------------------------------
def onnx_engine(router) -> Callable:
    return router.probabilities


def torch_engine(run: Path, tokenizer, max_length: int, inputs: Sequence[str], threads: int | None):
    """(infer, cold_start_ms) for the run's PyTorch model in eager mode."""
    import torch

    from zooter.training.model import RouterModel

    if threads:
        torch.set_num_threads(int(threads))
    start = time.perf_counter()
    model, _, _ = RouterModel.load(run)

    def infer(texts):
        feeds = encode(tokenizer, texts, max_length)
        with torch.inference_mode():
            logits = model(**{k: torch.from_numpy(feeds[k]) for k in inputs})["logits"]
        return rule.softmax(logits.numpy())

    infer(["cold start"])
    return infer, (time.perf_counter() - start) * 1000, model


def fp32_from_run(model, work: Path) -> Path:
    from zooter.export.onnx_export import export_onnx
    from zooter.export.quantize import optimize

    export_onnx(model, work / "model.onnx")
    path, _ = optimize(work / "model.onnx", model.config, work / "opt")
    return path


def measure(engines: dict[str, Callable], cells: list[dict], iters: int, warmup: int, progress=None) -> None:
    """Fill cell["results"][engine]; engines alternate call by call so load spikes hit them alike."""
    for cell in cells:
        times: dict[str, list[float]] = {name: [] for name in engines}
        cpu: dict[str, list[float]] = {name: [] for name in engines}
        inputs = cell.pop("_inputs")
        for i in range(warmup + iters):
            batch = inputs[i % len(inputs)]
            for name, infer in engines.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                infer(batch)
                if i >= warmup:
                    times[name].append((time.perf_counter() - start) * 1000)
                    cpu[name].append((time.process_time() - start_cpu) * 1000)
            if progress and i >= warmup:
                progress.update(1)
        cell["results"] = {name: percentiles(ms, cell["batch"], cpu[name]) for name, ms in times.items()}


def run_bench(bundle: str | Path, queries: Sequence[str] | None = None, run: str | Path | None = None,
              lengths: Sequence[int] = LENGTHS, batches: Sequence[int] = BATCHES, iters: int = 20, warmup: int = 3,
              threads: int | None = None, providers: Sequence[str] | None = None, with_torch: bool = True) -> dict:
    import tempfile

    from tqdm import tqdm

    from zooter.runtime.router import Router, open_session, read_manifest

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    shipped = {"model.int8.onnx": "int8", "model.fp16.onnx": "fp16"}.get(manifest["model_file"], "fp32")
    queries = list(queries or BUILTIN_QUERIES)
    report: dict = {"bundle": str(bundle), "model_file": manifest["model_file"], "shipped": shipped,
                    "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                                "python": sys.version.split()[0]},
                    "threads": threads, "iters": iters, "warmup": warmup, "engines": {}, "skipped": {}}
    engines: dict[str, Callable] = {}
    max_length = int(manifest["max_length"])

    with tempfile.TemporaryDirectory(prefix="zooter-bench-") as tmp:
        # Cold start: from files on disk to the first answer, in this process (libraries already imported).
        start = time.perf_counter()
        router = Router.load(bundle, providers=providers, threads=threads)
        router.route(queries[0])
        report["engines"][shipped] = {"cold_start_ms": (time.perf_counter() - start) * 1000, "file": manifest["model_file"],
                                      "providers": router.providers}
        report["providers"] = router.providers

        run_dir = Path(run) if run else Path(manifest.get("provenance", {}).get("run", "") or "/nonexistent")
        torch_model = None
        if not with_torch:
            report["skipped"]["torch"] = "--no-torch"
        elif not (run_dir / "run.json").is_file():
            report["skipped"]["torch"] = f"run folder {run_dir} not found (pass --run RUN)"
        else:
            try:
                import torch  # noqa: F401
            except ImportError:
                report["skipped"]["torch"] = "torch is not installed"
        if "torch" not in report["skipped"]:
            infer, cold, torch_model = torch_engine(run_dir, router.tokenizer, max_length, router.input_names, threads)
            engines["torch"] = infer
            report["engines"]["torch"] = {"cold_start_ms": cold, "run": str(run_dir)}

        if shipped != "fp32":
            start = time.perf_counter()
            if "model.onnx" in manifest["files"]:
                fp32 = Router.load(bundle, providers=providers, threads=threads, model_file="model.onnx")
                source = "bundle"
            elif torch_model is not None:
                path = fp32_from_run(torch_model, Path(tmp))
                start = time.perf_counter()  # the export is not part of the cold start
                fp32 = Router(open_session(path, providers, threads), router.tokenizer, dict(manifest, model_file="model.onnx"))
                source = "re-exported from the run"
            else:
                fp32 = None
                report["skipped"]["fp32"] = "the bundle has no model.onnx and the run is not available"
            if fp32 is not None:
                fp32.route(queries[0])
                report["engines"]["fp32"] = {"cold_start_ms": (time.perf_counter() - start) * 1000, "source": source}
                engines["fp32"] = onnx_engine(fp32)
        engines[shipped] = onnx_engine(router)

        tokenizer_path = bundle / "tokenizer.json"
        cells = []
        # The router reads at most max_length tokens: longer targets collapse into one capped cell.
        capped = sorted({min(int(t), max_length) for t in lengths})
        if capped != sorted(int(t) for t in lengths):
            report["capped_at_max_length"] = max_length
        for tokens in capped:
            cells.append({"tokens_target": tokens, "batch": 1,
                          "_inputs": [[t] for t in texts_of_length(tokenizer_path, queries, tokens, 16)]})
        for batch in batches:
            if batch > 1:
                n = min(RATIO_TOKENS, max_length)
                texts = texts_of_length(tokenizer_path, queries, n, batch * 4)
                cells.append({"tokens_target": RATIO_TOKENS, "batch": int(batch),
                              "_inputs": [texts[i:i + batch] for i in range(0, len(texts), batch)]})
        natural = {"tokens_target": None, "batch": 1, "_inputs": [[q] for q in queries]}
        for cell in cells + [natural]:
            sizes = [len(e.ids) for b in cell["_inputs"] for e in router.tokenizer.encode_batch(b)]
            cell["tokens"] = float(np.mean(sizes))
        bar = tqdm(total=(len(cells) + 1) * iters, desc="bench", unit="round", leave=False)
        measure(engines, cells, iters, warmup, bar)
        measure(engines, [natural], max(iters, min(len(queries), 200)), warmup, bar)
        bar.close()

    report["cells"] = cells
    report["queries"] = dict(natural, n=len(queries))
    headline = next((c for c in cells if c["batch"] == 1 and c["tokens_target"] == RATIO_TOKENS), cells[0] if cells else natural)
    report["ratios"] = {f"{name}_vs_torch_p50": ratio(headline, name) for name in ("int8", "fp32")}
    report["ratios"].update({f"{name}_vs_torch_cpu_p50": ratio(headline, name, "cpu_p50_ms") for name in ("int8", "fp32")})
    report["ratios"]["at_tokens"] = headline["tokens"]
    report["ratios_by_cell"] = [{"tokens": c["tokens"], "batch": c["batch"],
                                 **{f"{name}_vs_torch_p50": ratio(c, name) for name in engines if name != "torch"}}
                                for c in cells]
    return report


def ratio(cell: dict, engine: str, key: str = "p50_ms") -> float | None:
    results = cell.get("results", {})
    if engine not in results or "torch" not in results:
        return None
    return results[engine][key] / results["torch"][key]


def check_budget(report: dict, budget_ms: float) -> dict:
    """The shipped model's p99 on the given queries (batch 1) against the budget."""
    p99 = report["queries"]["results"][report["shipped"]]["p99_ms"]
    report["budget"] = {"ms": budget_ms, "engine": report["shipped"], "p99_ms": p99, "passed": p99 <= budget_ms}
    return report["budget"]


def format_table(report: dict) -> str:
    engines = list(report["cells"][0]["results"]) if report["cells"] else list(report["queries"]["results"])
    lines = [f"{'tokens':>7} {'batch':>5} {'engine':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'q/s':>8} {'x torch':>8} {'cpu p50':>8}"]
    for cell in report["cells"] + [dict(report["queries"], label="yours")]:
        for name in engines:
            r = cell["results"][name]
            x = ratio(cell, name) if name != "torch" else None
            tokens = f"{cell['tokens']:.0f}" + ("*" if cell.get("label") else "")
            lines.append(f"{tokens:>7} {cell['batch']:>5} {name:>6} {r['p50_ms']:>8.2f} {r['p95_ms']:>8.2f} "
                         f"{r['p99_ms']:>8.2f} {r['qps']:>8.1f} {(f'{x:.2f}' if x is not None else '-'):>8} "
                         f"{r.get('cpu_p50_ms', float('nan')):>8.2f}")
    lines.append("* the given queries at their own lengths (mean tokens shown); cpu p50: process CPU ms per call")
    if report.get("capped_at_max_length"):
        lines.append(f"lengths above the router's max_length are cut to {report['capped_at_max_length']} tokens, as routing does")
    cold = ", ".join(f"{name} {e['cold_start_ms']:.0f} ms" for name, e in report["engines"].items())
    lines.append(f"cold start (load + first answer): {cold}")
    r = report["ratios"]
    if r.get("int8_vs_torch_p50") is not None or r.get("fp32_vs_torch_p50") is not None:
        parts = [f"{k.split('_')[0]} {v:.2f}x" for k, v in r.items() if k.endswith("_torch_p50") and v is not None]
        cpu = [f"{k.split('_')[0]} {v:.2f}x" for k, v in r.items() if k.endswith("_cpu_p50") and v is not None]
        lines.append(f"p50 vs PyTorch eager at {r['at_tokens']:.0f} tokens, batch 1: " + ", ".join(parts)
                     + " (CPU time: " + ", ".join(cpu) + ")")
    for name, why in report["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = [c for c in report["cells"] if c["batch"] == 1]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in single[0]["results"] if single else []:
        xs = [c["tokens"] for c in single]
        line, = ax.plot(xs, [c["results"][name]["p50_ms"] for c in single], marker="o", label=f"{name} p50")
        ax.plot(xs, [c["results"][name]["p99_ms"] for c in single], linestyle="--", color=line.get_color(), label=f"{name} p99")
    if "budget" in report:
        ax.axhline(report["budget"]["ms"], color="red", linewidth=0.8, label="budget")
    ax.set_xlabel("query length (tokens)")
    ax.set_ylabel("latency per query (ms)")
    ax.set_yscale("log")
    ax.set_title(f"zooter router latency, batch 1 ({report['model_file']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
