"""`zooter export`: a tiny run becomes an ONNX bundle whose decisions match PyTorch, behind a parity gate
(the tiny bundles are bundles once per session by the `bundles` fixture in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from zooter.cli import main

from tiny import LABELS, TEXTS


def torch_choices(run: Path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's own path: transformers tokenizer + the RouterModel, as training evaluates it."""
    import torch

    from zooter.runtime.decision import softmax
    from zooter.training.model import RouterModel

    model, tokenizer, info = RouterModel.load(run)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=info["max_length"], return_tensors="pt")
    with torch.inference_mode():
        probs = softmax(model(**batch)["logits"].numpy())
    return probs.argmax(1), probs   # the tiny run's decision layer is plain: argmax p


def test_bundle_layout_and_manifest(bundles):
    from zooter.convert.quantize import Int8Recipe
    from zooter.runtime.bundle import FORMAT_VERSION, manifest_digest
    from zooter.runtime.files import sha256_file

    bundle = bundles["int8"]
    manifest = json.loads((bundle / "router.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["manifest_sha256"] == manifest_digest(manifest)
    assert manifest["labels"] == LABELS and manifest["max_length"] == 128
    assert manifest["model_file"] == "model.int8.onnx" and manifest["output"] == "logits"
    assert manifest["reward_output"] == "rewards" and manifest["decision"]["anchor"] == "alpha-7b"
    assert manifest["decision"]["tolerance"] == 0.0 and manifest["decision"]["lambda"] == 0.0
    assert manifest["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert sorted(p.name for p in bundle.iterdir()) == ["model.int8.onnx", "router.json", "tokenizer.json"]
    for name, entry in manifest["files"].items():
        assert sha256_file(bundle / name) == entry["sha256"] and (bundle / name).stat().st_size == entry["bytes"]
    q = manifest["quantization"]
    assert q["mode"] == "int8" and q["fused_operators"].get("Attention") == 2
    assert q["recipe"] == Int8Recipe.for_cpu().to_json() and q["recipe"]["method"] == "dynamic"
    assert manifest["costs"]["delta-1b"] == {"input_per_mtok": 0.02, "output_per_mtok": 0.04, "unit": pytest.approx(0.03)}
    prov = manifest["provenance"]
    assert prov["beta"] == 0.3 and prov["data_sha256"] == "0" * 64 and Path(prov["run"]) == bundles["run"].resolve()
    assert manifest["evaluation"]["dev"] == {"mean_reward": 0.5, "n": len(TEXTS)}
    assert manifest["evaluation"]["best_single"]["candidate"] == "alpha-7b"
    parity = manifest["parity"]
    assert parity["n"] == len(set(TEXTS))  # the parity file's repeated lines count once
    assert parity["rule"] == {"margin": -100.0, "tolerance": 0.0, "lambda": 0.0}
    assert parity["decision_agreement"] >= 0.9 and 0 < parity["max_prob_diff"] < 0.5
    assert 0 <= parity["clear_share"] <= 1 and parity["clear_agreement"] >= parity["decision_agreement"] - 1e-12
    assert parity["fp32"]["decision_agreement"] == 1.0 and parity["fp32"]["max_prob_diff"] < 1e-4
    assert parity["fp32"]["expected_regret"] == 0.0 and parity["fp32"]["passed"]
    assert parity["fp32"]["max_flipped_log_p_gap"] == 0.0 and parity["reference_log_p_gap_p50"] > 0
    # The int8 file is much smaller than the fp32 one.
    fp32 = json.loads((bundles["fp32"] / "router.json").read_text())
    assert manifest["files"]["model.int8.onnx"]["bytes"] < 0.5 * fp32["files"]["model.onnx"]["bytes"]
    assert fp32["costs"] is None and fp32["quantization"]["mode"] == "none"


def test_fp32_router_decides_like_pytorch(bundles):
    from zooter.runtime.router import Router

    router = Router.load(bundles["fp32"])
    expected, probs = torch_choices(bundles["run"], TEXTS)
    decisions = router.route_batch(TEXTS)
    assert [d.candidate for d in decisions] == [LABELS[i] for i in expected]
    got = np.array([[d.probabilities[n] for n in LABELS] for d in decisions])
    np.testing.assert_allclose(got, probs, atol=1e-4)
    assert len(set(expected)) > 1  # the comparison means something only if the choices vary


def test_int8_router_agrees_with_pytorch_as_parity_recorded(bundles):
    from zooter.runtime.router import Router

    router = Router.load(bundles["int8"])
    texts = list(dict.fromkeys(TEXTS))            # the parity file's queries: repeated lines count once
    expected, probs = torch_choices(bundles["run"], texts)
    decisions = [router.route(t) for t in texts]  # the parity check runs one query at a time too
    agreement = np.mean([d.candidate == LABELS[e] for d, e in zip(decisions, expected)])
    parity = router.manifest.parity
    assert agreement >= 0.9 and agreement == pytest.approx(parity["decision_agreement"])
    got = np.array([[d.probabilities[n] for n in LABELS] for d in decisions])
    assert np.abs(got - probs).max() == pytest.approx(parity["max_prob_diff"], abs=1e-5)


def test_int8_graph_keeps_the_vocabulary_per_row_and_the_head_in_fp32(bundles):
    """The vocabulary table ships as int8 with one scale per row, each row within half a step of the
    run's vector; the head's MatMul is not quantized (its input is the pooled embedding)."""
    import onnx
    from onnx import numpy_helper
    from safetensors.torch import load_file

    model = onnx.load(str(bundles["int8"] / "model.int8.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    table = next(name for name in inits if name.endswith("word_embeddings.weight_int8"))
    rows, scale = inits[table], inits[table.replace("_int8", "_row_scale")]
    assert rows.dtype == np.int8 and scale.shape == (rows.shape[0], 1)
    original = load_file(bundles["run"] / "encoder" / "model.safetensors")["embeddings.word_embeddings.weight"].numpy()
    assert np.all(np.abs(rows * scale - original) <= scale / 2 + 1e-7)
    producers = {out: n for n in model.graph.node for out in n.output}
    head = producers["logits"]  # the quantizer splits the Gemm into MatMul + Add and leaves both in fp32
    assert head.op_type == "Gemm" or (head.op_type == "Add" and producers[head.input[0]].op_type == "MatMul")
    assert not [n for n in model.graph.node if n.op_type == "MatMulInteger" and "head" in n.name]
    manifest = json.loads((bundles["int8"] / "router.json").read_text())
    assert manifest["quantization"]["embedding"]["scale"] == "per row, symmetric int8"


def test_parity_gate_blocks_a_drifting_model(bundles, tmp_path, monkeypatch, capsys):
    from zooter.export import parity

    real = parity.compare

    def drifting(rule, reference, exported, rewards=None):
        out = real(rule, reference, exported, rewards)
        if exported is not reference:
            out["clear_agreement"], out["passed"] = 0.9, False
        return out

    monkeypatch.setattr(parity, "compare", drifting)
    calib = bundles["parity"].with_suffix(".jsonl")  # routing data: the gate also reports the routed reward
    args = ["export", str(bundles["run"]), "--out", str(tmp_path / "b"), "--parity-data", str(calib), "--parity-n", "8"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "parity gate" in err and "90.00%" in err and "--allow-drift" in err and "mean routed reward" in err
    assert not (tmp_path / "b").exists()
    assert main(args + ["--allow-drift"]) == 0
    manifest = json.loads((tmp_path / "b" / "router.json").read_text())
    assert manifest["parity"]["passed"] is False and manifest["parity"]["n"] == 8
    rows = [json.loads(line) for line in calib.read_text().splitlines()[:8]]
    rewards = np.array([[r["rewards"][n] for n in LABELS] for r in rows])
    expected, _ = torch_choices(bundles["run"], [r["query"] for r in rows])
    routed = manifest["parity"]["routed_reward"]
    assert routed["pytorch"] == pytest.approx(rewards[np.arange(8), expected].mean())
    assert routed["difference"] == pytest.approx(routed["exported"] - routed["pytorch"])


def test_export_refuses_to_overwrite_and_needs_validation_rows(bundles, tmp_path, capsys):
    assert main(["export", str(bundles["run"]), "--out", str(bundles["int8"]), "--parity-data", str(bundles["parity"])]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(bundles["run"]), "--out", str(tmp_path / "b")]) == 2
    assert "--parity-data" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "b"), "--parity-data", str(bundles["parity"])]) == 2
    assert "no run.json" in capsys.readouterr().err


def test_fp16_bundle_for_gpu_targets(bundles, tmp_path):
    import onnx

    from zooter.runtime.router import Router

    out = tmp_path / "fp16"
    assert main(["export", str(bundles["run"]), "--out", str(out), "--parity-data", str(bundles["parity"]), "--quantize", "fp16",
                 "--parity-n", "12", "--allow-drift"]) == 0
    manifest = json.loads((out / "router.json").read_text())
    assert manifest["model_file"] == "model.fp16.onnx" and manifest["quantization"]["mode"] == "fp16"
    model = onnx.load(str(out / "model.fp16.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O kept
    assert manifest["parity"]["n"] == 12 and manifest["parity"]["max_prob_diff"] < 0.5
    # Runs on the CPU provider too (slowly); on a GPU machine the Router picks CUDA/TensorRT first.
    assert Router.load(out).route(TEXTS[0]).candidate in LABELS
