"""`zooter train --encoder static`: a token table averaged instead of a transformer (training/static.py).

A tiny model2vec-layout folder (MiniLM's tokenizer without special tokens, a random 16-wide table)
stands in for a distilled one, so the tests need no model2vec: the router learns the synthetic topics,
exports to ONNX with its decision layer, and the runtime Router routes with it exactly as training's
PyTorch router and as a plain numpy lookup-and-mean of the table do.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from zooter.cli import main
from zooter.runtime.router import Router
from zooter.training.dataset import RoutingDataset
from zooter.training.model import TorchRouter

from tiny import CANDIDATES


@pytest.fixture(scope="module")
def static_folder(tmp_path_factory):
    from safetensors.numpy import save_file

    from zooter.training.model import default_backbone

    folder = tmp_path_factory.mktemp("static")
    spec = json.loads((__import__("pathlib").Path(default_backbone()) / "tokenizer.json").read_text())
    spec["post_processor"], spec["truncation"], spec["padding"] = None, None, None   # model2vec adds no [CLS]/[SEP]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    table = np.random.default_rng(0).standard_normal((len(spec["model"]["vocab"]), 16)).astype(np.float32)
    save_file({"embeddings": table.astype(np.float16)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "model2vec", "normalize": True, "hidden_dim": 16}))
    return folder


@pytest.fixture(scope="module")
def static_bundle(static_folder, routing_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("static_run")
    run, bundle = root / "run", root / "bundle"
    assert main(["train", "--data", str(routing_files["train"]), "--dev", str(routing_files["dev"]), "--out", str(run),
                 "--encoder", "static", "--backbone", str(static_folder), "--epochs", "20", "--lr", "0.03",
                 "--max-length", "32", "--threads", "1"]) == 0
    assert main(["export", str(run), "--out", str(bundle)]) == 0   # the default --quantize int8: fp32 for a table
    return run, bundle


def lookup_and_mean(folder, texts, max_length):
    """model2vec's encode, written out: the tokens' rows (unknown tokens dropped), their mean, L2-normalised."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    table = load_file(folder / "model.safetensors")["embeddings"].astype(np.float32)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    unk = tokenizer.token_to_id("[UNK]")
    out = []
    for text in texts:
        ids = [i for i in tokenizer.encode(text).ids[:max_length] if i != unk]
        v = table[ids].mean(0)
        out.append(v / np.linalg.norm(v))
    return np.array(out)


def test_static_router_learns_exports_and_routes_as_trained(static_folder, static_bundle, routing_files):
    run, bundle = static_bundle
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["encoder"] == "static" and info["config"]["int8_consistency"] == 0.0
    assert info["config"]["layers"] is None
    manifest = json.loads((bundle / "router.json").read_text())
    assert manifest["model_file"] == "model.onnx" and manifest["quantization"]["encoder"] == "static"
    assert manifest["inputs"] == ["input_ids", "attention_mask"]
    # Export's parity gate ran on the dev rows: the ONNX graph decides as PyTorch did, on every row.
    assert manifest["parity"]["decision_agreement"] == 1.0

    test = RoutingDataset.load(routing_files["test"])
    router = Router.load(bundle)
    routed = [d.candidate for d in router.route_batch(test.queries)]
    # The topics are learnable from averaged token vectors: most queries go to their topic's specialist.
    best = [CANDIDATES[int(np.nanargmax(r))] for r in test.rewards()]
    assert np.mean([a == b for a, b in zip(routed, best)]) >= 0.8

    # The same decisions from training's PyTorch router, and its heads over a plain numpy lookup-and-mean.
    torch_router = TorchRouter.load(run)
    probs, scores = torch_router.outputs_of(test.queries)
    assert [router.labels[c] for c in router.rule.decide(probs, scores).choice] == routed
    from safetensors.numpy import load_file

    from zooter.runtime.decision import softmax

    head = load_file(run / "head.safetensors")
    x = lookup_and_mean(static_folder, test.queries, info["max_length"])
    assert np.allclose(softmax(x @ head["weight"].T + head["bias"]), probs, atol=1e-5)
    assert np.allclose(x @ head["reward.weight"].T + head["reward.bias"], scores, atol=1e-4)
    bundle_probs, bundle_scores = router.outputs_of(test.queries)
    assert np.allclose(bundle_probs, probs, atol=1e-5) and np.allclose(bundle_scores, scores, atol=1e-4)


@pytest.mark.parametrize("normalize", [True, False])
def test_static_pool_is_the_mean_of_the_kept_rows(static_folder, normalize):
    """pool() sums through one MatMul over a table whose [UNK] and [PAD] rows are zero: still model2vec's
    mean of the known tokens (L2-normalised or not), padding ignored whatever its id."""
    import torch
    from safetensors.numpy import load_file

    from zooter.training.static import StaticEncoder

    table = load_file(static_folder / "model.safetensors")["embeddings"].astype(np.float32)
    encoder = StaticEncoder(table, (static_folder / "tokenizer.json").read_text(), normalize)
    unk, pad = 100, 0      # MiniLM's [UNK] and [PAD]
    rows = [[2054, 2003, unk, 1996, 3007], [7592, 2088, 0, 0, 0], [unk, unk, 0, 0, 0], [2054, 5, 7, 9, 11]]
    mask = [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]   # the last row pads with real ids
    pooled = encoder.pool(torch.tensor(rows), torch.tensor(mask)).numpy()
    for got, ids, m in zip(pooled, rows, mask):
        kept = [i for i, on in zip(ids, m) if on and i not in (unk, pad)]
        want = table[kept].mean(0) if kept else np.zeros(table.shape[1], dtype=np.float32)
        if normalize and kept:
            want = want / np.linalg.norm(want)
        assert np.allclose(got, want, atol=1e-6)


def test_static_graph_is_a_lookup_one_matmul_and_the_heads(static_bundle):
    """Each node of the exported graph costs about a microsecond of onnxruntime per query, most of a static
    route's model time: the masked mean stays one MatMul, with no Mul or ReduceSum over the token rows."""
    import onnx

    _, bundle = static_bundle
    ops = [node.op_type for node in onnx.load(str(bundle / "model.onnx")).graph.node if node.op_type != "Constant"]
    assert ops.count("Gather") == 1 and ops.count("MatMul") == 1 and ops.count("Gemm") == 2
    assert "Mul" not in ops and "ReduceSum" not in ops and len(ops) <= 12, ops


@pytest.mark.parametrize("flags, message", [
    (["--layers", "2"], "--encoder static trains the head only"),
    (["--fine-tune"], "--encoder static trains the head only"),
    (["--int8-consistency", "200"], "--int8-consistency has no INT8 encoder"),
])
def test_static_refuses_flags_that_need_a_transformer(static_folder, routing_files, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["train", "--data", str(routing_files["train"]), "--out", str(out), "--encoder", "static",
                 "--backbone", str(static_folder), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / ".run.partial").exists()


def test_static_without_model2vec_names_the_extra(routing_files, tiny_backbone, tmp_path, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_model2vec(name, *a, **kw):
        if name.startswith("model2vec"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_model2vec)
    assert main(["train", "--data", str(routing_files["train"]), "--out", str(tmp_path / "run"), "--encoder", "static",
                 "--backbone", str(tiny_backbone)]) == 2
    assert "zooter[static]" in capsys.readouterr().err


def test_reproduce_distils_once_and_scores_the_static_table(static_folder, routing_files, tiny_backbone, tmp_path,
                                                           monkeypatch):
    # The backbone is a transformer, "distilled" here into the tiny table (no model2vec needed): the
    # distillation is cached for every fold and variant, and each run is scored with its table, not with
    # the transformer its backbone names (whose 32-wide embeddings would not fit the 16-wide heads).
    import zooter.training.static as static

    calls = []

    def fake_distil(backbone, dimensions=static.DIMENSIONS):
        calls.append(str(backbone))
        return static.load_static(static_folder)

    monkeypatch.setattr(static, "distil", fake_distil)
    out = tmp_path / "cv"
    assert main(["reproduce", "--data", str(routing_files["train"]), "--folds", "3", "--out", str(out), "--encoder",
                 "static", "--backbone", str(tiny_backbone), "--epochs", "10", "--lr", "0.03", "--max-length", "32",
                 "--betas", "", "--threads", "1"]) == 0
    assert calls == [str(tiny_backbone)]
    table = json.loads((out / "table.json").read_text())
    assert table["config"]["encoder"] == "static" and all(v["n"] == 120 for v in table["variants"])
    default = table["variants"][0]
    assert default["variant"] == "default" and default["mean_reward"] > default["best_single"] + 0.2
