"""Swapping the gateway's router under load: SIGHUP reloads the bundle, no request is lost, every answer
names the router that chose it, and a bundle that does not load leaves the old router serving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from gateway_stubs import ServerThread, stub_app
from tiny import LABELS

CLIENTS, REQUESTS = 32, 500


def router_id(bundle) -> str:
    from zooter.runtime.bundle import read_manifest

    return read_manifest(bundle)["manifest_sha256"][:12]


class Gateway:
    """`zooter gateway` in a subprocess; its output read in a thread, each line with the time it came."""

    def __init__(self, bundle, candidates):
        from zooter.servers.tritonserver import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "zooter.cli", "gateway", "--bundle", str(bundle),
                                      "--candidates", str(candidates), "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for("zooter gateway ready")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, text: str, after: int = 0, timeout: float = 120) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, line in self.lines[after:]:
                if text in line:
                    return when, line
            if self.proc.poll() is not None and not any(text in line for _, line in self.lines[after:]):
                raise AssertionError(f"the gateway exited:\n" + "\n".join(line for _, line in self.lines))
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} in:\n" + "\n".join(line for _, line in self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture()
def served(bundles, tmp_path):
    stub = ServerThread(stub_app([]))
    candidates = tmp_path / "candidates.yaml"
    candidates.write_text("".join(f"- {{name: {n}, serve: {{openai_base_url: '{stub.url}/v1'}}}}\n" for n in LABELS))
    current = tmp_path / "current"
    current.symlink_to(bundles["int8"])
    gateway = Gateway(current, candidates)
    yield gateway, current
    gateway.stop()
    stub.stop()


def point(link, target) -> None:
    """Repoint the bundle link atomically, as a deployment would."""
    tmp = link.with_name(link.name + ".new")
    tmp.symlink_to(target)
    os.replace(tmp, link)


def test_sighup_swaps_the_router_under_load_and_loses_no_request(served, bundles):
    gateway, current = served
    old, new = router_id(bundles["int8"]), router_id(bundles["fp32"])
    assert old != new
    done, results, lock = [0], [], threading.Lock()
    signalled = threading.Event()
    sent_at = [0.0]

    def one(i: int, http: httpx.Client):
        if i >= REQUESTS * 4 // 5:        # the last fifth after the swap, however slowly the machine reloads
            gateway.wait_for("zooter gateway reloaded")
        started = time.monotonic()
        r = http.post(f"{gateway.url}/v1/chat/completions", timeout=120,
                      json={"model": "zooter", "messages": [{"role": "user", "content": f"question {i}: what is {i} + {i}?"}]})
        finished = time.monotonic()
        with lock:
            results.append((started, finished, r.status_code, r.headers.get("x-zooter-router")))
            done[0] += 1
            if done[0] == REQUESTS // 2 and not signalled.is_set():
                point(current, bundles["fp32"])
                sent_at[0] = time.monotonic()
                gateway.proc.send_signal(signal.SIGHUP)
                signalled.set()

    with httpx.Client(limits=httpx.Limits(max_connections=CLIENTS)) as http, ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(lambda i: one(i, http), range(REQUESTS)))
    reloaded_at, line = gateway.wait_for("zooter gateway reloaded")
    assert f"router {old} -> {new}" in line
    # The figures docs/gateway.md quotes (pytest -s shows them); nothing here is timed.
    print(f"\nSIGHUP under load: {REQUESTS} requests from {CLIENTS} clients, "
          f"{sum(status != 200 for _, _, status, _ in results)} failed, "
          f"{sum(router == old for *_, router in results)} by router {old}, {sum(router == new for *_, router in results)} "
          f"by {new}; the reload took {reloaded_at - sent_at[0]:.2f} s, "
          f"{sum(sent_at[0] <= started <= reloaded_at for started, *_ in results)} requests started during it")

    assert len(results) == REQUESTS and all(status == 200 for _, _, status, _ in results)
    assert {router for _, _, _, router in results} <= {old, new}
    # Answered before the signal: the old router; sent after the reload line: the new one. (A request sent
    # before the signal may reach the gateway after the swap, so its start time decides nothing.)
    assert sum(finished < sent_at[0] for _, finished, _, _ in results) >= REQUESTS // 2
    assert all(router == old for _, finished, _, router in results if finished < sent_at[0])
    assert sum(started > reloaded_at for started, _, _, _ in results) >= REQUESTS // 5
    assert all(router == new for started, _, _, router in results if started > reloaded_at)
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=30).text
    assert f'zooter_gateway_routing_seconds_count{{router="{new}"}}' in metrics
    assert f'zooter_gateway_router{{router="{old}"}} 0.0' in metrics and f'zooter_gateway_router{{router="{new}"}} 1.0' in metrics


def test_a_bundle_that_does_not_load_on_sighup_keeps_the_old_router(served, bundles, tmp_path):
    gateway, current = served
    old = router_id(bundles["int8"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "router.json").write_text("{not json")
    point(current, broken)
    seen = len(gateway.lines)
    gateway.proc.send_signal(signal.SIGHUP)
    _, line = gateway.wait_for("reload refused", after=seen)
    assert f"router {old} keeps serving" in line and "router.json" in line
    r = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=60,
                   json={"model": "zooter", "messages": [{"role": "user", "content": "still there?"}]})
    assert r.status_code == 200 and r.headers["x-zooter-router"] == old
    assert gateway.proc.poll() is None


def test_another_encoder_is_not_a_router_swap(bundles):
    from dataclasses import replace

    from zooter.runtime.bundle import Manifest, swap_problem

    old = Manifest.read(bundles["int8"])
    assert swap_problem(old, Manifest.read(bundles["fp32"])) is None      # same encoder, other router: a swap
    other = replace(old, max_length=old.max_length // 2,
                    files={**old.files, "tokenizer.json": {**old.files["tokenizer.json"], "sha256": "0" * 64}})
    problem = swap_problem(old, other)
    assert problem.startswith("another encoder") and "tokenizer.json" in problem and "max_length" in problem


def test_sighup_between_lone_requests_swaps_the_router_they_route_with(served, bundles):
    # One client, one request at a time: each is alone in the gateway and routes on its event loop's thread
    # (backends.py); the reload still loads in a thread and swaps only what later requests get.
    gateway, current = served
    old, new = router_id(bundles["int8"]), router_id(bundles["fp32"])
    results, sent_at, reloaded_at = [], None, None
    with httpx.Client() as http:
        def ask(i: int) -> None:
            started = time.monotonic()
            r = http.post(f"{gateway.url}/v1/chat/completions", timeout=120,
                          json={"model": "zooter", "messages": [{"role": "user", "content": f"what is {i} + {i}?"}]})
            results.append((started, time.monotonic(), r.status_code, r.headers.get("x-zooter-router")))

        for i in range(20):
            ask(i)
        point(current, bundles["fp32"])
        sent_at = time.monotonic()
        gateway.proc.send_signal(signal.SIGHUP)
        i = 20
        while not any("zooter gateway reloaded" in line for _, line in gateway.lines):   # requests during the reload
            ask(i)
            i += 1
            assert time.monotonic() < sent_at + 120 and gateway.proc.poll() is None, "no reload within 120 s"
        reloaded_at, line = gateway.wait_for("zooter gateway reloaded")
        assert f"router {old} -> {new}" in line
        for j in range(i, i + 20):
            ask(j)
    assert all(status == 200 for _, _, status, _ in results)
    assert all(router == old for _, finished, _, router in results if finished < sent_at)
    assert sum(started > reloaded_at for started, *_ in results) == 20
    assert all(router == new for started, _, _, router in results if started > reloaded_at)
    assert {router for *_, router in results} == {old, new}
