"""The INT8 encoder of a frozen router, built exactly as `zooter export --quantize int8` builds it,
for quantization-aware head training.

A router distilled from soft reward distributions can have small top-two margins, so the rounding
of an INT8 encoder flips some of its decisions (docs/export-runtime.md). With a frozen encoder the
INT8 encoder is known before the head is trained: `Int8Encoder` builds it (optimum export, the same
fusions, the same Int8Recipe) as an onnxruntime session of the encoder and its mean pool; training
embeds queries with it (zooter.training.embed) and its loop (zooter.training.train) adds a
consistency term KL(p(e) || p(e_int8)) so the head learns to decide the same from both. It sits
below training, with the exporter and the quantizer it shares with export, so training builds it
itself.
"""

from __future__ import annotations

from pathlib import Path

from zooter.convert.quantize import Int8Recipe


class Int8Encoder:
    """A router's encoder + mean pool in INT8, as export builds its model; `key` is what the embeddings
    it gives depend on beyond the encoder (the embedding cache's key)."""

    def __init__(self, recipe: Int8Recipe | None = None):
        self.recipe = recipe or Int8Recipe.for_cpu()

    @property
    def key(self) -> dict:
        """What the embeddings depend on beyond the encoder: the recipe and how queries are fed
        (one per call: zooter.training.embed.int8_embeddings)."""
        return {"recipe": self.recipe.to_json(), "batch": 1}

    def session(self, model, folder: Path):
        """An onnxruntime session of `model`'s encoder + mean pool in INT8; its output "logits" is the
        pooled embedding (the head's input)."""
        import torch
        from torch import nn

        from zooter.convert.onnx_export import export_onnx
        from zooter.convert.quantize import optimize, quantize_int8
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
