"""Routing latency through Triton against the in-process Router, measured side by side in one run.

For concurrency 1, 8 and 32: the in-process Router (threads sharing one Router, with the session
options of Triton's python-backend router, so only Triton's own overhead differs), Triton's
zooter_route over HTTP and over gRPC (one client per thread, one query per request, as an app
routes), in interleaved rounds so that load from elsewhere falls on all alike. Per-request latency
percentiles and throughput for each; from Triton's metrics endpoint, the mean queue and compute
time per request of each routing model during the Triton passes. Then every query is routed both
ways once more, one query per request, and the decisions compared (and again in batches of 32).

    triton_overhead_p50_ms = p50(HTTP, concurrency 1) - p50(in-process, concurrency 1)
    decisions_match        = [queries where Triton chose what the Router chose, queries]

With a candidate model named (`zooter bench --triton URL --bundle B --ttft MODEL`, `bench_ttft`): time to
first token through the `zooter` model against asking MODEL directly with the same request, streaming
over gRPC, beside the in-process Router on the same queries:

    ttft_delta_p50_ms          = p50(zooter) - p50(direct), concurrency 1
    ttft_delta_over_routing_ms = ttft_delta_p50_ms - p50(in-process routing): what Triton adds besides routing
"""

from __future__ import annotations

import queue
import resource
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from zooter.bench.report import Column, Table, find_cell, metric_samples, p50, percentiles, publish
from zooter.runtime.errors import UserError
from zooter.serving.triton_client import (ANSWER_MODEL, ROUTE_MODEL, TritonRequestError, connect, control, parse_url,
                                          route_rows, route_via_triton)

CONCURRENCY = (1, 8, 32)
METRIC_MODELS = ("zooter_route", "zooter_tokenize", "zooter_router", "zooter_decide")


def _neighbour(url: str, offset: int) -> str:
    """Triton's default layout: gRPC on the HTTP port + 1, metrics on + 2 (as `zooter serve` uses)."""
    host, _, port = url.rpartition(":")
    return f"{host or 'localhost'}:{int(port) + offset}"


def scrape(metrics_url: str) -> dict:
    """{(metric, model): value} of Triton's per-model inference counters."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    return {(name, labels["model"]): value for name, labels, value in metric_samples(text)
            if name.startswith("nv_inference_") and set(labels) == {"model", "version"}}


def server_side(before: dict, after: dict, models: Sequence[str] = METRIC_MODELS) -> dict:
    """Mean queue / compute (and its input, infer, output parts) / total ms per request of each of
    `models` between two scrapes."""
    out = {}
    for model in models:
        def delta(metric):
            return after.get((metric, model), 0.0) - before.get((metric, model), 0.0)

        n = delta("nv_inference_request_success")
        if n <= 0:
            continue
        out[model] = {"requests": int(n),
                      "queue_ms": delta("nv_inference_queue_duration_us") / n / 1000,
                      "compute_ms": (delta("nv_inference_compute_input_duration_us")
                                     + delta("nv_inference_compute_infer_duration_us")
                                     + delta("nv_inference_compute_output_duration_us")) / n / 1000,
                      **{f"compute_{part}_ms": delta(f"nv_inference_compute_{part}_duration_us") / n / 1000
                         for part in ("input", "infer", "output")},
                      "request_ms": delta("nv_inference_request_duration_us") / n / 1000,
                      "executions": int(delta("nv_inference_exec_count"))}
    return out


class ClientPool:
    """`size` threads, each with the caller `make_call()` made on that thread (an HTTP client stays on
    the thread that made it), kept across rounds as an app keeps its connections: new clients every
    round would time connection set-up, with only a few requests a client. close() ends the threads,
    each closing its own client (`call.close`, when the caller has one): the server's stop waits on
    open connections."""

    def __init__(self, make_call: Callable[[], Callable[[str], object]], size: int):
        self._jobs = [queue.SimpleQueue() for _ in range(size)]
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._serve, args=(make_call, jobs), daemon=True) for jobs in self._jobs]
        for t in self._threads:
            t.start()
        failures = [err for err in (self._done.get() for _ in self._threads) if err is not None]
        if failures:
            self.close()
            raise failures[0]

    def _serve(self, make_call, jobs) -> None:
        # Every job answers on _done, errors included, or each() would wait for ever.
        try:
            call = make_call()
        except BaseException as err:
            self._done.put(err)
            return
        self._done.put(None)
        try:
            while (job := jobs.get()) is not None:
                try:
                    job(call)
                except BaseException as err:
                    self._done.put(err)
                else:
                    self._done.put(None)
        finally:
            close = getattr(call, "close", None)
            if close is not None:
                close()

    def each(self, job: Callable[[Callable[[str], object]], None]) -> None:
        """Run job(call) on every thread at once; return when all have finished (raise the first error)."""
        for jobs in self._jobs:
            jobs.put(job)
        failures = [err for err in (self._done.get() for _ in self._jobs) if err is not None]
        if failures:
            raise failures[0]

    def close(self) -> None:
        for jobs in self._jobs:
            jobs.put(None)
        for t in self._threads:
            t.join(timeout=10)

    def __enter__(self) -> "ClientPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_concurrent(pool: ClientPool, queries: Sequence[str], requests: int, timed_by_call: bool = False) -> dict:
    """`requests` calls spread over the pool's threads, each on its own client; a call's latency is its
    duration, or (`timed_by_call`) the milliseconds it returns (time to first token, say)."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker(call):
        mine = []
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            start = time.perf_counter()
            try:
                answered = call(queries[i % len(queries)])
            except Exception as err:  # counted and reported; a benchmark must not stop at one failure
                with lock:
                    errors.append(str(err)[:200])
                continue
            mine.append(float(answered) if timed_by_call else (time.perf_counter() - start) * 1000)
        with lock:
            latencies.extend(mine)

    cpu, start = _process_cpu_s(), time.perf_counter()
    pool.each(worker)
    wall = time.perf_counter() - start
    out = {"_latencies": latencies, "wall_s": wall, "cpu_s": _process_cpu_s() - cpu, "errors": len(errors)}
    if errors:
        out["first_error"] = errors[0]
    return out


def merge_cells(parts: list[dict]) -> dict:
    """One cell from several rounds: percentiles over all latencies, throughput over all wall time."""
    latencies = [ms for p in parts for ms in p.pop("_latencies")]
    wall = sum(p["wall_s"] for p in parts)
    out = percentiles(latencies) if latencies else {"n": 0}
    out.update(throughput_qps=len(latencies) / wall if wall else 0.0, errors=sum(p["errors"] for p in parts))
    if latencies:
        # This process's CPU per request: the routing itself for an in-process engine, the clients' own
        # work for Triton, which on one machine takes the cores the server needs.
        out["process_cpu_ms"] = sum(p["cpu_s"] for p in parts) * 1000 / (len(latencies) + out["errors"])
    first = next((p["first_error"] for p in parts if "first_error" in p), None)
    if first:
        out["first_error"] = first
    return out


def _route_one_by_one(url: str, queries: Sequence[str]) -> list[dict]:
    client, module = connect(url)
    try:
        return [route_rows(client, module, [q])[0] for q in queries]
    finally:
        client.close()


def triton_caller(url: str, protocol: str, model: str = ROUTE_MODEL):
    """make_call() -> call(text): one query a request to `model` on a client of its own (call.close
    closes it)."""
    def make_call():
        client, module = connect(url, protocol)
        outputs = [module.InferRequestedOutput("candidate"), module.InferRequestedOutput("probabilities")]

        def call(text):
            inp = module.InferInput("text", [1, 1], "BYTES")
            inp.set_data_from_numpy(np.array([[text.encode("utf-8")]], dtype=object))
            return client.infer(model, [inp], outputs=outputs).as_numpy("candidate")
        call.close = client.close
        return call
    return make_call


def _reachable(url: str, protocol: str) -> bool:
    try:
        client, _ = connect(url, protocol)
        return bool(client.is_model_ready(ROUTE_MODEL))
    except Exception:   # refused, wrong protocol on that port: not reachable
        return False


def bench_triton(url: str, bundle: str | Path, queries: Sequence[str], json_out: str | Path | None = None,
                 grpc_url: str | None = None, metrics_url: str | None = None,
                 concurrency: Sequence[int] = CONCURRENCY, requests: int | None = None, warmup: int = 10,
                 threads: int | None = None, providers: Sequence[str] | None = None, quiet: bool = False) -> dict:
    """Measure; print a table unless quiet; write JSON to json_out; return the report.

    url: Triton HTTP (host:port). grpc_url / metrics_url default to the HTTP port + 1 / + 2.
    requests: calls per (engine, concurrency) cell (default: max(len(queries), 4 * concurrency)).
    """
    protocol, http_address = parse_url(url)
    if protocol != "http":
        raise UserError("bench --triton takes the HTTP address (host:port); gRPC is found at the HTTP port + 1")
    grpc_address = parse_url(grpc_url)[1] if grpc_url else _neighbour(http_address, 1)
    metrics = metrics_url or f"http://{_neighbour(http_address, 2)}/metrics"
    queries = [q for q in queries if isinstance(q, str) and q.strip()]
    if not queries:
        raise UserError("no queries to benchmark")
    if not _reachable(http_address, "http"):
        raise UserError(f"no ready zooter_route at http://{http_address}; start one with `zooter serve`")

    from zooter.bench.micro_batcher import MicroBatcher
    from zooter.runtime.router import Router

    router = Router.load(bundle, providers=providers or ["CPUExecutionProvider"], threads=threads)
    batcher = MicroBatcher(router, window_ms=1.0)
    try:
        engines, notes, metrics = _engines(router, batcher, http_address, grpc_address, metrics)
        cells = _measure(engines, queries, concurrency, requests, warmup, metrics)
        decisions, max_diff = _decisions(router, batcher, http_address, queries, max(concurrency))
    finally:
        batcher.close()
    base, http = p50(cells, engine="in-process", concurrency=1), p50(cells, engine="triton-http", concurrency=1)
    grpc = p50(cells, engine="triton-grpc", concurrency=1)
    report = {
        "bundle": str(bundle), "triton_http": http_address, "triton_grpc": grpc_address, "queries": len(queries),
        "triton_overhead_p50_ms": (http - base) if http is not None and base is not None else None,
        "triton_grpc_overhead_p50_ms": (grpc - base) if grpc is not None else None,
        **decisions, "targets": _targets(cells, concurrency), "max_probability_diff": max_diff, "cells": cells,
        "notes": notes,
    }
    return publish(report, json_out, quiet, format_table)


def _engines(router, batcher, http_address: str, grpc_address: str, metrics: str):
    """({engine: make_call}, notes, the metrics URL or None when it does not answer): the in-process Router alone
    and micro-batched, Triton over HTTP, and over gRPC when it answers."""
    engines = {"in-process": lambda: (lambda text: router.route(text)),
               "in-process-batched": lambda: batcher.route,
               "triton-http": triton_caller(http_address, "http")}
    notes = []
    if _reachable(grpc_address, "grpc"):
        engines["triton-grpc"] = triton_caller(grpc_address, "grpc")
    else:
        notes.append(f"gRPC at {grpc_address} not reachable: skipped")
    try:
        scrape(metrics)
    except OSError:
        notes.append(f"metrics at {metrics} not reachable: no queue/compute split")
        metrics = None
    return engines, notes, metrics


def _measure(engines: dict, queries: Sequence[str], concurrency: Sequence[int], requests: int | None, warmup: int,
             metrics: str | None, timed_by_call: Sequence[str] = ()) -> list[dict]:
    """One cell per (engine, concurrency): percentiles and throughput, and Triton's own split from `metrics`.
    The engines named in `timed_by_call` return their own latency (see run_concurrent)."""
    for make_call in engines.values():   # the sessions and python stubs run once before timing
        with ClientPool(make_call, 1) as pool:
            pool.each(lambda call: [call(q) for q in queries[:warmup]])

    cells = []
    names = list(engines)
    for c in concurrency:
        n = requests or max(len(queries), 4 * c)
        pools = {}
        try:
            for name in names:
                pools[name] = ClientPool(engines[name], c)
            for pool in pools.values():          # every connection open and warm before timing
                pool.each(lambda call: call(queries[0]))
            # Interleaved rounds, the engine order rotating: load from other processes on this machine
            # then falls on every engine alike, and the ratios compare like with like.
            rounds = max(1, min(8, n // (2 * c)))
            parts = {name: [] for name in names}
            served = {name: ({}, {}) for name in names}
            for r in range(rounds):
                size = n // rounds + (1 if r < n % rounds else 0)
                for k in range(len(names)):
                    name = names[(r + k) % len(names)]
                    before = scrape(metrics) if metrics and name.startswith("triton") else None
                    parts[name].append(run_concurrent(pools[name], queries[r * size:] + queries[:r * size], size,
                                                      name in timed_by_call))
                    if before is not None:
                        after = scrape(metrics)
                        for key in set(before) | set(after):
                            served[name][0][key] = served[name][0].get(key, 0.0) + before.get(key, 0.0)
                            served[name][1][key] = served[name][1].get(key, 0.0) + after.get(key, 0.0)
        finally:
            for pool in pools.values():
                pool.close()
        for name in names:
            cell = merge_cells(parts[name])
            cell.update(engine=name, concurrency=c, rounds=rounds)
            if served[name][1]:
                cell["server"] = server_side(*served[name])
            cells.append(cell)
    return cells


def _decisions(router, batcher, http_address: str, queries: Sequence[str], top: int) -> tuple[dict, float]:
    """Every query routed in process and through Triton, compared: one query per request (as an app routes; no batch
    to share int8 scales with), from `top` clients at once, micro-batched, and in batches of 32. Returns the
    matching counts and the largest probability difference, one query per request."""
    in_process = [router.route(q) for q in queries]
    via_triton = _route_one_by_one(http_address, queries)
    concurrent = _route_concurrently(triton_caller(http_address, "http"), queries, top)
    micro = _route_concurrently(lambda: (lambda text: batcher.route(text).candidate), queries, top)
    matching = sum(a.candidate == b["candidate"] for a, b in zip(in_process, via_triton))
    max_diff = max(abs(a.probabilities[k] - b["probabilities"][k]) for a, b in zip(in_process, via_triton)
                   for k in a.probabilities)
    # Router.route_batch against route_via_triton, which form the same batches.
    batched = sum(a.candidate == b["candidate"] for a, b in
                  zip(router.route_batch(queries), route_via_triton(f"http://{http_address}", queries)))
    return {"decisions_match": [int(matching), len(queries)],
            "decisions_match_concurrent": [sum(a.candidate == b for a, b in zip(in_process, concurrent)), len(queries), top],
            "decisions_match_batched": [int(batched), len(queries)],
            "micro_batched_decisions_match": [sum(a.candidate == b for a, b in zip(in_process, micro)), len(queries), top]
            }, float(max_diff)


def _route_concurrently(make_call, queries: Sequence[str], clients: int) -> list[str]:
    """Every query routed once by `clients` threads at once (each with its own client): the chosen names."""
    out: list = [None] * len(queries)
    lock = threading.Lock()
    todo = iter(range(len(queries)))

    def worker(call):
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            name = call(queries[i])
            out[i] = name if isinstance(name, str) else (name.reshape(-1)[0].decode() if hasattr(name, "reshape") else str(name))

    with ClientPool(make_call, clients) as pool:
        pool.each(worker)
    return out


def _targets(cells: list[dict], concurrency: Sequence[int]) -> dict:
    """The issue's targets, read off the cells: overhead at concurrency 1, throughput and p50 ratios at the top."""
    def cell(engine, c):
        return find_cell(cells, engine=engine, concurrency=c)

    out, low, top = {}, min(concurrency), max(concurrency)
    base_low, base_top = cell("in-process", low), cell("in-process", top)
    for engine in ("triton-http", "triton-grpc"):
        a, b = cell(engine, low), cell(engine, top)
        if a and base_low:
            out[f"{engine}_c{low}_overhead_p50_ms"] = a["p50_ms"] - base_low["p50_ms"]
        if b and base_top:
            out[f"{engine}_c{top}_throughput_ratio"] = b["throughput_qps"] / base_top["throughput_qps"]
            out[f"{engine}_c{top}_p50_ratio"] = b["p50_ms"] / base_top["p50_ms"]
    batched = cell("in-process-batched", top)
    if batched and base_top:
        out[f"in-process-batched_c{top}_throughput_ratio"] = batched["throughput_qps"] / base_top["throughput_qps"]
    return out


# engine, concurrency, p50, p90, p99 (ms), requests a second, p50 / in-process p50, this process's CPU ms a request,
# then Triton's own queue / compute ms a request per model
TABLE = Table(Column("engine", 18, "<"), Column("conc", 4, fmt="d"), *(Column(t, 8, fmt=".2f") for t in ("p50", "p90", "p99")),
              Column("qps", 8, fmt=".1f"), Column("x in-proc p50", 14, fmt=".2f"), Column("CPU here", 9, fmt=".2f"),
              Column("server-side (queue / compute per request)", align="<", sep="  "))


def format_table(report: dict) -> str:
    lines = [f"routing latency, {report['queries']} queries, one query per request (ms)", TABLE.header()]
    base = {c["concurrency"]: c.get("p50_ms") for c in report["cells"] if c["engine"] == "in-process"}
    for c in report["cells"]:
        if not c["n"]:
            lines.append(f"{c['engine']:18s} {c['concurrency']:4d}  failed: {c.get('first_error', '')}")
            continue
        ratio = c["p50_ms"] / base[c["concurrency"]] if base.get(c["concurrency"]) else float("nan")
        server = "  ".join(f"{m.replace('zooter_', '')} {s['queue_ms']:.2f}/{s['compute_ms']:.2f}"
                           for m, s in c.get("server", {}).items())
        lines.append(TABLE.row(c["engine"], c["concurrency"], c["p50_ms"], c["p90_ms"], c["p99_ms"], c["throughput_qps"],
                               ratio, c.get("process_cpu_ms", float("nan")), server))
    m, n = report["decisions_match"]
    overhead = report["triton_overhead_p50_ms"]
    lines.append("CPU here: this process's CPU ms a request (in process: the routing; Triton: its clients, on the same cores)")
    lines.append(f"Triton overhead at p50 (HTTP, concurrency 1): {overhead:+.2f} ms (target <= 1 ms)")
    if report.get("triton_grpc_overhead_p50_ms") is not None:
        lines.append(f"Triton overhead at p50 (gRPC, concurrency 1): {report['triton_grpc_overhead_p50_ms']:+.2f} ms")
    lines.append(f"decisions through Triton = in-process, one query per request: {m}/{n} ({100 * m / n:.1f}%), "
                 f"max probability difference {report['max_probability_diff']:.2e}")
    mc, nc, clients = report["decisions_match_concurrent"]
    lines.append(f"decisions through Triton = in-process, {clients} clients at once (dynamic batching on): {mc}/{nc}")
    mb, nb = report["decisions_match_batched"]
    lines.append(f"decisions through Triton = in-process, batches of 32: {mb}/{nb} ({100 * mb / nb:.1f}%)")
    mm, nm, _ = report["micro_batched_decisions_match"]
    lines.append(f"in-process micro-batched (1 ms window) = one query at a time: {mm}/{nm}")
    for key, value in report["targets"].items():
        lines.append(f"target figure {key}: {value:.2f}")
    lines += [f"note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines)


def ttft_caller(grpc_address: str, model: str, max_tokens: int):
    """make_call() -> call(text) -> ms to the first response that carries text, streaming from `model` over one
    gRPC stream a client (kept open across requests, as the gateway keeps its channel). The request is the
    TensorRT-LLM ensemble I/O `zooter` takes and forwards: text_input, max_tokens, stream=true. The call waits
    for the answer's final response before it returns, so requests never overlap on a client."""
    def make_call():
        client, module = connect(grpc_address, "grpc")
        responses: queue.SimpleQueue = queue.SimpleQueue()
        client.start_stream(callback=lambda result, error: responses.put((time.perf_counter(), result, error)))

        def tensor(name, datatype, value):
            t = module.InferInput(name, [1, 1], datatype)
            t.set_data_from_numpy(np.array([[value]], dtype=object if datatype == "BYTES" else None))
            return t

        def call(text):
            inputs = [tensor("text_input", "BYTES", text.encode("utf-8")),
                      tensor("max_tokens", "INT32", np.int32(max_tokens)), tensor("stream", "BOOL", True)]
            start, first = time.perf_counter(), None
            client.async_stream_infer(model, inputs, enable_empty_final_response=True)
            while True:
                at, result, error = responses.get(timeout=300)
                if error is not None:
                    raise TritonRequestError(f"{model}: {error}")
                if first is None and result.as_numpy("text_output") is not None:
                    first = at
                final = result.get_response().parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    break
            if first is None:
                raise TritonRequestError(f"{model}: the answer carried no text_output")
            return (first - start) * 1000

        def close():
            client.stop_stream(cancel_requests=True)
            client.close()
        call.close = close
        return call
    return make_call


def bench_ttft(url: str, bundle: str | Path, queries: Sequence[str], direct_model: str, json_out: str | Path | None = None,
               grpc_url: str | None = None, concurrency: Sequence[int] = (1,), requests: int | None = None,
               warmup: int = 10, max_tokens: int = 4, threads: int | None = None, compare: Sequence[str] = (),
               quiet: bool = False) -> dict:
    """Time to first token through `zooter` against `direct_model` asked directly, and the in-process Router on the
    same queries, in interleaved rounds; print a table unless quiet; write JSON to json_out; return the report.
    Run it against a repository whose candidates `direct_model` answers, so both engines reach the same model.
    `compare`: more models with zooter's I/O timed alike in the same rounds (another version of the zooter model
    served beside it under another name, say), each with its own delta in `compared`."""
    protocol, http_address = parse_url(url)
    if protocol != "http":
        raise UserError("bench --triton takes the HTTP address (host:port); gRPC is found at the HTTP port + 1")
    grpc_address = parse_url(grpc_url)[1] if grpc_url else _neighbour(http_address, 1)
    queries = [q for q in queries if isinstance(q, str) and q.strip()]
    if not queries:
        raise UserError("no queries to benchmark")
    try:
        client, _ = connect(grpc_address, "grpc")
        ready = {model: bool(client.is_model_ready(model)) for model in (ANSWER_MODEL, direct_model, *compare)}
        client.close()
    except Exception as err:   # refused, wrong protocol on that port
        raise UserError(f"--triton: no Triton answers gRPC at {grpc_address} ({err}); start one with `zooter serve`") from None
    if not all(ready.values()):
        raise UserError(f"--ttft: {', '.join(m for m, ok in ready.items() if not ok)} not ready at {grpc_address}")

    from zooter.runtime.router import Router

    router = Router.load(bundle, providers=["CPUExecutionProvider"], threads=threads)
    engines = {"in-process": lambda: (lambda text: router.route(text)),
               "zooter": ttft_caller(grpc_address, ANSWER_MODEL, max_tokens),
               **{model: ttft_caller(grpc_address, model, max_tokens) for model in compare},
               "direct": ttft_caller(grpc_address, direct_model, max_tokens)}
    cells = _measure(engines, queries, concurrency, requests, warmup, None, timed_by_call=[e for e in engines if e != "in-process"])
    low = min(concurrency)
    routing, direct = p50(cells, engine="in-process", concurrency=low), p50(cells, engine="direct", concurrency=low)

    def deltas(engine: str) -> dict:
        through = p50(cells, engine=engine, concurrency=low)
        delta = through - direct if through is not None and direct is not None else None
        return {"ttft_delta_p50_ms": delta,
                "ttft_delta_over_routing_ms": None if delta is None or routing is None else delta - routing}

    report = {"bundle": str(bundle), "triton_grpc": grpc_address, "direct_model": direct_model, "queries": len(queries),
              "max_tokens": max_tokens, "concurrency": low, "routing_p50_ms": routing, **deltas("zooter"),
              "compared": {model: deltas(model) for model in compare}, "cells": cells}
    return publish(report, json_out, quiet, format_ttft)


# engine, concurrency, time to first token p50, p90, p99 (in process: the routing), this process's CPU ms a request
TTFT_TABLE = Table(Column("engine", 16, "<"), Column("conc", 4, fmt="d"), *(Column(t, 8, fmt=".2f") for t in ("p50", "p90", "p99")),
                   Column("CPU here", 9, fmt=".2f"))


def format_ttft(report: dict) -> str:
    lines = [f"time to first token through zooter and direct to {report['direct_model']}, streaming over gRPC "
             f"(in-process: the routing), {report['queries']} queries, ms", TTFT_TABLE.header()]
    for c in report["cells"]:
        if not c["n"]:
            lines.append(f"{c['engine']:16s} {c['concurrency']:4d}  failed: {c.get('first_error', '')}")
            continue
        lines.append(TTFT_TABLE.row(c["engine"], c["concurrency"], c["p50_ms"], c["p90_ms"], c["p99_ms"],
                                    c.get("process_cpu_ms", float("nan"))))
    for model, figures in {"zooter": report, **report.get("compared", {})}.items():
        if figures["ttft_delta_p50_ms"] is not None:
            lines.append(f"{model} - direct at p50 (concurrency {report['concurrency']}): {figures['ttft_delta_p50_ms']:+.2f} ms, "
                         f"of which routing in process {report['routing_p50_ms']:.2f} ms: "
                         f"{figures['ttft_delta_over_routing_ms']:+.2f} ms besides routing")
    lines.append("target: besides routing <= this machine's python-backend floor + 1.0 ms (zooter bench --triton-floor)")
    return "\n".join(lines)


def fallback_drill(url: str, query: str, model: str, requests: int = 8, max_tokens: int = 8,
                   spread_s: float = 4.0, key: str | None = None) -> dict:
    """Send `requests` answers through `zooter` spread over `spread_s` seconds, unload `model` halfway.

    Needs a server with model control (`zooter serve --model-control`) and its control `key`. Requests already handed
    to the model finish there (Triton drains a model before unloading it); later ones must be
    answered by the fallback. The model is loaded again afterwards. Returns how many were answered,
    by which candidate, how many by fallback, and the ones lost (errors).
    """
    from zooter.serving.triton_client import ask

    protocol, address = parse_url(url)
    if protocol != "http":
        raise UserError("the drill needs the HTTP address (host:port): it unloads through the repository API")
    answers, errors = [], []
    lock = threading.Lock()

    def one():
        try:
            chunks = list(ask(address, query, stream=False, max_tokens=max_tokens))
            with lock:
                answers.append({"candidate": chunks[-1].candidate, "note": chunks[-1].note})
        except Exception as err:  # a lost request: counted, reported
            with lock:
                errors.append(str(err)[:300])

    def repository(action):
        control(address, model, action, key)

    threads = [threading.Thread(target=one) for _ in range(requests)]
    unloader = threading.Thread(target=repository, args=("unload",))
    try:
        for i, t in enumerate(threads):
            if i == requests // 2:
                unloader.start()
            t.start()
            time.sleep(spread_s / requests)
        for t in threads:
            t.join()
    finally:
        if unloader.ident is not None:
            unloader.join()
        repository("load")
    by: dict[str, int] = {}
    for a in answers:
        by[a["candidate"]] = by.get(a["candidate"], 0) + 1
    return {"requests": requests, "answered": len(answers), "lost": len(errors), "errors": errors,
            "by_candidate": by, "fallbacks": sum(1 for a in answers if a["note"]),
            "fallback_note": next((a["note"] for a in answers if a["note"]), "")}
