"""Graph optimization, dynamic INT8 and fp16 for an exported router, with optimum's ORTOptimizer and ORTQuantizer.

    fp32 ONNX --ORTOptimizer (level 2: Attention, SkipLayerNorm, BiasGelu fusions)--> optimized fp32
              --ORTQuantizer (dynamic int8 weights, per-CPU config)--------------> int8 (CPU)
              --ORTOptimizer (GPU fusions + fp16 weights, fp32 I/O)--------------> fp16 (GPU targets)

ORTOptimizer takes our custom graph directly: it needs only the file and the backbone's config
(for the fused attention's head count and hidden size).
"""

from __future__ import annotations

import platform
from pathlib import Path

from zooter.errors import UserError

OPTIMIZATION_LEVEL = 2  # 99 adds layout rewrites tied to the machine that ran them: not for a portable file
INT8_CONFIGS = ("avx512_vnni", "avx512", "avx2", "arm64")


def cpu_int8_config() -> str:
    """The optimum quantization config that suits this CPU (where the bundle will usually run)."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return "arm64"
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    if "avx512_vnni" in flags or "avx512vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


def optimize(onnx_path: Path, config, out_dir: Path, gpu: bool = False, fp16: bool = False) -> tuple[Path, dict]:
    """Transformer fusions (and fp16 weights when asked); returns (path, {fused op: count})."""
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig

    optimizer = ORTOptimizer([Path(onnx_path)], config)
    opt = OptimizationConfig(optimization_level=OPTIMIZATION_LEVEL, optimize_for_gpu=gpu or fp16, fp16=fp16)
    suffix = "fp16" if fp16 else "optimized"
    optimizer.optimize(opt, out_dir, file_suffix=suffix)
    path = Path(out_dir) / f"{Path(onnx_path).stem}_{suffix}.onnx"
    return path, ORTOptimizer.get_fused_operators(path)


def quantize_int8(onnx_path: Path, out_dir: Path, arch: str = "auto") -> tuple[Path, dict]:
    """Dynamic int8 (weights int8, activations quantized at run time: no calibration needed)."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    arch = cpu_int8_config() if arch == "auto" else arch
    if arch not in INT8_CONFIGS:
        raise UserError(f"--arch {arch}: choose one of auto, {', '.join(INT8_CONFIGS)}")
    onnx_path = Path(onnx_path)
    # The fused Attention/SkipLayerNorm ops live in the com.microsoft domain, which onnx's shape
    # inference (run inside the quantizer) cannot type; ORT's symbolic inference can, so the
    # quantizer finds every MatMul's type already annotated.
    model = SymbolicShapeInference.infer_shapes(onnx.load(str(onnx_path)), auto_merge=True)
    onnx.save(model, str(onnx_path))
    quantizer = ORTQuantizer.from_pretrained(onnx_path.parent, file_name=onnx_path.name)
    # Per-channel weight scales: on routers whose top two candidates are close, per-tensor scales
    # flipped several percent of decisions; per-channel costs about 0.1 MB.
    qconfig = getattr(AutoQuantizationConfig, arch)(is_static=False, per_channel=True)
    quantizer.quantize(save_dir=out_dir, quantization_config=qconfig, file_suffix="int8")
    path = Path(out_dir) / f"{onnx_path.stem}_int8.onnx"
    details = {"method": "dynamic", "config": arch, "per_channel": qconfig.per_channel,
               "weights": str(qconfig.weights_dtype).rsplit(".", 1)[-1],
               "activations": str(qconfig.activations_dtype).rsplit(".", 1)[-1],
               "operators": [str(getattr(o, "value", o)) for o in qconfig.operators_to_quantize]}
    return path, details
