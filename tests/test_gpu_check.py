"""`zooter gpu-check --dry-run`: on a machine without a GPU, everything that needs none is built and
checked, and the GPU steps are listed with their commands (a GPU machine runs them all)."""

from __future__ import annotations

import json

import pytest

from zooter.cli import main

pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_builds_the_fp16_bundle_and_checks_every_gpu_config(bundles, tmp_path, capsys):
    out = tmp_path / "gpu"
    assert main(["gpu-check", "--run", str(bundles["run"]), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "gpu-check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["fp16 bundle"]["status"] == "done"
    manifest = json.loads((out / "bundle-fp16" / "router.json").read_text())
    assert manifest["model_file"] == "model.fp16.onnx" and manifest["quantization"]["weights"] == "float16"
    for provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        assert steps[f"route with {provider}"]["status"] == "would run"
        assert f"--provider {provider}" in steps[f"route with {provider}"]["command"]
    repo = steps["GPU repository"]
    assert repo["status"] == "done" and "onnxruntime_onnx" in repo["detail"] and "KIND_GPU" in repo["detail"]
    assert "tensorrt" in repo["detail"]
    config = (out / "triton-gpu" / "zooter_router" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "KIND_GPU" in config and 'name: "tensorrt"' in config
    assert steps["serve the GPU repository"]["status"] == "would run"
    assert "would run" in printed and "$ zooter serve" in printed
