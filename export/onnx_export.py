"""PyTorch router -> ONNX through optimum's exporter.

The RouterModel exposes its backbone's Hugging Face config, so optimum picks the backbone's ONNX
config for the "text-classification" task (inputs input_ids/attention_mask[/token_type_ids] with
dynamic batch and sequence axes, output "logits" of shape (batch, labels)) and traces our
encoder + mean pool + head as one graph.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from zooter.runtime.errors import UserError

TASK = "text-classification"


def onnx_config_for(model):
    from optimum.exporters.tasks import TasksManager

    model_type = model.config.model_type
    try:
        constructor = TasksManager.get_exporter_config_constructor(
            exporter="onnx", model_type=model_type, task=TASK, library_name="transformers")
    except (KeyError, ValueError) as err:
        raise UserError(f"optimum cannot export backbone type {model_type!r} for {TASK}: {err}") from None
    return constructor(model.config)


def export_onnx(model, path: str | Path, opset: int | None = None) -> dict:
    """Write `model` (a RouterModel) to `path`; returns {"inputs": [...], "output": "logits", "opset": int}."""
    from optimum.exporters.onnx import export

    config = onnx_config_for(model)
    opset = opset or config.DEFAULT_ONNX_OPSET
    if opset < config.DEFAULT_ONNX_OPSET:
        raise UserError(f"--opset {opset}: the {model.config.model_type} exporter needs opset >= {config.DEFAULT_ONNX_OPSET}")
    path = Path(path)
    with warnings.catch_warnings():
        # The tracer notes every constant it bakes in (BERT's mask arithmetic); none depends on the input.
        warnings.filterwarnings("ignore", message=".*(results are registered as constants|Converting a tensor to a Python).*")
        inputs, outputs = export(model.eval(), config, path, opset=opset)
    if list(outputs) != ["logits"]:
        raise RuntimeError(f"exported outputs {outputs}, expected ['logits']")
    return {"inputs": list(inputs), "output": "logits", "opset": opset}
