"""The figures behind docs/deploy.md's capacity plan: CPU seconds per routed query (the Router in process) and
per request through `zooter gateway --bundle` (routing included), measured as process CPU time, not wall time,
so that a busy machine slows them less than it slows latencies.

    python demo/capacity.py BUNDLE QUERIES [--requests 400] [--concurrency 8]

The gateway runs as its own process on 127.0.0.1 in front of the OpenAI stub, zooter.bench.openai_stub (every candidate of the
bundle served by it, no delay); its CPU is read from /proc/PID/stat before and after the requests. Prints one
JSON object: routing_cpu_ms, gateway_cpu_ms (per request), cores_per_1000_rps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")      # utime + stime


def wait_for(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the process exited ({proc.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url}: not up after {seconds} s")


def routing_cpu(bundle: str, texts: list[str], rounds: int) -> float:
    from zooter.runtime.router import Router

    router = Router.load(bundle, threads=1)
    for text in texts[:10]:
        router.route(text)
    start = time.process_time()
    for _ in range(rounds):
        for text in texts:
            router.route(text)
    return (time.process_time() - start) / (rounds * len(texts))


def gateway_cpu(bundle: str, labels: list[str], texts: list[str], requests: int, concurrency: int) -> float:
    import yaml

    from zooter.servers.tritonserver import free_port

    with tempfile.TemporaryDirectory(prefix="zooter-capacity-") as tmp:
        stub = subprocess.Popen([sys.executable, "-m", "zooter.cli", "stub-llm"],
                                stdout=subprocess.PIPE, text=True)
        gateway = None
        try:
            base = stub.stdout.readline().split()[-1]
            candidates = Path(tmp) / "candidates.yaml"
            candidates.write_text(yaml.safe_dump([{"name": n, "serve": {"openai_base_url": base}} for n in labels]))
            port = free_port()
            gateway = subprocess.Popen([sys.executable, "-m", "zooter.cli", "gateway", "--bundle", bundle,
                                        "--candidates", str(candidates), "--port", str(port), "--log-level", "warning"])
            url = f"http://127.0.0.1:{port}"
            wait_for(f"{url}/health?probe=live", gateway)

            def ask(i: int) -> None:
                body = json.dumps({"model": "zooter", "max_tokens": 8,
                                   "messages": [{"role": "user", "content": texts[i % len(texts)]}]}).encode()
                request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"content-type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as r:
                    r.read()

            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(ask, range(20)))          # warm up
                before = cpu_seconds(gateway.pid)
                list(pool.map(ask, range(requests)))
                return (cpu_seconds(gateway.pid) - before) / requests
        finally:
            for proc in (gateway, stub):
                if proc is not None:
                    proc.terminate()
                    proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("queries", help="queries file (e.g. MT-Bench's question.jsonl)")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="passes over the queries for the routing figure")
    args = parser.parse_args()

    from zooter.runtime.bundle import read_manifest
    from zooter.runtime.queries import read_queries

    texts = [q.text for q in read_queries(args.queries)[0]]
    labels = read_manifest(args.bundle)["labels"]
    routing = routing_cpu(args.bundle, texts, args.rounds)
    gateway = gateway_cpu(args.bundle, labels, texts, args.requests, args.concurrency)
    print(json.dumps({"queries": len(texts), "routing_cpu_ms": round(routing * 1e3, 2),
                      "gateway_cpu_ms": round(gateway * 1e3, 2), "requests": args.requests,
                      "concurrency": args.concurrency, "cores_per_1000_rps": round(gateway * 1000, 2)}))


if __name__ == "__main__":
    main()
