"""Graph optimization, dynamic INT8 and fp16 for an exported router, with optimum's ORTOptimizer and ORTQuantizer.

    fp32 ONNX --ORTOptimizer (level 2: Attention, BiasGelu; SkipLayerNorm on GPU only)--> optimized fp32
              --ORTQuantizer (dynamic int8, per-channel weights, per-CPU config) + per-row int8
                vocabulary table, head left fp32--------------------------------------> int8 (CPU)
              --ORTOptimizer (GPU fusions + fp16 weights, fp32 I/O)--------------> fp16 (GPU targets)

ORTOptimizer takes our custom graph directly: it needs only the file and the backbone's config
(for the fused attention's head count and hidden size).
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

from zooter.errors import UserError

OPTIMIZATION_LEVEL = 2  # 99 adds layout rewrites tied to the machine that ran them: not for a portable file
INT8_CONFIGS = ("avx512_vnni", "avx512", "avx2", "arm64")
INT8_QUANTIZED_OPS = ("MatMul", "Attention")  # plus the vocabulary table, per row; the head stays fp32
INT8_RECIPE = "dynamic, per-channel s7 weights on x86, per-row vocabulary, LayerNorm unfused on CPU; ops " + "+".join(INT8_QUANTIZED_OPS)


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
    on_gpu = gpu or fp16
    # On the CPU, onnxruntime's fused SkipLayerNormalization kernel took 160 us a call at 64 tokens
    # where Add + LayerNormalization take 30 us: unfused, the 2-layer INT8 router ran 10% faster
    # (docs/export-runtime.md). Router sessions on the CPU keep it unfused at load as well.
    opt = OptimizationConfig(optimization_level=OPTIMIZATION_LEVEL, optimize_for_gpu=on_gpu, fp16=fp16,
                             disable_skip_layer_norm_fusion=not on_gpu, disable_bias_skip_layer_norm_fusion=not on_gpu)
    suffix = "fp16" if fp16 else "optimized"
    optimizer.optimize(opt, out_dir, file_suffix=suffix)
    path = Path(out_dir) / f"{Path(onnx_path).stem}_{suffix}.onnx"
    return path, ORTOptimizer.get_fused_operators(path)


def quantize_embedding_rows(model) -> dict:
    """The vocabulary table (the graph's largest Gather table) as int8 with one scale per row, in place.

    ORTQuantizer gives a Gather one scale for the whole table, set by its most extreme value, so
    rare tokens with small vectors keep few levels; on MiniLM that alone moved pooled embeddings by
    3% and flipped 3.4% of a router's decisions. One scale per row keeps every token's vector to
    within 0.4% of its own range. The table stays int8 on disk and in memory: the graph gathers the
    int8 rows and their scales and multiplies only the rows the query uses.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    tables = {i.name: i for i in model.graph.initializer if len(i.dims) == 2}
    users: dict[str, list] = {}
    for n in model.graph.node:
        for i, tensor in enumerate(n.input):
            if tensor in tables:
                users.setdefault(tensor, []).append((n, i))
    # Only a table read by row-Gathers alone can be rewritten (an EmbedLayerNormalization fusion, say,
    # reads the whole table); such a table is left to ORTQuantizer, which then quantizes the Gather.
    def row_gather(node, position) -> bool:
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        return node.op_type == "Gather" and position == 0 and axis == 0

    candidates = [t for t, uses in users.items() if all(row_gather(n, i) for n, i in uses)]
    if not candidates:
        return {}
    name = max(candidates, key=lambda t: tables[t].dims[0])
    gathers = [n for n, _ in users[name]]
    table = numpy_helper.to_array(tables[name]).astype(np.float32)
    scale = np.maximum(np.abs(table).max(axis=1, keepdims=True), 1e-12) / 127.0
    quantized = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
    model.graph.initializer.remove(tables[name])
    model.graph.initializer.extend([numpy_helper.from_array(quantized, name + "_int8"),
                                    numpy_helper.from_array(scale.astype(np.float32), name + "_row_scale")])
    for node in gathers:
        ids, out = node.input[1], node.output[0]
        at = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        new = [helper.make_node("Gather", [name + "_int8", ids], [out + "_int8"], name=out + "_gather_int8", axis=0),
               helper.make_node("Cast", [out + "_int8"], [out + "_rows"], name=out + "_cast", to=TensorProto.FLOAT),
               helper.make_node("Gather", [name + "_row_scale", ids], [out + "_scale"], name=out + "_gather_scale", axis=0),
               helper.make_node("Mul", [out + "_rows", out + "_scale"], [out], name=out + "_dequantize")]
        for offset, n in enumerate(new):
            model.graph.node.insert(at + offset, n)
    return {"table": name, "rows": int(table.shape[0]), "scale": "per row, symmetric int8",
            "max_abs_error": float((np.abs(quantized * scale - table)).max())}


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
    embedding = quantize_embedding_rows(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staged = out_dir / onnx_path.name  # the fp32 file stays as it was: the bundle may ship it
    onnx.save(model, str(staged))
    # The folder holds only the ONNX file, so optimum warns that it cannot find a config.json: expected.
    logging.getLogger("optimum.onnxruntime.quantization").setLevel(logging.ERROR)
    quantizer = ORTQuantizer.from_pretrained(out_dir, file_name=staged.name)
    # Per-channel weight scales: on routers whose top two candidates are close, per-tensor scales
    # flipped several percent of decisions; per-channel costs about 0.1 MB.
    # The vocabulary table is already int8 (per row, above); the position and token-type tables are
    # small and stay fp32. The head (hidden x labels) costs nothing to run in fp32, so its input, the
    # pooled embedding, is not rounded to 8 bits right before the decision.
    # onnxruntime's quantizer first splits a Gemm into "<name>_MatMul" + Add, so both names are listed.
    head = [name for n in model.graph.node if "logits" in n.output for name in (n.name, n.name + "_MatMul")]
    qconfig = getattr(AutoQuantizationConfig, arch)(is_static=False, per_channel=True, nodes_to_exclude=head)
    qconfig.operators_to_quantize = list(INT8_QUANTIZED_OPS) + ([] if embedding else ["Gather"])
    if arch in ("avx2", "avx512"):
        # Signed weights take MLAS's u8 x s8 kernels, 10% faster here than optimum's u8 x u8 on avx2.
        # Without VNNI those kernels use vpmaddubsw, whose 16-bit pair sums saturate with full 8-bit
        # weights (255 * 127 * 2 > 32767): reduce_range keeps the weights in 7 bits, which cannot.
        from onnxruntime.quantization import QuantType

        qconfig.weights_dtype = QuantType.QInt8
        qconfig.reduce_range = True
    quantizer.quantize(save_dir=out_dir, quantization_config=qconfig, file_suffix="int8")
    path = Path(out_dir) / f"{onnx_path.stem}_int8.onnx"
    details = {"method": "dynamic", "config": arch, "per_channel": qconfig.per_channel,
               "weights": str(qconfig.weights_dtype).rsplit(".", 1)[-1],
               "activations": str(qconfig.activations_dtype).rsplit(".", 1)[-1],
               "operators": [str(getattr(o, "value", o)) for o in qconfig.operators_to_quantize],
               "fp32_nodes": head, "embedding": embedding}
    return path, details
