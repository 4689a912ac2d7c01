"""What one request through Triton's python backend costs on this machine, before any routing.

`zooter bench --triton` compares the router in Triton with the router in process. This probe
separates the part of that gap no model code can remove: it starts a private tritonserver (loopback,
free ports) with two probe models that have `zooter_route`'s interface and answer at once, or after
spinning the CPU for `work_ms` (about what routing one query takes), and times them over HTTP and
gRPC against the same spin called in process, in interleaved rounds. The difference at 0 ms is the
round trip itself (client library, server, stub process and back); the difference at `work_ms`
adds what it costs each waiting thread to wake after sleeping that long. A pipe ping-pong between
two plain processes shows the operating system's share of that wake-up cost.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from zooter.runtime.errors import UserError
from zooter.bench.report import Column, Table, p50, publish
from zooter.bench.triton import ClientPool, merge_cells, run_concurrent, scrape, server_side, triton_caller

PROBES = {"zooter_probe_idle": 0.0, "zooter_probe_busy": None}      # None: work_ms
MAX_WORK_MS = 100.0         # 1,200 requests of the busy probe take at most two minutes

PROBE_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 32
input [ {{ name: "text" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [
  {{ name: "candidate" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "probabilities" data_type: TYPE_FP32 dims: [ 9 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: 0 }}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
parameters {{ key: "work_ms" value: {{ string_value: "{work_ms}" }} }}
"""

PROBE_MODEL = '''"""Probe with zooter_route's interface: answers after spinning the CPU for work_ms per request."""
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.work_s = float(json.loads(args["model_config"])["parameters"]["work_ms"]["string_value"]) / 1000

    def execute(self, requests):
        responses = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().shape[0]
            end = time.perf_counter() + self.work_s
            while time.perf_counter() < end:
                pass
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("candidate", np.full((rows, 1), b"probe", dtype=object)),
                pb_utils.Tensor("probabilities", np.zeros((rows, 9), dtype=np.float32))]))
        return responses
'''

# The other end of the pipe ping-pong: for every byte read, spin work seconds, then answer one byte.
PONG = """
import os, sys, time
work = float(sys.argv[1])
while os.read(0, 1):
    end = time.perf_counter() + work
    while time.perf_counter() < end:
        pass
    os.write(1, b"x")
"""


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def write_repository(folder: Path, work_ms: float) -> Path:
    for name, ms in PROBES.items():
        (folder / name / "1").mkdir(parents=True)
        (folder / name / "config.pbtxt").write_text(PROBE_CONFIG.format(name=name, work_ms=work_ms if ms is None else ms))
        (folder / name / "1" / "model.py").write_text(PROBE_MODEL)
    return folder


def pipe_round_trip_us(work_ms: float, n: int) -> float:
    """p50 of (round trip - work) between this process and another over two pipes, in microseconds."""
    pong = subprocess.Popen([sys.executable, "-c", PONG, str(work_ms / 1000)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, bufsize=0)
    try:
        times = []
        for _ in range(n + 10):
            start = time.perf_counter()
            pong.stdin.write(b"x")
            if pong.stdout.read(1) != b"x":
                raise RuntimeError(f"the ping-pong process stopped answering (exit code {pong.poll()})")
            times.append(time.perf_counter() - start - work_ms / 1000)
        return float(np.percentile(times[10:], 50) * 1e6)
    finally:
        pong.stdin.close()
        pong.wait(timeout=10)
        pong.stdout.close()


def measure_floor(work_ms: float = 4.0, requests: int = 400, rounds: int = 4, json_out: str | Path | None = None,
                  quiet: bool = False) -> dict:
    """Start a private server with the probes, time them against the in-process spin; print and return the report."""
    from zooter.servers.tritonserver import TritonServer

    work_ms = float(work_ms)
    if not 0 < work_ms <= MAX_WORK_MS:     # at 0 the busy probe would be the idle one
        raise UserError(f"--work-ms (the busy probe's work) must be more than 0 and at most {MAX_WORK_MS:g}, "
                        f"got {work_ms:g}")
    with tempfile.TemporaryDirectory(prefix="zooter-floor-") as tmp:
        repo = write_repository(Path(tmp) / "repo", work_ms)
        with TritonServer(repo, log_file=Path(tmp) / "tritonserver.log") as server:
            pools = {}
            try:
                for name, ms in PROBES.items():
                    work = work_ms if ms is None else ms
                    pools[("in-process", work)] = ClientPool(lambda w=work: (lambda text: spin(w / 1000)), 1)
                    pools[("triton-http", work)] = ClientPool(triton_caller(server.http_url, "http", name), 1)
                    pools[("triton-grpc", work)] = ClientPool(triton_caller(server.grpc_url, "grpc", name), 1)
                for pool in pools.values():      # the first requests open connections and wake the stubs
                    pool.each(lambda call: [call("warm-up") for _ in range(10)])
                parts = {key: [] for key in pools}
                keys = list(pools)
                size = max(1, requests // rounds)
                for r in range(rounds):
                    for k in range(len(keys)):
                        key = keys[(r + k) % len(keys)]
                        parts[key].append(run_concurrent(pools[key], ["probe"], size))
                inside = server_side({}, scrape(server.metrics_url), PROBES)   # warm-up requests included
            finally:
                for pool in pools.values():
                    pool.close()
    cells = []
    for (engine, work), part in parts.items():
        cell = merge_cells(part)
        cell.update(engine=engine, work_ms=work)
        cells.append(cell)
    pipe = {str(w): pipe_round_trip_us(w, min(requests, 400)) for w in (0.0, work_ms)}

    def gap(proto, work):    # p50 through Triton over `proto` less p50 in process
        return p50(cells, engine=f"triton-{proto}", work_ms=work) - p50(cells, engine="in-process", work_ms=work)

    report = {
        "work_ms": work_ms, "requests": size * rounds, "rounds": rounds, "cells": cells,
        "round_trip_p50_ms": {proto: gap(proto, 0.0) for proto in ("http", "grpc")},
        "round_trip_after_work_p50_ms": {proto: gap(proto, work_ms) for proto in ("http", "grpc")},
        "pipe_round_trip_p50_us": pipe,
        "server_ms": inside,
    }
    return publish(report, json_out, quiet, format_floor)


FLOOR_TABLE = Table(Column("engine", 14, "<"), Column("work", 6, fmt=".1f"), *(Column(t, 8, fmt=".3f") for t in ("p50", "p90", "p99")))


def format_floor(report: dict) -> str:
    w = report["work_ms"]
    lines = [f"Triton python-backend floor: {report['requests']} requests per cell, one at a time, "
             f"{report['rounds']} interleaved rounds (ms)",
             FLOOR_TABLE.header()]
    for c in report["cells"]:
        lines.append(FLOOR_TABLE.row(c["engine"], c["work_ms"], c["p50_ms"], c["p90_ms"], c["p99_ms"]))
    rt, after = report["round_trip_p50_ms"], report["round_trip_after_work_p50_ms"]
    lines.append(f"round trip of a model that answers at once: HTTP +{rt['http']:.2f} ms, gRPC +{rt['grpc']:.2f} ms")
    lines.append(f"round trip of a model that works {w:g} ms:       HTTP +{after['http']:.2f} ms, gRPC +{after['grpc']:.2f} ms")
    for name, t in report["server_ms"].items():
        lines.append(f"  inside Triton, {name}: queue {t['queue_ms']:.3f}, input {t['compute_input_ms']:.3f}, "
                     f"infer {t['compute_infer_ms']:.3f}, output {t['compute_output_ms']:.3f} ms a request")
    pipe = report["pipe_round_trip_p50_us"]
    lines.append(f"pipe ping-pong between two processes: {pipe['0.0']:.0f} us at once, {pipe[str(w)]:.0f} us after {w:g} ms")
    return "\n".join(lines)
