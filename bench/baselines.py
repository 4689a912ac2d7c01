"""The baselines `zooter bench` times the bundle against: the run's PyTorch router (eager) and, when
the bundle ships no model.onnx, the fp32 ONNX model re-exported from the run. They need torch, so
zooter.bench.latency imports them only when torch is there.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from zooter.bench.latency import Engine


def pytorch_baselines(run: str | Path, manifest: dict, threads: int | None = None,
                      work: str | Path | None = None) -> tuple[dict[str, Engine], dict[str, str]]:
    """({"torch": Engine[, "fp32": Engine]}, {engine: why skipped}) for the bundle's run."""
    run = Path(run)
    if not (run / "run.json").is_file():
        return {}, {"torch": f"run folder {run} not found (pass --run RUN)"}
    import torch

    from zooter.training.model import TorchRouter

    if threads:
        torch.set_num_threads(int(threads))
    start = time.perf_counter()
    torch_router = TorchRouter.load(run)
    torch_router.probabilities(["cold start"])
    engines = {"torch": Engine(torch_router.probabilities, (time.perf_counter() - start) * 1000, {"run": str(run)})}
    if "model.onnx" not in manifest["files"]:
        engines["fp32"] = _fp32_from_run(torch_router, manifest, threads, Path(work or tempfile.mkdtemp(prefix="zooter-bench-")))
    return engines, {}


def _fp32_from_run(torch_router, manifest: dict, threads: int | None, work: Path) -> Engine:
    from zooter.convert.onnx_export import export_onnx
    from zooter.convert.quantize import optimize
    from zooter.runtime.router import Router
    from zooter.runtime.session import open_session

    export_onnx(torch_router.model, work / "model.onnx")
    path, _ = optimize(work / "model.onnx", torch_router.model.config, work / "opt")
    start = time.perf_counter()   # the export is not part of the cold start
    fp32 = Router(open_session(path, ["CPUExecutionProvider"], threads), torch_router.tokenizer,
                  dict(manifest, model_file="model.onnx"))
    fp32.route("cold start")
    return Engine(fp32.probabilities, (time.perf_counter() - start) * 1000, {"source": "re-exported from the run"})
