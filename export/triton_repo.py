"""Build a Triton model repository from a bundle and a candidates file (`zooter triton build`).

Fills the templates in triton_models/ (config.pbtxt with ${...} fields, model.py copied as is):

    zooter_route      text -> the decision (candidate, probabilities, expected_rewards, confidence, ranking):
                      --router-backend python (CPU, servers without the onnxruntime backend): one python
                      model running zooter.runtime.Router itself; --router-backend onnxruntime: an ensemble of
        zooter_tokenize   python: text -> token ids (zooter.runtime.tokenize, as the Router)
        zooter_router     the bundle's ONNX graph on Triton's onnxruntime backend (CPU or GPU, TensorRT)
        zooter_decide     python: logits, rewards -> the decision (zooter.runtime.decision.Rule)
    zooter            python BLS, decoupled: route (on the text --route-on picks, zooter.runtime.conversation),
                      then stream the chosen candidate's answer, with fallback. With --router-backend python
                      it routes in its own stub (the bundle's files in its folder too, as zooter_route's),
                      so the answer's path has one python-backend round trip less; with onnxruntime it
                      asks zooter_route
    standin_<name>    (--stand-ins) a candidate answered by zooter_standin_llm, with the TensorRT-LLM
                      ensemble I/O or (--stand-in-io llmapi) the LLM-API model's
    zooter_standin_llm  SmolLM2-135M-Instruct shared by all stand-ins

Labels and the decision rule come from the bundle's router.json, so the label order can never
mismatch; the cost knobs' defaults from the bundle unless --lambda/--tolerance say otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from string import Template
from typing import Sequence

from zooter.runtime.bundle import MANIFEST, Manifest
from zooter.runtime.candidate_io import ENSEMBLE, LLMAPI, TRITON_IOS, config_inputs
from zooter.runtime.errors import UserError
from zooter.runtime.routing import ROUTER_BACKENDS, RoutingConfig

TEMPLATES = Path(__file__).resolve().parents[1] / "triton_models"
MARKER = ".zooter-triton-repo"

# TensorRT-LLM inflight_batcher_llm ensemble inputs (name, type, dims); all but text_input optional
# here. The `zooter` model and the stand-ins take these, and `zooter` forwards them to the candidate.
LLM_INPUTS = [
    ("text_input", "TYPE_STRING", "-1", False),
    ("max_tokens", "TYPE_INT32", "-1", True),
    ("bad_words", "TYPE_STRING", "-1", True),
    ("stop_words", "TYPE_STRING", "-1", True),
    ("end_id", "TYPE_INT32", "1", True),
    ("pad_id", "TYPE_INT32", "1", True),
    ("top_k", "TYPE_INT32", "1", True),
    ("top_p", "TYPE_FP32", "1", True),
    ("temperature", "TYPE_FP32", "1", True),
    ("length_penalty", "TYPE_FP32", "1", True),
    ("repetition_penalty", "TYPE_FP32", "1", True),
    ("min_length", "TYPE_INT32", "1", True),
    ("presence_penalty", "TYPE_FP32", "1", True),
    ("frequency_penalty", "TYPE_FP32", "1", True),
    ("random_seed", "TYPE_UINT64", "1", True),
    ("beam_width", "TYPE_INT32", "1", True),
    ("stream", "TYPE_BOOL", "1", True),
]

DECISION_OUTPUTS = [("candidate", "TYPE_STRING", "1"), ("probabilities", "TYPE_FP32", "${num_labels}"),
                    ("expected_rewards", "TYPE_FP32", "${num_labels}"), ("confidence", "TYPE_FP32", "1"),
                    ("ranking", "TYPE_STRING", "${num_labels}")]


@dataclass
class BuiltRepository:
    path: Path
    labels: list[str]
    models: list[str] = field(default_factory=list)
    serving: dict = field(default_factory=dict)      # label -> {"model": name or None, "why": str}

    @property
    def stand_ins(self) -> dict[str, str]:
        return {label: s["model"] for label, s in self.serving.items() if s.get("stand_in")}

    @property
    def unreachable(self) -> list[str]:
        return [label for label, s in self.serving.items() if not s.get("model")]


@dataclass(frozen=True)
class RepositoryOptions:
    """How `zooter triton build` shapes a repository; each field is the flag of the same name."""

    router_backend: str = "python"          # python: zooter_route runs the Router; onnxruntime: the ensemble
    router_device: str = "cpu"
    tensorrt: bool = False
    lam: float | None = None                # the cost knobs; None: the bundle's defaults
    tolerance: float | None = None
    stand_ins: bool = False                 # a CPU stand-in for every candidate without a Triton model
    stand_in_io: str = ENSEMBLE
    standin_model_dir: str | Path | None = None
    max_batch_size: int = 32
    max_text_bytes: int = 65536
    max_prompt_bytes: int = 1 << 20
    default_max_tokens: int = 128           # --max-tokens
    max_tokens_limit: int = 4096
    route_instances: int = 2
    intra_op_threads: int = 2
    route_on: str = "last-user"

    def check(self, bundle: Path, manifest: Manifest) -> None:
        """A UserError naming the flag when a setting is out of range or does not fit the bundle."""
        from zooter.runtime.conversation import check_route_on

        if self.stand_in_io not in TRITON_IOS:
            raise UserError(f"--stand-in-io must be one of {', '.join(TRITON_IOS)}, not {self.stand_in_io!r}")
        if self.router_backend not in ROUTER_BACKENDS:
            raise UserError(f"--router-backend must be python or onnxruntime, not {self.router_backend!r}")
        if self.tensorrt and (self.router_backend != "onnxruntime" or self.router_device != "gpu"):
            raise UserError("--tensorrt needs --router-backend onnxruntime --router-device gpu")
        if self.router_backend == "onnxruntime" and (manifest.quantization or {}).get("mode") == "int8":
            # Triton's onnxruntime backend runs a request's rows, and the requests it batches, as one padded
            # tensor, and dynamic INT8 takes its activation scales over the whole tensor (issue 20).
            raise UserError(f"{bundle}: --router-backend onnxruntime would run this INT8 bundle's queries as one padded "
                            "batch, where dynamic INT8 lets a query's decision depend on its batch companions; use "
                            "--router-backend python (each query alone), or export with --quantize fp16 or none")
        self.knobs(manifest)
        if self.router_device == "gpu" and self.router_backend != "onnxruntime":
            raise UserError("--router-device gpu needs --router-backend onnxruntime (the python router runs on the CPU)")
        try:
            check_route_on(self.route_on)
        except ValueError as err:
            raise UserError(str(err)) from None
        if self.max_prompt_bytes < 1:
            raise UserError(f"--max-prompt-bytes must be >= 1, got {self.max_prompt_bytes}")
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise UserError(f"--max-tokens must be in 1..{self.max_tokens_limit}, got {self.default_max_tokens}")

    def knobs(self, manifest: Manifest) -> tuple[float, float]:
        """(lambda, tolerance) the repository routes with: the flags, else the bundle's defaults (as the Router)."""
        from zooter.runtime.decision import check_weight

        lam = check_weight(manifest.decision.get("lambda", 0.0) if self.lam is None else self.lam, "--lambda")
        tolerance = check_weight(manifest.decision.get("tolerance", 0.0) if self.tolerance is None else self.tolerance,
                                 "--tolerance")
        return lam, tolerance


def read_bundle(bundle: str | Path) -> tuple[Path, Manifest]:
    """The bundle folder and its router.json, after the Router's own checks (files present, checksums)."""
    bundle = Path(bundle)
    return bundle, Manifest.read(bundle, verify=True)


def model_name_for(candidate: str) -> str:
    """A stand-in's Triton model name: the candidate's name with anything but [A-Za-z0-9_.-] as '_'."""
    return "standin_" + re.sub(r"[^A-Za-z0-9_.-]", "_", candidate)


def _io_block(entries) -> str:
    lines = []
    for name, dtype, dims, optional in entries:
        opt = " optional: true" if optional else ""
        lines.append(f'  {{ name: "{name}" data_type: {dtype} dims: [ {dims} ]{opt} }}')
    return ",\n".join(lines)


def _pbtxt_string(text: str) -> str:
    """Escape text for a double-quoted protobuf text-format string."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fill(template: Path, values: dict) -> str:
    try:
        return Template(template.read_text()).substitute(values)
    except KeyError as err:
        raise RuntimeError(f"{template}: no value for ${{{err.args[0]}}}") from None


def _write_model(out: Path, name: str, config: str, files: dict[str, Path | str] = {}) -> None:
    folder = out / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(config)
    for dest, src in files.items():
        target = folder / "1" / dest
        if isinstance(src, Path):
            shutil.copy2(src, target)
        else:
            target.write_text(src)


def _detect_io(label: str, serve: dict):
    """A candidate's model as its server describes it (runtime.candidate_io.TritonModel: its I/O, whether it is
    decoupled); None when the server cannot be asked. A model with none of the known I/Os is a UserError
    naming it and its inputs."""
    try:
        from tritonclient.utils import InferenceServerException
    except ImportError:           # without the triton extra nothing can be asked: serve.io (default ensemble) holds
        return None
    from zooter.runtime.candidate_io import IOMismatch
    from zooter.serving.clients import Sampling, TritonClient

    client = TritonClient(serve, Sampling(timeout_s=5.0))
    try:
        return client.describe()
    except IOMismatch as err:
        raise UserError(f"candidate {label!r} at {serve['triton_url']}: {err}") from None
    except (InferenceServerException, OSError):
        return None
    finally:
        client.close()


def _serving(candidates, labels, stand_ins: bool, stand_in_io: str = ENSEMBLE) -> dict:
    """label -> {"model": the Triton model that answers, or None; "io": its I/O; "why"}."""
    by_name = {c.name: c for c in candidates} if candidates is not None else {}
    serving = {}
    for label in labels:
        serve = by_name[label].serve if label in by_name else {}
        if serve.get("triton_model"):
            # The `zooter` model cannot read another model's metadata: the build reads it when the candidate's
            # server is up (serve.triton_url), else an LLM-API candidate says so (serve.io).
            io = str(serve.get("io") or ENSEMBLE)
            if io not in TRITON_IOS:
                raise UserError(f"candidate {label!r}: serve.io {io!r} is not a Triton I/O; give one of {', '.join(TRITON_IOS)}")
            why = "candidates file: serve.triton_model"
            if serve.get("triton_url"):
                described = _detect_io(label, serve)
                io = described.io if described else io
                why += f", {io} I/O" + (" read from its metadata" if described else
                                        f" (its server at {serve['triton_url']} was not reachable to check)")
            serving[label] = {"model": str(serve["triton_model"]), "io": io, "why": why}
            if serve.get("triton_url") and described is not None:
                # The `zooter` model asks a model to stream only when it is decoupled (TensorRT-LLM ships its
                # LLM-API model not decoupled, and that refuses `streaming`); unread, the model assumes as shipped.
                serving[label]["decoupled"] = described.decoupled
            if serve.get("triton_url"):
                serving[label]["why"] += f" (expected in this server; triton_url {serve['triton_url']} is for direct clients)"
        elif stand_ins:
            serving[label] = {"model": model_name_for(label), "io": stand_in_io, "stand_in": True, "decoupled": True,
                              "why": f"stand-in with {stand_in_io} I/O (no serve entry)"}
        elif serve.get("openai_base_url"):
            serving[label] = {"model": None, "why": f"served over an OpenAI-compatible API ({serve['openai_base_url']}), not inside Triton"}
        else:
            serving[label] = {"model": None, "why": "no serve entry in the candidates file (build with --stand-ins for a CPU stand-in)"}
    return serving


def build_repository(bundle: str | Path, out: str | Path, candidates: Sequence | None = None,
                     options: RepositoryOptions | None = None, **settings) -> BuiltRepository:
    """Write a model repository to `out`; returns what went where. `candidates`: a list of Candidate;
    `options` (or any of its fields as keywords) how to build it.

    The repository is written into a folder beside `out` and renamed into place, so a build that fails
    leaves the repository that was there as it was."""
    options = replace(options or RepositoryOptions(), **settings)
    bundle, manifest = read_bundle(bundle)
    routing = plan_routing(bundle, manifest, candidates, options)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"{out}: exists and is not a repository built by zooter; choose an empty or new folder")
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        (staging / MARKER).write_text(json.dumps({"bundle": str(bundle.resolve()), "labels": list(manifest.labels)}) + "\n")
        built = BuiltRepository(out, list(manifest.labels), serving=routing.candidates)
        values = _template_values(manifest, options)
        built.models += _write_router(staging, bundle, manifest, routing, values, options)
        # A CPU repository's `zooter` routes in its own stub: it gets the bundle's files, as zooter_route does.
        router_files = _bundle_files(bundle, manifest) if options.router_backend == "python" else {}
        _write_model(staging, "zooter", _fill(TEMPLATES / "zooter" / "config.pbtxt", values),
                     {"model.py": TEMPLATES / "zooter" / "model.py", "routing.json": _routing_text(routing), **router_files})
        built.models.append("zooter")
        built.models += _write_stand_ins(staging, built.stand_ins, values, options)
        validate_repository(staging)
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return built


def plan_routing(bundle: Path, manifest: Manifest, candidates, options: RepositoryOptions) -> RoutingConfig:
    """routing.json for this bundle, candidates file and options, after every check the build makes."""
    from zooter.runtime.decision import unit_prices
    from zooter.serving.candidates import costs_for

    options.check(bundle, manifest)
    lam, tolerance = options.knobs(manifest)
    labels = list(manifest.labels)
    # Every label must be in the candidates file (raises, naming them); the prices are the bundle's (what
    # the in-process Router uses), else the candidates file's.
    listed = costs_for(candidates, labels) if candidates is not None else None
    prices = unit_prices(manifest.costs or listed, labels)
    costs = None if prices is None else prices.tolist()
    if (lam or tolerance) and costs is None:
        raise UserError(f"--{'lambda' if lam else 'tolerance'} needs a cost for every candidate (in the candidates file or the bundle)")
    return RoutingConfig(labels=tuple(labels), costs=costs, lam=lam, tolerance=tolerance,
                         candidates=_serving(candidates, labels, options.stand_ins, options.stand_in_io),
                         router_backend=options.router_backend,
                         bundle={"format_version": manifest.format_version, "max_length": manifest.max_length,
                                 "model_file": manifest.model_file})


def _routing_text(routing: RoutingConfig) -> str:
    return json.dumps(routing.to_json(), indent=2)


def _template_values(manifest: Manifest, options: RepositoryOptions) -> dict:
    """The ${...} fields every config.pbtxt template shares."""
    labels = list(manifest.labels)
    values = {"max_batch_size": options.max_batch_size, "num_labels": len(labels), "llm_inputs": _io_block(LLM_INPUTS),
              "default_max_tokens": options.default_max_tokens, "max_tokens_limit": options.max_tokens_limit,
              "max_text_bytes": options.max_text_bytes, "labels_json": _pbtxt_string(json.dumps(labels)),
              "max_prompt_bytes": options.max_prompt_bytes, "route_on": options.route_on,
              "intra_op_threads": options.intra_op_threads}
    values["decision_outputs"] = Template(_io_block([(n, t, d, False) for n, t, d in DECISION_OUTPUTS])).substitute(values)
    return values


def _write_router(out: Path, bundle: Path, manifest: Manifest, routing: RoutingConfig, values: dict,
                  options: RepositoryOptions) -> list[str]:
    """zooter_route: one python model (--router-backend python), or the tokenize -> router -> decide ensemble."""
    if options.router_backend == "python":
        _write_model(out, "zooter_route",
                     _fill(TEMPLATES / "zooter_route" / "config.python.pbtxt", dict(values, route_instances=options.route_instances)),
                     {"model.py": TEMPLATES / "zooter_route" / "model.py", "routing.json": _routing_text(routing),
                      **_bundle_files(bundle, manifest)})
        return ["zooter_route"]
    token_names = manifest.token_inputs
    token_io = _io_block([(n, "TYPE_INT64", "-1", False) for n in token_names])
    steps = ensemble_bundle_files(bundle, manifest)
    _write_model(out, "zooter_tokenize",
                 _fill(TEMPLATES / "zooter_tokenize" / "config.pbtxt", dict(values, token_outputs=token_io)),
                 {"model.py": TEMPLATES / "zooter_tokenize" / "model.py", **steps["zooter_tokenize"]})
    accelerator = ""
    if options.tensorrt:
        accelerator = ('optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt"\n'
                       '  parameters { key: "precision_mode" value: "FP16" } } ] } }')
    _write_model(out, "zooter_router",
                 _fill(TEMPLATES / "zooter_router" / "config.onnxruntime.pbtxt",
                       dict(values, token_inputs=token_io, model_file=manifest.model_file, accelerator=accelerator,
                            instance_kind="KIND_GPU" if options.router_device == "gpu" else "KIND_CPU")),
                 steps["zooter_router"])
    _write_model(out, "zooter_decide", _fill(TEMPLATES / "zooter_decide" / "config.pbtxt", values),
                 {"model.py": TEMPLATES / "zooter_decide" / "model.py", "routing.json": _routing_text(routing),
                  **steps["zooter_decide"]})
    step_maps = {
        "tokenize_output_map": "\n".join(f'      output_map {{ key: "{n}" value: "_{n}" }}' for n in token_names),
        "router_input_map": "\n".join(f'      input_map {{ key: "{n}" value: "_{n}" }}' for n in token_names),
    }
    _write_model(out, "zooter_route", _fill(TEMPLATES / "zooter_route" / "config.ensemble.pbtxt",
                                            dict(values, **step_maps, route_version=1)))
    return ["zooter_tokenize", "zooter_router", "zooter_decide", "zooter_route"]


def ensemble_bundle_files(bundle: Path, manifest: Manifest) -> dict[str, dict[str, Path]]:
    """What each step of the onnxruntime-backend ensemble takes from the bundle into its version folder."""
    return {"zooter_tokenize": {"tokenizer.json": bundle / "tokenizer.json", MANIFEST: bundle / MANIFEST},
            "zooter_router": {name: bundle / name for name in _onnx_files(bundle, manifest)},
            "zooter_decide": {MANIFEST: bundle / MANIFEST}}


def _write_stand_ins(out: Path, stand_ins: dict[str, str], values: dict, options: RepositoryOptions) -> list[str]:
    """The shared stand-in LLM and one stand-in model a candidate (label -> model name); none without stand-ins."""
    if not stand_ins:
        return []
    from zooter.triton_models import standin_llm

    model_dir = Path(options.standin_model_dir) if options.standin_model_dir else standin_llm.ensure_converted()
    _write_model(out, "zooter_standin_llm",
                 _fill(TEMPLATES / "zooter_standin_llm" / "config.pbtxt",
                       dict(values, standin_model_dir=str(model_dir.resolve()), max_tokens_cap=1024)),
                 {"model.py": TEMPLATES / "zooter_standin_llm" / "model.py"})
    config = "config.llmapi.pbtxt" if options.stand_in_io == LLMAPI else "config.pbtxt"
    for label, model in stand_ins.items():
        _write_model(out, model, _fill(TEMPLATES / "zooter_standin" / config,
                                       dict(values, model_name=model, candidate=label, llmapi_inputs=config_inputs(LLMAPI))),
                     {"model.py": TEMPLATES / "zooter_standin" / "model.py"})
    return ["zooter_standin_llm", *stand_ins.values()]


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename the finished repository to `out`; the one there before goes only once the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _bundle_files(bundle: Path, manifest: Manifest) -> dict[str, Path]:
    """What a python model that runs the Router needs in its version folder: router.json, the ONNX file(s), the tokenizer."""
    return {MANIFEST: bundle / MANIFEST, **{name: bundle / name for name in _onnx_files(bundle, manifest)},
            "tokenizer.json": bundle / "tokenizer.json"}


def _onnx_files(bundle: Path, manifest: Manifest) -> list[str]:
    """The ONNX file and its external-data files (listed in router.json `files`, or beside it)."""
    names = {manifest.model_file}
    for name in manifest.files:
        if name.endswith((".onnx", ".onnx_data", ".onnx.data", ".data")) and (bundle / name).is_file():
            names.add(name)
    stem = Path(manifest.model_file).stem
    names.update(p.name for p in bundle.glob(f"{stem}.onnx_data*"))
    return sorted(names)


def validate_repository(repo: str | Path) -> dict:
    """Parse every config.pbtxt with Triton's own ModelConfig protobuf; returns {model: ModelConfig}."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    configs = {}
    for path in sorted(Path(repo).glob("*/config.pbtxt")):
        config = model_config_pb2.ModelConfig()
        try:
            text_format.Parse(path.read_text(), config)
        except text_format.ParseError as err:
            raise RuntimeError(f"{path}: {err}") from None
        if config.name and config.name != path.parent.name:
            raise RuntimeError(f"{path}: name {config.name!r} differs from its folder")
        configs[path.parent.name] = config
    return configs
