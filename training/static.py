"""The static encoder: one vector per token, looked up and averaged, instead of a transformer.

`zooter train --encoder static` distils the backbone (the packaged MiniLM by default) into a table of
token vectors with model2vec's `distill` (offline: each vocabulary token passed through the backbone
alone, PCA to 256 dimensions, frequency weighting; PyPI `model2vec[distill]`, the `static` extra), or
takes a model2vec folder given as --backbone as it is. A query's embedding is the mean of its tokens'
vectors, unknown tokens left out, L2-normalised when the table says so (model2vec's `encode`). The
router's heads and decision layer are the head-only run's, trained on these embeddings; the ONNX
graph is a Gather, a masked mean and the two heads, so `zooter.runtime.Router` routes with it as with
any bundle, in tens of microseconds instead of milliseconds (docs/training.md has the measurements).

A static folder is model2vec's layout: config.json (`model_type` "model2vec", `normalize`),
model.safetensors (`embeddings`: vocabulary x dimensions) and tokenizer.json (no special tokens added).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from zooter.runtime.errors import UserError

MODEL_TYPE = "model2vec"
DIMENSIONS = 256        # PCA dimensions of the distilled table (5-fold CV in docs/training.md: 256 >= 384)


def is_static(folder: str | Path) -> bool:
    """Whether `folder` holds a static (model2vec) encoder rather than a Hugging Face transformer."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


class StaticEncoder(nn.Module):
    """Token table -> masked mean (unknown and padding tokens left out) -> optional L2 normalisation.

    Looks enough like a Hugging Face encoder for the router: `config.hidden_size`, `name_or_path`
    (a digest of the table, so the embedding cache never mixes two tables), `save_pretrained`.
    """

    def __init__(self, table: np.ndarray, tokenizer_json: str, normalize: bool, source: str = ""):
        super().__init__()
        table = np.asarray(table, dtype=np.float32)
        half = table.astype(np.float16)
        if np.array_equal(half.astype(np.float32), table):
            table = half    # model2vec's tables are fp16: kept so, the bundle is half the size, the sums fp32
        self.embeddings = nn.Embedding.from_pretrained(torch.from_numpy(table), freeze=True)
        self.normalize = bool(normalize)
        self.tokenizer_json = tokenizer_json
        spec = json.loads(tokenizer_json)
        vocab = spec.get("model", {}).get("vocab", {})
        unk = spec.get("model", {}).get("unk_token")
        keep = torch.ones(len(table))
        for token in (unk, "[PAD]"):
            if isinstance(vocab, dict) and token in vocab and vocab[token] < len(table):
                keep[vocab[token]] = 0.0     # model2vec's encode drops unknown tokens; padding never counts
        self.register_buffer("keep", keep, persistent=False)
        # The table pool() reads: the rows of the tokens left out are zero, so a masked sum is one MatMul
        # (the exported graph is what a static route costs: every node is about a microsecond of onnxruntime).
        rows = self.embeddings.weight.detach().clone()
        rows[keep == 0] = 0
        self.register_buffer("rows", rows, persistent=False)
        digest = hashlib.sha256(table.tobytes() + tokenizer_json.encode() + bytes([self.normalize])).hexdigest()[:16]
        self.name_or_path = f"static-{digest}"
        self.source = source
        self.config = SimpleNamespace(hidden_size=table.shape[1], num_hidden_layers=0, model_type=MODEL_TYPE,
                                      max_position_embeddings=1_000_000, name_or_path=self.name_or_path)

    def pool(self, input_ids, attention_mask) -> torch.Tensor:
        """(batch, hidden) query embeddings: the mean of the kept tokens' rows, L2-normalised if the table says so."""
        mask = attention_mask.to(torch.float32)
        rows = nn.functional.embedding(input_ids, self.rows).to(torch.float32)
        summed = torch.matmul(mask.unsqueeze(1), rows).squeeze(1)
        if self.normalize:    # the mean points where the sum does: no count to divide by
            return summed / summed.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return summed / (mask * self.keep[input_ids]).sum(1, keepdim=True).clamp(min=1.0)

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": self.embeddings.weight.detach().numpy()}, folder / "model.safetensors")
        (folder / "tokenizer.json").write_text(self.tokenizer_json, encoding="utf-8")
        (folder / "config.json").write_text(json.dumps({"model_type": MODEL_TYPE, "normalize": self.normalize,
                                                        "hidden_dim": int(self.config.hidden_size),
                                                        "distilled_from": self.source}, indent=2) + "\n")


def load_static(folder: str | Path) -> tuple[StaticEncoder, object]:
    """(encoder, transformers fast tokenizer) from a model2vec folder."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tensors = load_file(folder / "model.safetensors")
    if "embeddings" not in tensors:
        raise UserError(f"{folder}/model.safetensors: no 'embeddings' table (not a model2vec static model)")
    table = tensors["embeddings"].astype(np.float32)
    if "mapping" in tensors:       # model2vec's vocabulary quantization: tokens share clustered rows
        table = table[tensors["mapping"]]
    if "weights" in tensors:
        table = table * tensors["weights"].astype(np.float32)[:, None]
    tokenizer_json = (folder / "tokenizer.json").read_text(encoding="utf-8")
    encoder = StaticEncoder(table, tokenizer_json, config.get("normalize", True),
                            str(config.get("distilled_from") or config.get("tokenizer_name") or folder))
    return encoder, hf_tokenizer(tokenizer_json)


def hf_tokenizer(tokenizer_json: str):
    """The transformers wrapper training's embedding code batches with (padding on the right with [PAD])."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer_json)
    backend.no_padding()
    backend.no_truncation()
    vocab = backend.get_vocab()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]" if "[PAD]" in vocab else None,
                                   unk_token="[UNK]" if "[UNK]" in vocab else None)


def distil(backbone: str | Path, dimensions: int = DIMENSIONS) -> tuple[StaticEncoder, object]:
    """model2vec's distill of a local transformer folder (offline; about 25-90 s on 2 CPU cores)."""
    try:
        from model2vec.distill import distill
    except ImportError:
        raise UserError("--encoder static needs model2vec to distil the backbone: pip install 'zooter[static]' "
                        "(or give --backbone a model2vec folder)") from None
    model = distill(model_name=str(backbone), pca_dims=dimensions)   # offline: a local folder, no hub
    with tempfile.TemporaryDirectory(prefix="zooter-static-") as tmp:
        model.save_pretrained(tmp)
        encoder, tokenizer = load_static(tmp)
    encoder.source = str(backbone)
    return encoder, tokenizer


def static_encoder(backbone: str | Path, cache: str | Path | None = None) -> tuple[StaticEncoder, object]:
    """The static encoder of `backbone`: a model2vec folder as it is, else its distillation, kept in the
    cache folder when there is one (so the folds and variants of `zooter reproduce` distil once)."""
    backbone = Path(backbone)
    if is_static(backbone):
        return load_static(backbone)
    if not (backbone / "config.json").is_file():
        raise UserError(f"backbone {backbone}: not a Hugging Face model folder (no config.json)")
    if cache is None:
        return distil(backbone)
    from importlib.metadata import PackageNotFoundError, version

    try:
        distiller = version("model2vec")
    except PackageNotFoundError:
        distiller = None
    key = hashlib.sha256(json.dumps([str(backbone.resolve()), DIMENSIONS, distiller]).encode()).hexdigest()[:16]
    folder = Path(cache) / f"static-{key}"
    if not is_static(folder):
        import shutil

        encoder, _ = distil(backbone)
        tmp = folder.with_name(f"{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        encoder.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
    return load_static(folder)
