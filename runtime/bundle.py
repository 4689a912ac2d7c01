"""The bundle format: a folder an app or Triton loads without the training code.

    BUNDLE/model.int8.onnx   (model.onnx for --quantize none, model.fp16.onnx for fp16)
    BUNDLE/tokenizer.json    the backbone's tokenizer (tokenizers library format)
    BUNDLE/router.json       the manifest below

router.json (format_version 2):
    format_version   FORMAT_VERSION; readers refuse other versions
    labels           candidate names in logit order (every consumer takes them from here)
    max_length       tokens per query after truncation
    model_file, inputs, opset   the ONNX file to load and its input names
    output, reward_output       its two outputs: the distilled logits and the raw expected-reward scores
    files            {file name: {"sha256", "bytes"}} for every file but router.json
    quantization     {"mode": "int8"|"fp16"|"none", the recipe and what the optimizer fused}
    costs            {candidate: {"input_per_mtok", "output_per_mtok", "unit"}} or null
    decision         the decision rule's settings (zooter.runtime.decision.Rule): anchor (the training
                     best), margin (the guard), expected_reward and confidence (isotonic tables),
                     tolerance and lambda (the cost knobs' defaults), and how they were fitted
    provenance       the run's training record (data_sha256, backbone, beta, tau, loss, seed, ...)
    parity           the shipped model against PyTorch on validation rows
    evaluation       the run's dev figures
    manifest_sha256  sha256 of everything above (canonical JSON): an edited router.json (say, two
                     labels swapped) is refused instead of routing to the wrong models

Both sides live here: `read_manifest` (validates every key, names the bad one) and `write_bundle`
(export writes through it). Standard library only: the bottom layer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

from zooter.runtime.errors import UserError
from zooter.runtime.files import json_error, sha256_file

FORMAT_VERSION = 2
MANIFEST = "router.json"
MODEL_FILES = {"int8": "model.int8.onnx", "fp16": "model.fp16.onnx", "none": "model.onnx"}
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MAX_LENGTH_LIMIT = 8192
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BundleError(UserError):
    """The bundle is missing a file, was modified, or does not fit together."""


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest without its own checksum, as canonical JSON (sorted keys, no spaces)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def router_id(manifest: dict) -> str:
    """The name every answer gives of the router that chose it: the first 12 hex of the manifest's sha256."""
    return str(manifest["manifest_sha256"])[:12]


def encoder_identity(manifest: dict) -> dict:
    """What a bundle's encoder is, for swapping routers in service (a router with new candidates keeps it):
    the tokenizer's checksum, max_length and the backbone it was trained from, cut to its layers."""
    provenance = manifest.get("provenance") or {}
    config = provenance.get("config") or {}
    return {"tokenizer.json": (manifest["files"].get("tokenizer.json") or {}).get("sha256"),
            "max_length": manifest["max_length"], "backbone": provenance.get("backbone"), "layers": config.get("layers"),
            "frozen": provenance.get("frozen")}


def swap_problem(old: dict, new: dict) -> str | None:
    """Why a router cannot replace another in service (None when it can): another encoder."""
    a, b = encoder_identity(old), encoder_identity(new)
    changed = [k for k in a if a[k] != b[k]]
    if changed:
        return f"another encoder ({', '.join(f'{k} {a[k]!r} -> {b[k]!r}' for k in changed)})"
    return None


def finite_number(value, key: str, where: str, minimum: float | None = 0.0) -> float:
    """A finite number (not a bool), at least `minimum`; else a BundleError naming the key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BundleError(f"{where}: {key!r} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise BundleError(f"{where}: {key!r} must be >= {minimum:g}, got {value!r}")
    return float(value)


def validate_manifest(manifest, where: str = MANIFEST) -> dict:
    """Check every key a consumer reads; raise a BundleError naming the first bad one."""
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{where}: 'format_version' is {version!r}; this zooter reads version {FORMAT_VERSION} "
                          f"(export the run again with this zooter)")
    for key in ("labels", "max_length", "model_file", "files", "inputs", "output", "reward_output", "decision"):
        if key not in manifest:
            raise BundleError(f"{where}: no {key!r}")
    labels = manifest["labels"]
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        raise BundleError(f"{where}: 'labels' must be a list of candidate names, got {labels!r:.80}")
    if len(labels) < 2:
        raise BundleError(f"{where}: 'labels' lists {len(labels)} candidate(s); routing needs at least 2")
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise BundleError(f"{where}: 'labels' repeats {repeated}")
    max_length = manifest["max_length"]
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= MAX_LENGTH_LIMIT:
        raise BundleError(f"{where}: 'max_length' must be an integer in 2..{MAX_LENGTH_LIMIT}, got {max_length!r}")
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{where}: 'files' must be an object {{file name: {{sha256, bytes}}}}")
    for name, entry in files.items():
        # Plain names only: a bundle never points outside its own folder.
        if not _FILE_NAME.match(name):
            raise BundleError(f"{where}: 'files' names {name!r}, which is not a plain file name")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
            raise BundleError(f"{where}: 'files'.{name} needs a sha256 (64 hex digits)")
    for name in (manifest["model_file"], "tokenizer.json"):
        if not isinstance(name, str) or name not in files:
            raise BundleError(f"{where}: 'model_file' {name!r} is not listed under 'files'" if name != "tokenizer.json"
                              else f"{where}: tokenizer.json is not listed under 'files'")
    inputs = manifest["inputs"]
    if not isinstance(inputs, list) or not inputs or not all(i in TOKEN_INPUTS for i in inputs):
        raise BundleError(f"{where}: 'inputs' must list some of {list(TOKEN_INPUTS)}, got {inputs!r}")
    for key in ("output", "reward_output"):
        if not isinstance(manifest[key], str) or not manifest[key]:
            raise BundleError(f"{where}: {key!r} must name one of the model's outputs")
    validate_decision(manifest["decision"], labels, where)
    costs = manifest.get("costs")
    if costs is not None:
        if not isinstance(costs, dict) or set(costs) != set(labels):
            raise BundleError(f"{where}: 'costs' must be null or price every label, and only them")
        for name, cost in costs.items():
            if not isinstance(cost, dict):
                raise BundleError(f"{where}: 'costs'.{name} must be an object")
            for key in ("input_per_mtok", "output_per_mtok", "unit"):
                finite_number(cost.get(key), f"costs.{name}.{key}", where)
    if not isinstance(manifest.get("manifest_sha256"), str):
        raise BundleError(f"{where}: no 'manifest_sha256'")
    if manifest_digest(manifest) != manifest["manifest_sha256"]:
        raise BundleError(f"{where}: was modified after export (its content no longer matches 'manifest_sha256'); "
                          f"export the run again rather than editing router.json (labels, costs, lambda ...)")
    return manifest


def validate_decision(decision, labels: list[str], where: str) -> None:
    """The `decision` block: every setting the rule reads, checked as zooter.runtime.decision.Rule reads it."""
    from zooter.runtime.decision import Table, check_number, check_weight
    from zooter.runtime.errors import SettingError

    if not isinstance(decision, dict):
        raise BundleError(f"{where}: 'decision' must be an object")
    if decision.get("anchor") not in labels:
        raise BundleError(f"{where}: 'decision.anchor' must be one of the labels, got {decision.get('anchor')!r}")
    try:
        check_number(decision.get("margin"), "decision.margin")
        check_weight(decision.get("tolerance", 0.0), "decision.tolerance")
        check_weight(decision.get("lambda", 0.0), "decision.lambda")
        Table.from_json(decision.get("expected_reward"), "decision.expected_reward")
        Table.from_json(decision.get("confidence"), "decision.confidence")
    except SettingError as err:
        raise BundleError(f"{where}: {err}") from None


def read_manifest(bundle: str | Path, verify: bool = True) -> dict:
    """router.json of a bundle, validated; with `verify`, every listed file checked against its sha256."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    try:
        if not bundle.is_dir():
            raise BundleError(f"{bundle}: no such bundle folder")
        if not path.is_file():
            raise BundleError(f"{path}: missing file (not a zooter bundle?)")
        text = path.read_bytes().decode("utf-8")
    except PermissionError:
        raise BundleError(f"{bundle}: permission denied (cannot read the bundle)") from None
    except UnicodeDecodeError:
        raise BundleError(f"{path}: not valid UTF-8") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise BundleError(f"{path}: invalid JSON: {json_error(err)}") from None
    validate_manifest(manifest, str(path))
    for name, entry in manifest["files"].items():
        file = bundle / name
        try:
            if not file.is_file():
                raise BundleError(f"{file}: missing file listed in router.json")
            if verify and sha256_file(file) != entry["sha256"]:
                raise BundleError(f"{file}: checksum mismatch (sha256 differs from router.json): "
                                  f"the file is damaged or was modified")
        except PermissionError:
            raise BundleError(f"{file}: permission denied (cannot read it)") from None
    return manifest


def write_bundle(out: str | Path, files: dict[str, Path], manifest: dict, force: bool = False) -> dict:
    """Copy `files` ({bundle name: source path}) into `out` with their checksums and write router.json.

    The bundle is assembled beside `out` and renamed into place, so a failed export never leaves
    a half-written bundle where an app expects a whole one. Returns the manifest as written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose a folder for the bundle")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UserError(f"{out}: exists and is not empty; pass --force to replace it")
        if not (out / MANIFEST).is_file():
            raise UserError(f"{out}: exists and is not a bundle; refusing to replace it")
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        entries = {}
        for name, src in files.items():
            shutil.copyfile(src, staging / name)
            entries[name] = {"sha256": sha256_file(staging / name), "bytes": (staging / name).stat().st_size}
        manifest = {"format_version": FORMAT_VERSION, **manifest, "files": entries}
        manifest.pop("manifest_sha256", None)
        manifest["manifest_sha256"] = manifest_digest(manifest)
        validate_manifest(manifest, f"{out}/{MANIFEST}")
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def bundle_bytes(manifest: dict) -> int:
    return sum(entry["bytes"] for entry in manifest["files"].values())
