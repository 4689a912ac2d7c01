"""The gateway's cost, measured side by side in one run: through `zooter gateway` against calling the chosen
upstream directly, on a fast local stub upstream.

Three paths to the same upstream, each server its own process, all on 127.0.0.1:
    direct    the client calls the stub (OpenAI-compatible; a few tokens after a small fixed delay, streamed
              or not) naming the candidate the in-process Router chooses for the query
    proxy     a bare forwarder on the gateway's own stack (uvicorn, aiohttp): the price of one more HTTP hop
              on this machine, with no routing, checks or metrics
    gateway   `zooter gateway --bundle` in front of the stub, model "zooter"
The client is httpx (async) in this process; engines alternate in rounds, so load from other work falls
on all alike; request counts are fixed.

    overhead_p50_ms[c]   p50(gateway) - p50(direct), whole non-streamed answers, concurrency c (1 and 32);
                         target: at most the in-process routing p50 + 1 ms
    routing_ms           the gateway's own routing time per cell (its /metrics histogram: mean), and the
                         in-process Router's p50 on the same queries, called back to back
    ttft_delta_p50_ms    p50 time to first token through the gateway - direct, streaming, concurrency 1; target:
                         at most the in-process routing p50 + 1 ms
    gateway_cpu_ms_per_request[cell]   CPU time of the gateway process (all its threads) over the requests it
                         served in the cell, divided by their count; routing_cpu_ms_per_request[cell] the same
                         requests routed in this process (CPU time); target: the difference at most 1 ms.
                         proxy_cpu_ms_per_request: the bare forwarder's, the floor of one hop on this stack
    soak                 32 concurrent streaming clients x 20 requests through the gateway: errors (target 0)

On 2 cores shared by client, gateway and upstream, latency at concurrency 32 is bounded by CPU: the CPU per
request says what a deployment needs; a p50 ratio there says little.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from zooter.bench.latency import BUILTIN_QUERIES
from zooter.bench.processes import stop_processes
from zooter.bench.report import Column, Table, metric_value, p50, percentiles, publish
from zooter.runtime.errors import UserError
from zooter.servers.tritonserver import free_port

CONCURRENCY = (1, 32)


# --- processes ------------------------------------------------------------------------------------------
def _wait_http(url: str, process: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserError(f"{what} exited with code {process.returncode} while starting")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise UserError(f"{what} did not answer {url} within {timeout:.0f} s")


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far, all its threads: the sum of their /proc schedstat run times
    (nanoseconds), else utime + stime from /proc/<pid>/stat (clock ticks, 10 ms apart: coarse for a few requests)."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except FileNotFoundError:     # a thread that ended meanwhile
                continue
        return total / 1e9
    except (FileNotFoundError, PermissionError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def routing_cpu_ms(router, queries: Sequence[str]) -> float:
    """CPU milliseconds per query of routing `queries` in this process, one after another (the gateway reads the
    same text: a lone user message as it is)."""
    start = time.process_time()
    for q in queries:
        router.route(q)
    return (time.process_time() - start) * 1000 / len(queries)


# --- the client -----------------------------------------------------------------------------------------
async def _one(client, url: str, body: bytes, stream: bool) -> tuple[float, float | None]:
    """(ms to the whole answer, ms to the first token when streaming); raises on anything but a whole answer."""
    start = time.perf_counter()
    if not stream:
        response = await client.post(url, content=body)
        if response.status_code != 200 or not response.json()["choices"][0]["message"]["content"]:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        return (time.perf_counter() - start) * 1000, None
    first, done = None, False
    async with client.stream("POST", url, content=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            data = json.loads(line[5:])
            if "error" in data:
                raise RuntimeError(f"error event: {data['error'].get('message')}")
            if first is None and (data["choices"][0]["delta"].get("content") or "").strip():
                first = (time.perf_counter() - start) * 1000
    if not done or first is None:
        raise RuntimeError("the stream ended without [DONE]" if first is not None else "no token in the stream")
    return (time.perf_counter() - start) * 1000, first


async def _run(client, url: str, bodies: Sequence[bytes], concurrency: int, stream: bool) -> dict:
    """Every body once, `concurrency` at a time."""
    results, errors = [], []
    todo = iter(bodies)

    async def worker():
        for body in todo:
            try:
                results.append(await _one(client, url, body, stream))
            except Exception as err:   # counted and reported: a benchmark does not stop at one failure
                # The type too: a transport error's message may be empty (httpx.ReadError from a reset connection).
                errors.append(f"{type(err).__name__}: {err}"[:200])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"total": [r[0] for r in results], "ttft": [r[1] for r in results if r[1] is not None],
            "errors": errors, "wall_s": time.perf_counter() - start}


def _routing_seconds(gateway: str) -> tuple[float, float]:
    """(sum, count) of the gateway's routing histogram, over its routers (a reload adds one)."""
    import httpx

    text = httpx.get(gateway + "/metrics", timeout=10).text
    return (metric_value(text, "zooter_gateway_routing_seconds_sum"),
            metric_value(text, "zooter_gateway_routing_seconds_count"))


def _cell(engine: str, concurrency: int, mode: str, parts: list[dict], key: str = "total") -> dict:
    values = [v for p in parts for v in p[key]]
    errors = [e for p in parts for e in p["errors"]]
    cell = {"engine": engine, "concurrency": concurrency, "mode": mode, **(percentiles(values) if values else {"n": 0}),
            "throughput_rps": len(values) / sum(p["wall_s"] for p in parts), "errors": len(errors)}
    if errors:
        cell["first_error"] = errors[0]
    return cell


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "unknown")


async def _measure(servers: dict[str, str], pids: dict[str, int], chosen: dict[str, str], queries: Sequence[str],
                   requests: int, rounds: int, concurrency: Sequence[int], stream_clients: int, stream_requests: int,
                   tokens: int) -> dict:
    import httpx

    def picks(n: int, seed: int) -> list[str]:
        return random.Random(seed).choices(list(queries), k=n)

    def bodies(n: int, model_of, stream: bool, seed: int) -> list[bytes]:
        picked = picks(n, seed)
        return [json.dumps({"model": model_of(q), "messages": [{"role": "user", "content": q}], "max_tokens": tokens,
                            "stream": stream}).encode() for q in picked]

    gateway = servers["gateway"]
    urls = {engine: url + "/v1/chat/completions" for engine, url in servers.items()}
    models = {"direct": chosen.__getitem__, "proxy": chosen.__getitem__, "gateway": lambda q: "zooter"}
    limits = httpx.Limits(max_connections=max(*concurrency, stream_clients), max_keepalive_connections=64)
    cells, routing, cpu, sent = [], {}, {engine: {} for engine in pids}, {}
    async with httpx.AsyncClient(limits=limits, timeout=60, headers={"content-type": "application/json"}) as client:
        for engine in urls:                       # warm every path: connections, the router's first calls
            await _run(client, urls[engine], bodies(20, models[engine], False, 0), 4, False)
        plan = [(c, "answer", False) for c in concurrency] + [(1, "stream", True)]
        for c, mode, stream in plan:
            parts: dict[str, list] = {engine: [] for engine in urls}
            used = {engine: 0.0 for engine in pids}
            key = f"{mode}@{c}"
            sent[key] = []
            before = _routing_seconds(gateway)
            for r in range(rounds):
                order = list(urls)[r % len(urls):] + list(urls)[:r % len(urls)]
                for engine in order:
                    batch = bodies(requests // rounds, models[engine], stream, seed=1000 * c + r)
                    if engine == "gateway":
                        sent[key] += picks(requests // rounds, seed=1000 * c + r)
                    spent = cpu_seconds(pids[engine]) if engine in pids else 0.0
                    parts[engine].append(await _run(client, urls[engine], batch, c, stream))
                    if engine in pids:
                        used[engine] += cpu_seconds(pids[engine]) - spent
            after = _routing_seconds(gateway)
            if after[1] > before[1]:
                routing[key] = (after[0] - before[0]) / (after[1] - before[1]) * 1000
            for engine, seconds in used.items():
                cpu[engine][key] = seconds * 1000 / (rounds * (requests // rounds))
            for engine in parts:
                cells.append(_cell(engine, c, mode, parts[engine]))
                if stream:
                    cells.append(_cell(engine, c, "ttft", parts[engine], key="ttft"))
        soak = await _run(client, urls["gateway"], bodies(stream_clients * stream_requests, models["gateway"], True, 7),
                          stream_clients, True)
    return {"cells": cells, "gateway_routing_mean_ms": routing, "gateway_cpu_ms_per_request": cpu["gateway"],
            "proxy_cpu_ms_per_request": cpu["proxy"], "sent": sent,
            "soak": {"clients": stream_clients, "requests": stream_clients * stream_requests,
                     "answered": len(soak["total"]), "errors": len(soak["errors"]),
                     "first_error": soak["errors"][0] if soak["errors"] else None,
                     "p50_ms": percentiles(soak["total"])["p50_ms"] if soak["total"] else None}}


def bench_gateway(bundle: str | Path, queries: Sequence[str] | None = None, json_out: str | Path | None = None,
                  requests: int = 200, rounds: int = 4, concurrency: Sequence[int] = CONCURRENCY,
                  stream_clients: int = 32, stream_requests: int = 20, tokens: int = 8, delay_ms: float = 2.0,
                  quiet: bool = False) -> dict:
    """Run the comparison; returns the report (and writes it to `json_out`). See the module docstring."""
    from zooter.runtime.router import Router

    queries = list(queries or BUILTIN_QUERIES)
    router = Router.load(bundle)
    timings = []
    for _ in range(3):
        for q in queries:
            start = time.perf_counter()
            router.route(q)
            timings.append((time.perf_counter() - start) * 1000)
    routing_p50 = percentiles(timings)["p50_ms"]
    chosen = {q: router.route(q).candidate for q in queries}
    processes = []
    with tempfile.TemporaryDirectory(prefix="zooter-gateway-bench-") as work:
        try:
            def start(what: str, argv: list[str], ready_path: str) -> str:
                port = free_port()
                process = subprocess.Popen([*argv, "--port", str(port)], stdout=subprocess.DEVNULL)
                processes.append(process)
                url = f"http://127.0.0.1:{port}"
                _wait_http(url + ready_path, process, what)
                return url

            def python(function: str, *args) -> list[str]:     # `function(port, *args)` in a process of its own
                return [sys.executable, "-c", "import sys; from zooter.bench import openai_stub as b; "
                        f"b.{function}(int(sys.argv[-1]), {', '.join(map(repr, args))})"]

            direct = start("the stub upstream", python("run_stub", int(tokens), float(delay_ms)), "/v1/models")
            proxy = start("the bare proxy", python("run_proxy", direct), "/v1/models")
            candidates = Path(work) / "candidates.yaml"
            candidates.write_text(json.dumps([{"name": n, "serve": {"openai_base_url": direct + "/v1"}}
                                              for n in router.labels]))
            gateway = start("zooter gateway", [sys.executable, "-m", "zooter.cli", "gateway", "--bundle", str(bundle),
                                               "--candidates", str(candidates), "--log-level", "warning"], "/health")
            pids = {"proxy": processes[1].pid, "gateway": processes[2].pid}
            measured = asyncio.run(_measure({"direct": direct, "proxy": proxy, "gateway": gateway}, pids, chosen,
                                            queries, requests, rounds, concurrency, stream_clients, stream_requests,
                                            tokens))
        finally:
            stop_processes(reversed(processes), grace=15)
    # The same requests the gateway routed in a cell, routed here: what routing alone costs in CPU.
    measured["routing_cpu_ms_per_request"] = {key: routing_cpu_ms(router, texts)
                                              for key, texts in measured.pop("sent").items()}
    report = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "bundle": str(bundle), "queries": len(queries),
              "upstream": {"tokens": tokens, "delay_ms": delay_ms}, "routing_in_process_p50_ms": routing_p50,
              **measured}
    report.update(summarize(report))
    return publish(report, json_out, quiet, format_table)


def summarize(report: dict) -> dict:
    """The figures the targets are about, and whether each is met."""
    def gap(engine, c, mode):     # p50 of `engine` less p50 direct
        cells = report["cells"]
        return p50(cells, engine=engine, concurrency=c, mode=mode) - p50(cells, engine="direct", concurrency=c, mode=mode)

    overhead, hop, targets = {}, {}, {}
    for c in sorted({x["concurrency"] for x in report["cells"] if x["mode"] == "answer"}):
        overhead[str(c)] = gap("gateway", c, "answer")
        hop[str(c)] = gap("proxy", c, "answer")
        targets[f"overhead_p50_at_{c}_within_routing_plus_1ms"] = overhead[str(c)] <= report["routing_in_process_p50_ms"] + 1.0
    ttft = gap("gateway", 1, "ttft")
    targets["ttft_within_routing_plus_1ms_of_direct"] = ttft <= report["routing_in_process_p50_ms"] + 1.0
    cpu_over_routing = {key: gw - report["routing_cpu_ms_per_request"][key]
                        for key, gw in report["gateway_cpu_ms_per_request"].items()}
    for key, extra in cpu_over_routing.items():
        targets[f"gateway_cpu_at_{key.replace('@', '_')}_within_routing_cpu_plus_1ms"] = extra <= 1.0
    targets["soak_zero_errors"] = report["soak"]["errors"] == 0 and report["soak"]["answered"] == report["soak"]["requests"]
    return {"overhead_p50_ms": overhead, "bare_hop_p50_ms": hop, "ttft_delta_p50_ms": ttft,
            "gateway_cpu_over_routing_ms": cpu_over_routing, "targets": targets}


# mode @ concurrency; p50 direct, through the bare proxy, through the gateway; gateway - direct, gateway - proxy;
# the gateway's p95; errors of all three (ms); CPU ms per request of the gateway, of routing the same requests in
# process, of the bare proxy
TABLE = Table(Column("p50 ms", 24, "<"), *(Column(t, 8, fmt=".2f") for t in ("direct", "proxy", "gateway")),
              Column("gw-direct", 10, fmt="+.2f"), Column("gw-proxy", 9, fmt="+.2f"), Column("gw p95", 7, fmt=".2f"),
              Column("errors", 6, fmt="d"), Column("gw cpu", 7, fmt=".2f"), Column("route cpu", 9, fmt=".2f"),
              Column("proxy cpu", 9, fmt=".2f"))


def format_table(report: dict) -> str:
    lines = [f"gateway vs direct ({report['cpu']}; stub upstream: {report['upstream']['tokens']} tokens after "
             f"{report['upstream']['delay_ms']:g} ms; in-process routing p50 {report['routing_in_process_p50_ms']:.2f} ms)",
             TABLE.header()]
    cells = {(x["engine"], x["concurrency"], x["mode"]): x for x in report["cells"]}
    for engine, c, mode in cells:
        if engine != "direct":
            continue
        d, p, g = (cells[(e, c, mode)] for e in ("direct", "proxy", "gateway"))
        key = f"{'stream' if mode == 'ttft' else mode}@{c}"
        lines.append(TABLE.row(f"{mode} @ concurrency {c}", d["p50_ms"], p["p50_ms"], g["p50_ms"], g["p50_ms"] - d["p50_ms"],
                               g["p50_ms"] - p["p50_ms"], g["p95_ms"], d["errors"] + p["errors"] + g["errors"],
                               report["gateway_cpu_ms_per_request"][key], report["routing_cpu_ms_per_request"][key],
                               report["proxy_cpu_ms_per_request"][key]))
    routing = ", ".join(f"{k} {v:.2f} ms" for k, v in report["gateway_routing_mean_ms"].items())
    soak = report["soak"]
    lines.append(f"the gateway's own routing time (mean): {routing}")
    lines.append(f"soak: {soak['clients']} streaming clients x {soak['requests'] // soak['clients']} requests through "
                 f"the gateway: {soak['answered']} answered, {soak['errors']} errors")
    lines.append("targets: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in report["targets"].items()))
    return "\n".join(lines)
