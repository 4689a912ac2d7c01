"""`zooter gpu-check`: the GPU path in one go, or a dry run of it on a machine without a GPU.

On a machine with an NVIDIA GPU (onnxruntime-gpu installed, and for the last step a tritonserver
with the onnxruntime backend, as in NVIDIA's Triton containers):
    1. export the run to an fp16 bundle (GPU fusions, fp16 weights, fp32 I/O);
    2. route with the CUDA and the TensorRT execution providers: decisions against the fp32 model
       on the CPU, and the latency table of `zooter bench`;
    3. build a GPU repository (the router on Triton's onnxruntime backend, KIND_GPU instances, the
       TensorRT accelerator in fp16), serve it, and print the table of `zooter bench --triton`.
Without a GPU (or with `dry_run`), every step that needs none still runs: the fp16 bundle is built
and loaded on the CPU, the GPU repository is written and each config.pbtxt parsed with Triton's
protobuf, and the steps that need the GPU are listed with the commands they would run.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from zooter.bench.report import Column, Table, write_json
from zooter.runtime.errors import UserError

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
STEPS = Table(Column("step", 34, "<"), Column("status", 10, "<"), Column("detail", align="<"))


@dataclass
class Step:
    name: str
    status: str = "pending"      # done | skipped | would run | failed
    detail: str = ""
    command: str = ""


@dataclass
class GpuCheck:
    out: Path
    steps: list[Step] = field(default_factory=list)
    tables: dict[str, str] = field(default_factory=dict)

    def step(self, name: str, status: str, detail: str = "", command: str = "") -> Step:
        self.steps.append(Step(name, status, detail, command))
        return self.steps[-1]

    def report(self) -> dict:
        return {"out": str(self.out), "steps": [s.__dict__ for s in self.steps], "tables": self.tables}

    def lines(self) -> list[str]:
        out = [STEPS.header()]
        for s in self.steps:
            out.append(STEPS.row(s.name, s.status, s.detail))
            if s.command and s.status != "done":
                out.append(f"{'':<45} $ {s.command}")
        for title, table in self.tables.items():
            out += ["", f"--- {title} ---", table]
        return out


def gpu_present() -> tuple[bool, str]:
    """(GPU usable by onnxruntime, why not)."""
    import onnxruntime as ort

    if shutil.which("nvidia-smi") is None:
        return False, "no nvidia-smi on PATH (no NVIDIA driver)"
    probe = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    if probe.returncode != 0 or "GPU" not in probe.stdout:
        return False, f"nvidia-smi lists no GPU ({probe.stderr.strip() or probe.stdout.strip()})"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "onnxruntime has no CUDAExecutionProvider: pip install 'zooter[gpu]' (and uninstall onnxruntime)"
    return True, probe.stdout.strip().splitlines()[0]


def run_gpu_check(run: str | Path, out: str | Path, queries: list[str] | None = None, dry_run: bool | None = None,
                  iters: int = 20) -> GpuCheck:
    from zooter.export.bundle import export_bundle
    from zooter.export.triton_repo import build_repository, validate_repository
    from zooter.bench import latency as bench
    from zooter.runtime.router import Router

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "gpu-check.json").is_file():
        raise UserError(f"{out}: exists and was not written by gpu-check; choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    check = GpuCheck(out)
    has_gpu, why = gpu_present()
    dry = (not has_gpu) if dry_run is None else dry_run
    check.step("GPU", "found" if has_gpu else "none", why)
    queries = list(queries or bench.BUILTIN_QUERIES)

    bundle = out / "bundle-fp16"
    parity = out / "queries.txt"   # the fp16 model's parity with PyTorch is checked on the same queries
    parity.write_text("\n".join(q.replace("\n", " ") for q in queries) + "\n", encoding="utf-8")
    export_bundle(run, bundle, quantize="fp16", parity_data=parity, force=True, allow_drift=True, log=lambda *a: None)
    cpu = Router.load(bundle, providers=["CPUExecutionProvider"])
    cpu_choices = [d.candidate for d in cpu.route_batch(queries)]
    check.step("fp16 bundle", "done", f"{bundle} (loads and routes on the CPU: {len(queries)} queries)",
               f"zooter export {run} --out {bundle} --quantize fp16")

    for provider in GPU_PROVIDERS:
        command = (f"zooter bench {bundle} --provider {provider} --no-torch --queries QUERIES")
        if dry:
            check.step(f"route with {provider}", "would run", "needs a GPU" if not has_gpu else "dry run", command)
            continue
        try:
            router = Router.load(bundle, providers=[provider, "CPUExecutionProvider"])
            same = sum(a == d.candidate for a, d in zip(cpu_choices, router.route_batch(queries)))
            report = bench.run_bench(bundle, queries, skipped={"torch": "gpu-check"}, batches=[1, 8, 32], iters=iters,
                                     providers=[provider, "CPUExecutionProvider"])
            check.tables[f"latency, {provider}"] = bench.format_table(report)
            check.step(f"route with {provider}", "done", f"decisions equal to the CPU's on {same}/{len(queries)}; "
                       f"providers {router.providers}", command)
        except Exception as err:   # a provider that fails to start (TensorRT libraries missing) is reported, not fatal
            check.step(f"route with {provider}", "failed", f"{type(err).__name__}: {str(err)[:200]}", command)

    repo = out / "triton-gpu"
    build_repository(bundle, repo, None, router_backend="onnxruntime", router_device="gpu", tensorrt=True)
    configs = validate_repository(repo)
    router_config = configs["zooter_router"]
    from tritonclient.grpc import model_config_pb2

    kinds = {model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in router_config.instance_group}
    accelerators = [a.name for a in router_config.optimization.execution_accelerators.gpu_execution_accelerator]
    check.step("GPU repository", "done", f"{repo}: {len(configs)} configs parse; zooter_router on "
               f"{router_config.platform}, instance kinds {sorted(kinds)}, accelerators {accelerators}",
               f"zooter triton build {bundle} --candidates CANDIDATES --out {repo} --router-backend onnxruntime "
               f"--router-device gpu --tensorrt")
    serve = f"zooter serve {repo}   # in a Triton container (it has the onnxruntime backend)"
    if dry:
        check.step("serve the GPU repository", "would run", "needs a GPU and the onnxruntime backend", serve)
        check.step("bench through Triton", "would run", "", f"zooter bench --triton 127.0.0.1:8000 --bundle {bundle}")
    else:
        _serve_and_bench(check, repo, bundle, queries, serve)
    write_json(check.report(), out / "gpu-check.json")
    return check


def _serve_and_bench(check: GpuCheck, repo: Path, bundle: Path, queries: list[str], command: str) -> None:
    from zooter.bench.triton import bench_triton, format_table
    from zooter.servers.tritonserver import TritonServer, find_tritonserver

    install = find_tritonserver()
    backends = install.backends or install.binary.parent.parent / "backends"
    if not (Path(backends) / "onnxruntime").is_dir():
        check.step("serve the GPU repository", "skipped", f"this tritonserver ({install.binary}) has no onnxruntime "
                   f"backend; run it in NVIDIA's Triton container", command)
        return
    try:
        with TritonServer(repo) as server:
            report = bench_triton(server.http_url, bundle, queries, grpc_url=server.grpc_url,
                                  metrics_url=server.metrics_url, quiet=True)
        check.tables["routing through Triton (GPU repository)"] = format_table(report)
        check.step("serve the GPU repository", "done", f"decisions equal: {report['decisions_match']}", command)
    except Exception as err:   # reported with the server's own words, the rest of the check stands
        check.step("serve the GPU repository", "failed", f"{type(err).__name__}: {str(err)[:300]}", command)
