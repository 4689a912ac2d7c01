"""Latency benchmarks of a bundle: the shipped (INT8) model beside other engines, side by side.

Every engine answers the same texts through the same tokenizer code, and the engines take turns
call by call, so a noisy machine slows them alike and the ratios stay fair. Timed: one call from
text to probabilities (tokenize + model + softmax), per query length and per batch size; plus the
user's own queries at their natural lengths, which `--budget-ms` checks (p99 of the shipped model).
A batch is timed as Router.route_batch answers it (each query alone, so no decision depends on the
batch), and beside it the same model on one padded batch, the faster path that issue 20 retired.

`bench_bundle` is `zooter bench BUNDLE`: it adds the PyTorch and re-exported fp32 baselines
(zooter.bench.baselines, when torch is installed), prints the table, checks the budget, writes the
JSON and the plot. `run_bench` measures the ONNX engines a bundle carries beside any `baselines`.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from zooter.bench.report import Column, Table, percentiles, write_json

LENGTHS = (16, 64, 256, 512)
BATCHES = (1, 8, 32)
RATIO_TOKENS = 64  # the single-query length whose p50 ratios the report headlines
PADDED = "padded"  # the shipped model on one padded batch per call: route_batch before issue 20

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


@dataclass
class Engine:
    """Something to time: infer(texts) -> probabilities, with its cold start and a description."""

    infer: Callable
    cold_start_ms: float
    info: dict = field(default_factory=dict)


def measure(engines: dict[str, Callable], cells: list[dict], iters: int, warmup: int,
            progress: Callable[[int], None] | None = None) -> None:
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
                progress(1)
        cell["results"] = {name: percentiles(ms, cell["batch"], cpu[name]) for name, ms in times.items()}


def run_bench(bundle: str | Path, queries: Sequence[str] | None = None, baselines: dict[str, Engine] | None = None,
              skipped: dict[str, str] | None = None, lengths: Sequence[int] = LENGTHS, batches: Sequence[int] = BATCHES,
              iters: int = 20, warmup: int = 3, threads: int | None = None, providers: Sequence[str] | None = None,
              progress: Callable[[int], None] | None = None) -> dict:
    """Time the bundle's model, its fp32 model.onnx when it ships one, and `baselines` (say PyTorch),
    side by side; `progress(n)` is called as timed rounds finish. Returns the report (see format_table)."""
    from zooter.runtime.bundle import read_manifest
    from zooter.runtime.router import Router

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    shipped = {"model.int8.onnx": "int8", "model.fp16.onnx": "fp16"}.get(manifest["model_file"], "fp32")
    queries = list(queries or BUILTIN_QUERIES)
    report: dict = {"bundle": str(bundle), "model_file": manifest["model_file"], "shipped": shipped,
                    "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                                "python": sys.version.split()[0]},
                    "threads": threads, "iters": iters, "warmup": warmup, "engines": {}, "skipped": dict(skipped or {})}
    engines: dict[str, Callable] = {}
    max_length = int(manifest["max_length"])

    # Cold start: from files on disk to the first answer, in this process (libraries already imported).
    start = time.perf_counter()
    router = Router.load(bundle, providers=providers, threads=threads)
    router.route(queries[0])
    report["engines"][shipped] = {"cold_start_ms": (time.perf_counter() - start) * 1000, "file": manifest["model_file"],
                                  "providers": router.providers}
    report["providers"] = router.providers
    for name, engine in (baselines or {}).items():
        engines[name] = engine.infer
        report["engines"][name] = {"cold_start_ms": engine.cold_start_ms, **engine.info}
    if shipped != "fp32" and "fp32" not in engines:
        if "model.onnx" in manifest["files"]:
            start = time.perf_counter()
            fp32 = Router.load(bundle, providers=providers, threads=threads, model_file="model.onnx")
            fp32.route(queries[0])
            report["engines"]["fp32"] = {"cold_start_ms": (time.perf_counter() - start) * 1000, "source": "bundle"}
            engines["fp32"] = fp32.probabilities
        else:
            report["skipped"].setdefault("fp32", "the bundle has no model.onnx and no run to re-export it from")
    engines[shipped] = router.probabilities

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
    # Batches: the shipped model as route_batch runs it (each query alone: decisions independent of
    # the batch) beside the padded batch it ran before issue 20, taking turns like every engine.
    batched = [c for c in cells if c["batch"] > 1]
    measure(engines, [c for c in cells if c["batch"] == 1], iters, warmup, progress)
    measure({**engines, PADDED: lambda texts: router.probabilities(texts, batch_size=len(texts), padded=True)},
            batched, iters, warmup, progress)
    for cell in batched:
        cell["padded"] = cell["results"].pop(PADDED)
    measure(engines, [natural], max(iters, min(len(queries), 200)), warmup, progress)

    report["cells"] = cells
    report["queries"] = dict(natural, n=len(queries))
    report["batch_invariance"] = batch_invariance(router, queries)
    headline = next((c for c in cells if c["batch"] == 1 and c["tokens_target"] == RATIO_TOKENS), cells[0] if cells else natural)
    report["ratios"] = {f"{name}_vs_torch_p50": ratio(headline, name) for name in ("int8", "fp32")}
    report["ratios"].update({f"{name}_vs_torch_cpu_p50": ratio(headline, name, "cpu_p50_ms") for name in ("int8", "fp32")})
    report["ratios"]["at_tokens"] = headline["tokens"]
    report["ratios_by_cell"] = [{"tokens": c["tokens"], "batch": c["batch"],
                                 **{f"{name}_vs_torch_p50": ratio(c, name) for name in engines if name != "torch"}}
                                for c in cells]
    return report


def batch_invariance(router, queries: Sequence[str], batch: int = 32) -> dict:
    """How route_batch (batches of `batch`, in the given order) and the padded batches it replaced
    answer the queries, against route() on each alone: same decision means candidate, expected
    rewards and confidence all equal."""
    def key(d) -> dict:
        out = d.to_json()
        out.pop("latency_ms")
        return out

    alone = [key(router.route(q)) for q in queries]
    out = {"n": len(queries), "batch": batch}
    for name, padded in (("route_batch", False), ("padded", True)):
        got = [key(d) for i in range(0, len(queries), batch)
               for d in router.route_batch(queries[i:i + batch], batch_size=batch, padded=padded)]
        out[name] = {"same_candidate": sum(a["candidate"] == g["candidate"] for a, g in zip(alone, got)),
                     "same_decision": sum(a == g for a, g in zip(alone, got)),
                     "max_expected_reward_diff": max(abs(a["expected_rewards"][k] - g["expected_rewards"][k])
                                                     for a, g in zip(alone, got) for k in a["expected_rewards"])}
    return out


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


# tokens, batch, engine, p50, p95, p99, q/s, x torch, cpu p50 (ms unless said)
TABLE = Table(Column("tokens", 7), Column("batch", 5), Column("engine", 6), *(Column(t, 8, fmt=".2f") for t in (
    "p50 ms", "p95 ms", "p99 ms")), Column("q/s", 8, fmt=".1f"), Column("x torch", 8), Column("cpu p50", 8, fmt=".2f"))


def format_table(report: dict) -> str:
    engines = list(report["cells"][0]["results"]) if report["cells"] else list(report["queries"]["results"])
    lines = [TABLE.header()]
    for cell in report["cells"] + [dict(report["queries"], label="yours")]:
        for name in engines:
            r = cell["results"][name]
            x = ratio(cell, name) if name != "torch" else None
            tokens = f"{cell['tokens']:.0f}" + ("*" if cell.get("label") else "")
            lines.append(TABLE.row(tokens, cell["batch"], name, r["p50_ms"], r["p95_ms"], r["p99_ms"], r["qps"],
                                   f"{x:.2f}" if x is not None else "-", r.get("cpu_p50_ms", float("nan"))))
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
    for cell in report["cells"]:
        if "padded" in cell:
            alone, padded = cell["results"][report["shipped"]]["qps"], cell["padded"]["qps"]
            lines.append(f"batch {cell['batch']} at {cell['tokens']:.0f} tokens, {report['shipped']}: each query alone "
                         f"(route_batch: decisions independent of the batch) {alone:.1f} q/s, one padded batch (before "
                         f"issue 20: decisions depend on the batch) {padded:.1f} q/s: {alone / padded:.2f}x")
    inv = report.get("batch_invariance")
    if inv:
        mine, old = inv["route_batch"], inv["padded"]
        lines.append(f"the given queries in batches of {inv['batch']}, against route() on each alone: route_batch "
                     f"{mine['same_decision']}/{inv['n']} the same decision; padded batches {old['same_decision']}/{inv['n']} "
                     f"({old['same_candidate']}/{inv['n']} the same candidate, expected rewards apart by up to "
                     f"{old['max_expected_reward_diff']:.4f})")
    for name, why in report["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def bench_bundle(bundle: str | Path, queries: Sequence[str] | None = None, run: str | Path | None = None,
                 torch: bool = True, budget_ms: float | None = None, json_out: str | Path | None = None,
                 plot: str | Path | None = None, make_progress: Callable[[], Callable[[int], None] | None] | None = None,
                 **options) -> int:
    """`zooter bench BUNDLE`: time the bundle beside PyTorch (from `run`, else the run the bundle names),
    print the table and the budget's verdict, write the JSON and the plot. Returns the exit status: 1 when
    the shipped model's p99 is over `budget_ms`. `make_progress()`, called once timing starts, gives run_bench's
    `progress`; `options` go to run_bench (lengths, batches, iters, ...)."""
    import tempfile

    from zooter.runtime.bundle import read_manifest

    manifest = read_manifest(bundle)
    with tempfile.TemporaryDirectory(prefix="zooter-bench-") as work:
        baselines, skipped = {}, {}
        if not torch:
            skipped["torch"] = "--no-torch"
        else:
            try:
                from zooter.bench.baselines import pytorch_baselines
            except ModuleNotFoundError as err:
                skipped["torch"] = f"{err.name} is not installed (the train extra)"
            else:
                run = run or (manifest.get("provenance") or {}).get("run") or "/nonexistent"
                baselines, skipped = pytorch_baselines(run, manifest, options.get("threads"), work)
        report = run_bench(bundle, queries, baselines=baselines, skipped=skipped,
                           progress=make_progress() if make_progress else None, **options)
    status = 0
    if budget_ms is not None:
        status = 0 if check_budget(report, budget_ms)["passed"] else 1
    print(format_table(report))
    if budget_ms is not None:
        b = report["budget"]
        verdict = "within" if b["passed"] else "OVER"
        print(f"budget: {b['engine']} p99 {b['p99_ms']:.2f} ms on the given queries is {verdict} {b['ms']:g} ms")
    if json_out:
        write_json(report, json_out)
    if plot:
        from zooter.bench.plots import latency

        latency(report, plot)
    return status
