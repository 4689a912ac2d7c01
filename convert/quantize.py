"""Graph optimization, dynamic INT8 and fp16 for an exported router, with optimum's ORTOptimizer and ORTQuantizer.

    fp32 ONNX --ORTOptimizer (level 2: Attention, BiasGelu; SkipLayerNorm on GPU only)--> optimized fp32
              --ORTQuantizer (dynamic int8, Int8Recipe) + per-row int8 vocabulary table,
                head left fp32------------------------------------------------------> int8 (CPU)
              --ORTOptimizer (GPU fusions + fp16 weights, fp32 I/O)--------------> fp16 (GPU targets)

The INT8 settings are data: a frozen `Int8Recipe`, written into router.json and into the key of the
quantization-aware training cache (zooter.convert.int8_encoder), so the recipe that built a bundle's
model and the one its head was trained against can be compared, and a changed recipe never reuses
stale embeddings. Why each setting is what it is: docs/export-runtime.md.

ORTOptimizer takes our custom graph directly: it needs only the file and the backbone's config
(for the fused attention's head count and hidden size).
"""

from __future__ import annotations

import logging
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from zooter.runtime.errors import UserError

OPTIMIZATION_LEVEL = 2  # 99 adds layout rewrites tied to the machine that ran them: not for a portable file
INT8_CONFIGS = ("avx512_vnni", "avx512", "avx2", "arm64")


@dataclass(frozen=True)
class Int8Recipe:
    """How `zooter export --quantize int8` builds the INT8 model (and training its INT8 encoder)."""

    config: str                                   # optimum's per-CPU quantization config
    weights: str                                  # QInt8 (signed) or QUInt8
    reduce_range: bool                            # 7-bit weights
    per_channel: bool = True                      # one weight scale per output channel
    method: str = "dynamic"                       # activation scales computed per call, no calibration
    operators: tuple[str, ...] = ("MatMul", "Attention")
    vocabulary: str = "int8 per row"              # the word-embedding table, rewritten before ORTQuantizer
    head: str = "fp32"                            # the linear head over the candidates stays fp32
    optimization_level: int = OPTIMIZATION_LEVEL
    skip_layer_norm_fusion: bool = False          # Add + LayerNormalization stay unfused on CPU

    @classmethod
    def for_cpu(cls, arch: str = "auto") -> "Int8Recipe":
        arch = cpu_int8_config() if arch == "auto" else arch
        if arch not in INT8_CONFIGS:
            raise UserError(f"--arch {arch}: choose one of auto, {', '.join(INT8_CONFIGS)}")
        # Signed weights everywhere (on avx2 optimum's default would be unsigned); without VNNI they
        # keep 7 bits, so MLAS's vpmaddubsw pair sums cannot saturate.
        return cls(config=arch, weights="QInt8", reduce_range=arch in ("avx2", "avx512"))

    def to_json(self) -> dict:
        out = asdict(self)
        out["operators"] = list(self.operators)
        return out


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
    # On the CPU, onnxruntime's fused SkipLayerNormalization kernel is slower than the Add +
    # LayerNormalization it replaces (docs/export-runtime.md has the timings): CPU targets keep them
    # unfused, and Router sessions on the CPU do not re-fuse them at load.
    opt = OptimizationConfig(optimization_level=OPTIMIZATION_LEVEL, optimize_for_gpu=on_gpu, fp16=fp16,
                             disable_skip_layer_norm_fusion=not on_gpu, disable_bias_skip_layer_norm_fusion=not on_gpu)
    suffix = "fp16" if fp16 else "optimized"
    optimizer.optimize(opt, out_dir, file_suffix=suffix)
    path = Path(out_dir) / f"{Path(onnx_path).stem}_{suffix}.onnx"
    return path, ORTOptimizer.get_fused_operators(path)


def quantize_embedding_rows(model) -> dict:
    """The vocabulary table (the graph's largest Gather table) as int8 with one scale per row, in place.

    ORTQuantizer gives a Gather one scale for the whole table, set by its most extreme value, so
    rare tokens with small vectors keep few levels (on MiniLM enough to flip a router's decisions:
    docs/export-runtime.md). One scale per row keeps every token's vector within half a step of its
    own range. The table stays int8 on disk and in memory: the graph gathers the int8 rows and their
    scales and multiplies only the rows the query uses.
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


def quantize_int8(onnx_path: Path, out_dir: Path, recipe: Int8Recipe) -> tuple[Path, dict]:
    """Dynamic int8 (weights int8, activations quantized at run time: no calibration needed) by `recipe`;
    returns (path, {"recipe", "embedding", "fp32_nodes"})."""
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    onnx_path = Path(onnx_path)
    # The fused Attention ops live in the com.microsoft domain, which onnx's shape inference (run
    # inside the quantizer) cannot type; ORT's symbolic inference can, so the quantizer finds every
    # MatMul's type already annotated.
    model = SymbolicShapeInference.infer_shapes(onnx.load(str(onnx_path)), auto_merge=True)
    embedding = quantize_embedding_rows(model) if recipe.vocabulary == "int8 per row" else {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staged = out_dir / onnx_path.name  # the fp32 file stays as it was: the bundle may ship it
    onnx.save(model, str(staged))
    # The folder holds only the ONNX file, so optimum warns that it cannot find a config.json: expected.
    logging.getLogger("optimum.onnxruntime.quantization").setLevel(logging.ERROR)
    quantizer = ORTQuantizer.from_pretrained(out_dir, file_name=staged.name)
    # The heads (hidden x labels) cost nothing to run in fp32, and their input, the pooled embedding,
    # is then not rounded to 8 bits right before the decision. onnxruntime's quantizer first splits
    # a Gemm into "<name>_MatMul" + Add, so both names are listed.
    outputs = {o.name for o in model.graph.output}
    head = [name for n in model.graph.node if outputs & set(n.output) for name in (n.name, n.name + "_MatMul")]
    qconfig = getattr(AutoQuantizationConfig, recipe.config)(is_static=recipe.method == "static",
                                                             per_channel=recipe.per_channel,
                                                             nodes_to_exclude=head if recipe.head == "fp32" else [])
    qconfig.operators_to_quantize = list(recipe.operators) + ([] if embedding else ["Gather"])
    qconfig.weights_dtype = getattr(QuantType, recipe.weights)
    qconfig.reduce_range = recipe.reduce_range
    quantizer.quantize(save_dir=out_dir, quantization_config=qconfig, file_suffix="int8")
    path = Path(out_dir) / f"{onnx_path.stem}_int8.onnx"
    return path, {"recipe": recipe.to_json(), "fp32_nodes": head, "embedding": embedding}
