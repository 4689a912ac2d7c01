"""The one place an onnxruntime InferenceSession is built: the Router, the Triton router model and
every benchmark baseline open the bundle's model through `open_session`, so they run the same graph
with the same options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from zooter.runtime.errors import UserError

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def default_providers(available: Sequence[str] | None = None) -> list[str]:
    """GPU execution providers when this onnxruntime has them, the CPU always last."""
    import onnxruntime as ort

    available = set(available if available is not None else ort.get_available_providers())
    return [p for p in PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]


def open_session(model_path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None,
                 spin: bool = False):
    """An onnxruntime session of `model_path`.

    - providers: default TensorRT, CUDA, CPU (whichever this onnxruntime has); a missing one is an error.
    - threads: intra-op threads (None: onnxruntime's choice, one per core).
    - spin: worker threads spin-wait between calls. Off by default: on cores shared with other work
      (an app server, the next Triton step, a CI box) spinning workers take the cores the next call
      needs; on dedicated cores spinning saves a few microseconds of wake-up per call.
    - On the CPU alone, ORT must not re-fuse Add + LayerNormalization into SkipLayerNormalization at
      load: export leaves them unfused because that kernel is slower on CPUs (docs/export-runtime.md).
    """
    import onnxruntime as ort

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UserError(f"threads must be a positive integer, got {threads!r}")
    available = ort.get_available_providers()
    if providers is None:
        providers = default_providers(available)
    else:
        missing = [p for p in providers if p not in available]
        if missing:
            raise UserError(f"execution provider(s) {missing} not available in this onnxruntime (has {available})")
    options = ort.SessionOptions()
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    disabled = ["SkipLayerNormFusion"] if list(providers) == ["CPUExecutionProvider"] else []
    try:
        return ort.InferenceSession(str(model_path), options, providers=list(providers), disabled_optimizers=disabled)
    except PermissionError:
        raise UserError(f"{model_path}: permission denied (cannot read the model)") from None
