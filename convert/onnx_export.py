"""PyTorch router -> ONNX through optimum's exporter.

The RouterModel exposes its backbone's Hugging Face config, so optimum picks the backbone's ONNX
config for the "text-classification" task (inputs input_ids/attention_mask[/token_type_ids] with
dynamic batch and sequence axes) and traces our encoder + mean pool + heads as one graph. The
router has two outputs, "logits" and "rewards" (batch, labels), where the task has one: the config
is the backbone's own with its outputs named ours.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from zooter.runtime.errors import UserError

TASK = "text-classification"


OUTPUTS = ("logits", "rewards")


def onnx_config_for(model, outputs: tuple[str, ...] = OUTPUTS):
    from optimum.exporters.tasks import TasksManager

    model_type = model.config.model_type
    try:
        constructor = TasksManager.get_exporter_config_constructor(
            exporter="onnx", model_type=model_type, task=TASK, library_name="transformers")
    except (KeyError, ValueError) as err:
        raise UserError(f"optimum cannot export backbone type {model_type!r} for {TASK}: {err}") from None
    base = constructor.func if hasattr(constructor, "func") else constructor

    class RouterOnnxConfig(base):
        @property
        def outputs(self):
            return {name: {0: "batch_size"} for name in outputs}

    return RouterOnnxConfig(model.config, task=TASK)


def export_onnx(model, path: str | Path, opset: int | None = None, outputs: tuple[str, ...] = OUTPUTS) -> dict:
    """Write `model` (a RouterModel, or a module answering the same inputs with `outputs`) to `path`;
    returns {"inputs": [...], "outputs": [...], "opset": int}."""
    from optimum.exporters.onnx import export

    config = onnx_config_for(model, outputs)
    opset = opset or config.DEFAULT_ONNX_OPSET
    if opset < config.DEFAULT_ONNX_OPSET:
        raise UserError(f"--opset {opset}: the {model.config.model_type} exporter needs opset >= {config.DEFAULT_ONNX_OPSET}")
    path = Path(path)
    with warnings.catch_warnings():
        # The tracer notes every constant it bakes in (BERT's mask arithmetic); none depends on the input.
        warnings.filterwarnings("ignore", message=".*(results are registered as constants|Converting a tensor to a Python).*")
        inputs, exported = export(model.eval(), config, path, opset=opset)
    if list(exported) != list(outputs):
        raise RuntimeError(f"exported outputs {list(exported)}, expected {list(outputs)}")
    return {"inputs": list(inputs), "outputs": list(exported), "opset": opset}


def export_pooled_onnx(model, path: str | Path, opset: int | None = None, outputs: tuple[str, ...] = OUTPUTS) -> dict:
    """A router whose encoder pools its own token table (a static encoder: Gather, masked mean, heads)
    has no Hugging Face config for optimum to pick an exporter by: torch's exporter traces it
    directly, with the same inputs (input_ids, attention_mask) and outputs, batch and sequence dynamic."""
    import torch

    opset = opset or 17
    path = Path(path)
    inputs = ("input_ids", "attention_mask")
    sample = (torch.ones((1, 4), dtype=torch.int64), torch.ones((1, 4), dtype=torch.int64))
    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in inputs}
    axes.update({name: {0: "batch_size"} for name in outputs})

    class Outputs(torch.nn.Module):
        def __init__(self, router):
            super().__init__()
            self.router = router

        def forward(self, input_ids, attention_mask):
            out = self.router(input_ids=input_ids, attention_mask=attention_mask)
            return tuple(out[name] for name in outputs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Outputs(model.eval()), sample, str(path), input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    return {"inputs": list(inputs), "outputs": list(outputs), "opset": opset}
