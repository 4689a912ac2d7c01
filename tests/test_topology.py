"""The documented cluster shape, run for real on loopback: gateway replicas (routing in process) -> one
server per candidate. Three candidate servers: a tritonserver with an LLM-API stand-in, a tritonserver
with an ensemble stand-in, an OpenAI-compatible stub; two `zooter gateway` processes on one candidates
file. While 200 requests run, the LLM-API server is killed (SIGKILL, its whole process group): no request
is lost (fallback, counted in metrics), /health names it down; it restarts on the same ports and traffic
returns to it (the time from ready to its first answer is printed, not asserted: docs/gateway.md).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway_stubs import ServerThread, stub_app
from zooter.bench.processes import stop_processes

pytestmark = [pytest.mark.slow, pytest.mark.triton]

TOTAL, KILL_AT, RESTART_AT = 200, 40, 100
LIMIT = 300.0          # generous: two tritonservers and two gateways share a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str, limit: float = LIMIT):
    deadline = time.monotonic() + limit
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit:.0f} s waiting for {what}")
        time.sleep(0.2)


def health(url: str) -> dict:
    import httpx

    try:
        return httpx.get(url + "/health", timeout=10).json().get("upstreams", {})
    except (httpx.HTTPError, ValueError):
        return {}


def metric_sum(url: str, name: str, **labels) -> float:
    import httpx

    from zooter.bench.report import metric_value

    return metric_value(httpx.get(url + "/metrics", timeout=10).text, name, **labels)


def start_gateway(bundle, candidates, port: int, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "zooter.cli", "gateway", "--bundle", str(bundle), "--candidates",
                             str(candidates), "--port", str(port), "--max-tokens", "2", "--upstream-timeout", "120",
                             "--request-timeout", "600", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_candidates_across_servers_survive_a_killed_server(bundles, tmp_path):
    import httpx

    from tiny import TEXTS
    from topology_shape import by_routed_share, standin_server
    from zooter.export.triton_repo import build_repository, model_name_for
    from zooter.runtime.router import Router

    bundle = bundles["fp32"]
    router = Router.load(bundle)
    # The server to kill serves the candidate the router picks most, so that requests find it down.
    order = by_routed_share(router, TEXTS)
    killed, ensemble = order[0], order[1]
    repos = {}
    for io in ("llmapi", "ensemble"):
        repos[io] = tmp_path / f"repo_{io}"
        build_repository(bundle, repos[io], None, stand_ins=True, stand_in_io=io)

    def triton(io, label, **ports):
        return standin_server(repos[io], label, tmp_path / f"triton_{io}.log", **ports)

    stub, servers, gateways, logs = None, {}, [], []
    try:
        stub = ServerThread(stub_app([]))
        servers["llmapi"] = triton("llmapi", killed).start(timeout=LIMIT)
        servers["ensemble"] = triton("ensemble", ensemble).start(timeout=LIMIT)
        serve = {killed: {"triton_model": model_name_for(killed), "triton_url": f"grpc://{servers['llmapi'].grpc_url}"},
                 ensemble: {"triton_model": model_name_for(ensemble),
                            "triton_url": f"grpc://{servers['ensemble'].grpc_url}"}}
        for label in order[2:]:
            serve[label] = {"openai_base_url": stub.url + "/v1", "model": label}
        candidates = tmp_path / "candidates.yaml"
        candidates.write_text(json.dumps([{"name": n, "serve": s} for n, s in serve.items()]))
        urls = []
        for i in range(2):
            port = free_port()
            logs.append(open(tmp_path / f"gateway{i}.log", "wb"))
            gateways.append(start_gateway(bundle, candidates, port, logs[-1]))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            wait_for(lambda: health(url).get(killed) == "up", f"gateway {url} up with {killed}")

        done = {"n": 0}
        restarted = threading.Event()
        results = [None] * TOTAL
        lock = threading.Lock()

        def one(i):
            if i >= RESTART_AT:
                restarted.wait(LIMIT * 2)
            text = TEXTS[i % len(TEXTS)]
            sent = time.monotonic()
            response = httpx.post(urls[i % 2] + "/v1/chat/completions", timeout=LIMIT,
                                  json={"model": "zooter", "messages": [{"role": "user", "content": text}], "max_tokens": 2})
            with lock:
                results[i] = (response.status_code, router.route(text).candidate,
                              response.headers.get("x-zooter-candidate"), sent)
                done["n"] += 1

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(one, i) for i in range(TOTAL)]
            wait_for(lambda: done["n"] >= KILL_AT, f"{KILL_AT} answers")
            os.killpg(servers["llmapi"].process.pid, signal.SIGKILL)
            ports = {k: getattr(servers["llmapi"], k) for k in ("http_port", "grpc_port", "metrics_port")}
            servers["llmapi"].close()            # reaps it and removes what the killed server left in /dev/shm
            for url in urls:
                wait_for(lambda: health(url).get(killed, "").startswith("down"), f"{url}/health naming {killed} down")
            wait_for(lambda: done["n"] >= RESTART_AT, f"{RESTART_AT} answers")
            servers["llmapi"] = triton("llmapi", killed, **ports).start(timeout=LIMIT)
            ready_at = time.monotonic()
            restarted.set()
            for future in futures:
                future.result(timeout=LIMIT * 2)

        statuses = [r[0] for r in results]
        assert statuses == [200] * TOTAL, f"lost requests: {[i for i, s in enumerate(statuses) if s != 200]}"
        down = [r for r in results[KILL_AT:RESTART_AT] if r[1] == killed]
        fell_back = [r for r in down if r[2] != killed]
        assert fell_back, f"no request routed to {killed} fell back while it was down"
        assert sum(metric_sum(url, "zooter_gateway_fallbacks_total") for url in urls) >= len(fell_back)
        assert sum(metric_sum(url, "zooter_gateway_upstream_failures_total", candidate=killed) for url in urls) >= 1
        back = sorted(r[3] for r in results[RESTART_AT:] if r[1] == killed and r[2] == killed)
        assert back, f"no traffic returned to {killed} after it restarted"
        print(f"\ntopology: {len(fell_back)} requests fell back while {killed}'s server was down; the first request "
              f"it answered again was sent {back[0] - ready_at:.1f} s after it was ready")
        for url in urls:
            wait_for(lambda: health(url).get(killed) == "up", f"{url}/health naming {killed} up again")
    finally:
        stop_processes(gateways)
        for log in logs:
            log.close()
        for server in servers.values():
            server.close()
        if stub is not None:
            stub.stop()


def test_the_zooter_model_calls_llmapi_candidates_in_its_own_server(bundles, tmp_path):
    """The second shape: the `zooter` model in front of candidates in the same server, here stand-ins with the
    LLM-API I/O (whole text so far when streaming, finish_reason on request, no token counts): the answer
    reaches the client as deltas, whole when not streamed, with how it ended."""
    import urllib.request

    from triton_helpers import tritonserver
    from zooter.export.triton_repo import build_repository

    built = build_repository(bundles["fp32"], tmp_path / "repo", None, stand_ins=True, stand_in_io="llmapi",
                             default_max_tokens=4)
    routing = json.loads((tmp_path / "repo" / "zooter" / "1" / "routing.json").read_text())
    assert {c["io"] for c in routing["candidates"].values()} == {"llmapi"}
    label = built.labels[0]
    banner = f"[stand-in SmolLM2-135M-Instruct for {label}] "

    def post(server, endpoint, body):
        request = urllib.request.Request(f"http://{server.http_url}/v2/models/zooter/{endpoint}",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=LIMIT) as response:
            raw = response.read().decode()
        if endpoint == "generate":
            return [json.loads(raw)]
        return [json.loads(line[5:]) for line in raw.splitlines() if line.startswith("data:")]

    with tritonserver(tmp_path / "repo", timeout=LIMIT, log_file=tmp_path / "triton.log") as server:
        body = {"text_input": "Name a primary colour.", "max_tokens": 3, "answer_with": label}
        [whole] = post(server, "generate", dict(body, stream=False))
        assert whole["candidate"] == label and whole["text_output"].startswith(banner)
        assert whole["finish_reason"] == "length" and "completion_tokens" not in whole    # the LLM-API gives no counts
        pieces = post(server, "generate_stream", dict(body, stream=True))
        text = "".join(p["text_output"] for p in pieces)
        assert text == whole["text_output"], "streamed deltas join to the whole answer, nothing repeated"
        assert len([p for p in pieces if p["text_output"]]) >= 2 and pieces[-1]["finish_reason"] == "length"
