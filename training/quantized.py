"""Quantization-aware head training: the pooled embeddings the INT8 bundle will compute.

A router distilled from soft reward distributions has tiny top-two margins (median 0.004 in
probability on dcrouter), so the rounding of an INT8 encoder flips several percent of its
decisions (docs/export-runtime.md). With a frozen encoder the INT8 encoder is known before the
head is trained: it is built here exactly as `zooter export --quantize int8` builds it (optimum
export, the same fusions, the same dynamic int8 settings) and run over the training queries. The
training loop then adds a consistency term, KL(p(e) || p(e_int8)), so the head learns to decide the
same from both: the parity gate holds and the routed reward stays that of the plain head.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np


def int8_encoder(model, folder: Path, arch: str = "auto"):
    """An onnxruntime session of `model`'s encoder + mean pool, INT8 as export builds it; its
    output "logits" is the pooled embedding (the head's input)."""
    import torch
    from torch import nn

    from zooter.export.onnx_export import export_onnx
    from zooter.export.quantize import optimize, quantize_int8
    from zooter.runtime.router import open_session

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
        export_onnx(Pooled(model).eval(), folder / "model.onnx")
    fused, _ = optimize(folder / "model.onnx", model.config, folder / "opt")
    path, _ = quantize_int8(fused, folder / "int8", arch)
    return open_session(path, ["CPUExecutionProvider"])  # as export's parity gate runs it


def int8_embed(model, tokenizer, texts, max_length: int, progress: str | None = None) -> np.ndarray:
    """Pooled INT8-encoder embeddings of `texts`, in input order (rows align with embed_texts).

    One query per call, as Router.route runs it: dynamic int8 takes its activation scales from the
    whole batch, padding included, so a query's rounding depends on its batch-mates.
    """
    import torch

    from zooter.training.train import in_length_order

    with tempfile.TemporaryDirectory(prefix="zooter-int8-") as tmp:
        session = int8_encoder(model, Path(tmp))
        names = {i.name for i in session.get_inputs()}

        def run(enc):
            feeds = {k: v.numpy().astype(np.int64) for k, v in enc.items() if k in names}
            return torch.from_numpy(session.run(["logits"], feeds)[0])

        return in_length_order(list(texts), tokenizer, max_length, 1, run, progress=progress)
