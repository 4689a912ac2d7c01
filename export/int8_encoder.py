"""The INT8 encoder of a frozen router, built exactly as `zooter export --quantize int8` builds it,
for quantization-aware head training.

A router distilled from soft reward distributions can have small top-two margins, so the rounding
of an INT8 encoder flips some of its decisions (docs/export-runtime.md). With a frozen encoder the
INT8 encoder is known before the head is trained: `Int8Embedder` builds it (optimum export, the same
fusions, the same Int8Recipe) and embeds queries with it; the training loop (zooter.training.train)
adds a consistency term KL(p(e) || p(e_int8)) so the head learns to decide the same from both.
Training receives the embedder from the CLI: export builds on training, never the reverse.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from zooter.export.quantize import Int8Recipe


class Int8Embedder:
    """embed(model, tokenizer, texts, max_length) -> pooled INT8-encoder embeddings, rows in input order.

    One query per call, as Router.route runs it: dynamic int8 takes its activation scales from the
    whole batch, padding included, so a query's rounding depends on its batch-mates.
    """

    def __init__(self, recipe: Int8Recipe | None = None):
        self.recipe = recipe or Int8Recipe.for_cpu()

    @property
    def key(self) -> dict:
        """What the embeddings depend on beyond the encoder: the recipe and how queries are fed."""
        return {"recipe": self.recipe.to_json(), "batch": 1}

    def session(self, model, folder: Path):
        """An onnxruntime session of `model`'s encoder + mean pool in INT8; its output "logits" is the
        pooled embedding (the head's input)."""
        import torch
        from torch import nn

        from zooter.export.onnx_export import export_onnx
        from zooter.export.quantize import optimize, quantize_int8
        from zooter.runtime.session import open_session

        class Pooled(nn.Module):
            def __init__(self, router):
                super().__init__()
                self.router = router
                self.labels = list(range(router.encoder.config.hidden_size))

            @property
            def config(self):
                return self.router.config

            def forward(self, input_ids, attention_mask, token_type_ids=None):
                return {"logits": self.router.embed(input_ids, attention_mask, token_type_ids)}

        folder = Path(folder)
        with torch.no_grad():
            export_onnx(Pooled(model).eval(), folder / "model.onnx", outputs=("logits",))
        fused, _ = optimize(folder / "model.onnx", model.config, folder / "opt")
        path, _ = quantize_int8(fused, folder / "int8", self.recipe)
        return open_session(path, ["CPUExecutionProvider"])  # as export's parity gate runs it

    def __call__(self, model, tokenizer, texts, max_length: int, progress: str | None = None) -> np.ndarray:
        import torch

        from zooter.training.embed import in_length_order

        with tempfile.TemporaryDirectory(prefix="zooter-int8-") as tmp:
            session = self.session(model, Path(tmp))
            names = {i.name for i in session.get_inputs()}

            def run(enc):
                feeds = {k: v.numpy().astype(np.int64) for k, v in enc.items() if k in names}
                return torch.from_numpy(session.run(["logits"], feeds)[0])

            return in_length_order(list(texts), tokenizer, max_length, 1, run, progress=progress)
