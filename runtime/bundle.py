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

Both sides live here: `Manifest`, router.json typed, whose one loader (`Manifest.read` for a bundle
folder, `Manifest.read_file` for a router.json on its own, as the Triton models hold it) validates every
key and names the bad one; and `write_bundle` (export writes a Manifest through it). `read_manifest` is
the same loader answering the JSON object. Standard library only: the bottom layer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from zooter.runtime.errors import UserError
from zooter.runtime.files import json_error, sha256_file

FORMAT_VERSION = 2
MANIFEST = "router.json"
MODEL_FILES = {"int8": "model.int8.onnx", "fp16": "model.fp16.onnx", "none": "model.onnx"}
# The token inputs a router model may take, in feed order: their one home (export, the Triton repository,
# the PyTorch router and the tokenizer's feeds all name them from here).
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MAX_LENGTH_LIMIT = 8192
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BundleError(UserError):
    """The bundle is missing a file, was modified, or does not fit together."""


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """router.json (format above), typed. Built by export as a draft (no `files` nor `manifest_sha256`:
    write_bundle adds them) or loaded, validated, by `read`, `read_file` or `from_json`."""

    labels: tuple[str, ...]
    max_length: int
    model_file: str
    inputs: tuple[str, ...]
    decision: dict
    output: str = "logits"
    reward_output: str = "rewards"
    opset: int | None = None
    quantization: dict | None = None
    costs: dict | None = None
    provenance: dict | None = None
    parity: dict | None = None
    evaluation: dict | None = None
    files: dict = field(default_factory=dict)
    manifest_sha256: str | None = None
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)    # keys this zooter does not read, kept: the checksum covers them

    # Keys a bundle may lack (written only when set); every other key is always written, as export always has.
    _OPTIONAL = ("opset", "quantization", "provenance", "parity", "evaluation", "manifest_sha256")

    def to_json(self) -> dict:
        """The JSON object router.json holds, keys in the order export writes them."""
        order = ("format_version", "labels", "max_length", "model_file", "inputs", "output", "reward_output", "opset",
                 "quantization", "costs", "decision", "provenance", "parity", "evaluation", "files", "manifest_sha256")
        obj = {}
        for key in order:
            value = getattr(self, key)
            if value is None and key in self._OPTIONAL:
                continue
            obj[key] = list(value) if isinstance(value, tuple) else value
        return {**obj, **self.extra}

    @classmethod
    def from_json(cls, obj, where: str = MANIFEST) -> "Manifest":
        """A router.json object, validated (validate_manifest: a BundleError names the first bad key)."""
        validate_manifest(obj, where)
        return cls.draft(obj)

    @classmethod
    def draft(cls, obj: dict) -> "Manifest":
        """The typed view of a router.json object, unchecked: for one built in memory (export's, before
        write_bundle validates it; a caller's edit of a loaded one). Files on disk go through from_json."""
        if isinstance(obj, Manifest):
            return obj
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: (tuple(v) if k in ("labels", "inputs") else v) for k, v in obj.items() if k in known}
        return cls(**values, extra={k: v for k, v in obj.items() if k not in known})

    @classmethod
    def read_file(cls, path: str | Path) -> "Manifest":
        """A router.json file on its own (the files it lists are not looked at)."""
        path = Path(path)
        try:
            if not path.is_file():
                raise BundleError(f"{path}: missing file (not a zooter bundle?)")
            text = path.read_bytes().decode("utf-8")
        except PermissionError:
            raise BundleError(f"{path.parent}: permission denied (cannot read the bundle)") from None
        except UnicodeDecodeError:
            raise BundleError(f"{path}: not valid UTF-8") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise BundleError(f"{path}: invalid JSON: {json_error(err)}") from None
        return cls.from_json(obj, str(path))

    @classmethod
    def read(cls, bundle: str | Path, verify: bool = True) -> "Manifest":
        """A bundle folder's router.json, validated, with every listed file present; with `verify`, each
        checked against its sha256."""
        bundle = Path(bundle)
        try:
            if not bundle.is_dir():
                raise BundleError(f"{bundle}: no such bundle folder")
        except PermissionError:
            raise BundleError(f"{bundle}: permission denied (cannot read the bundle)") from None
        manifest = cls.read_file(bundle / MANIFEST)
        for name, entry in manifest.files.items():
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

    @property
    def router_id(self) -> str:
        """The name every answer gives of the router that chose it: the first 12 hex of the manifest's sha256."""
        return str(self.manifest_sha256)[:12]

    @property
    def size(self) -> int:
        """Bytes of the bundle's files (router.json aside)."""
        return sum(entry["bytes"] for entry in self.files.values())

    @property
    def token_inputs(self) -> list[str]:
        """The model's token inputs, in TOKEN_INPUTS order."""
        return [name for name in TOKEN_INPUTS if name in self.inputs]

    def rule(self, lam: float | None = None, tolerance: float | None = None):
        """The decision rule it ships (zooter.runtime.decision.Rule); lam/tolerance override its defaults."""
        from zooter.runtime.decision import Rule, unit_prices

        return Rule.of(self.labels, self.decision, unit_prices(self.costs, self.labels), lam, tolerance)


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest without its own checksum, as canonical JSON (sorted keys, no spaces)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encoder_identity(manifest: Manifest) -> dict:
    """What a bundle's encoder is, for swapping routers in service (a router with new candidates keeps it):
    the tokenizer's checksum, max_length and the backbone it was trained from, cut to its layers."""
    provenance = manifest.provenance or {}
    config = provenance.get("config") or {}
    return {"tokenizer.json": (manifest.files.get("tokenizer.json") or {}).get("sha256"),
            "max_length": manifest.max_length, "backbone": provenance.get("backbone"), "layers": config.get("layers"),
            "frozen": provenance.get("frozen")}


def swap_problem(old: Manifest, new: Manifest) -> str | None:
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
    """router.json of a bundle as its JSON object, loaded and validated by Manifest.read."""
    return Manifest.read(bundle, verify).to_json()


def write_bundle(out: str | Path, files: dict[str, Path], manifest: Manifest | dict, force: bool = False) -> Manifest:
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
        obj = replace(Manifest.draft(manifest), format_version=FORMAT_VERSION, files=entries, manifest_sha256=None).to_json()
        obj["manifest_sha256"] = manifest_digest(obj)
        manifest = Manifest.from_json(obj, f"{out}/{MANIFEST}")
        (staging / MANIFEST).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
