"""The candidates file (YAML): which LLMs the router chooses between, what they cost, how to reach them.

    - name: gemma-2-9b-it
      cost: {input_per_mtok: 0.10, output_per_mtok: 0.10}     # USD per million tokens; optional
      serve: {triton_model: gemma_2_9b, triton_url: localhost:8001}   # TensorRT-LLM ensemble I/O
    - name: gpt-4o
      serve: {openai_base_url: http://localhost:8000/v1, model: gpt-4o}   # OpenAI-compatible

`serve` keys: triton_model (+ optional triton_url, protocol, io: llmapi | ensemble, which the model's
metadata tells unless both fit) or openai_base_url (+ optional model, api_key_env; io: openai);
max_concurrency for either. An unknown key, a URL of the wrong form or an unknown io is an error when
the file is read. A candidate with no serve entry can be routed to and evaluated, not called.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from zooter.runtime.errors import UserError
from zooter.runtime.files import json_error


class CandidatesError(UserError):
    pass


@dataclass
class Cost:
    """USD per million tokens in and out; the rule's one price of it is zooter.runtime.decision.unit_price."""

    input_per_mtok: float
    output_per_mtok: float

    def of(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


@dataclass
class Candidate:
    name: str
    cost: Cost | None = None
    serve: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        obj: dict = {"name": self.name}
        if self.cost is not None:
            obj["cost"] = {"input_per_mtok": self.cost.input_per_mtok, "output_per_mtok": self.cost.output_per_mtok}
        if self.serve:
            obj["serve"] = dict(self.serve)
        return obj


def _price(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise CandidatesError(f"{where}: expected a non-negative number, got {value!r}")
    return float(value)


def parse_candidates(items, source: str = "<candidates>") -> list[Candidate]:
    if not isinstance(items, list) or not items:
        raise CandidatesError(f"{source}: expected a non-empty list of candidates")
    out, seen = [], set()
    for i, item in enumerate(items):
        where = f"{source}: candidate #{i + 1}"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise CandidatesError(f"{where}: each candidate needs a non-empty 'name'")
        name = item["name"]
        if name in seen:
            raise CandidatesError(f"{where}: duplicate name {name!r}")
        seen.add(name)
        cost = None
        if item.get("cost") is not None:
            c = item["cost"]
            if not isinstance(c, dict):
                raise CandidatesError(f"{where} ({name}): 'cost' must be {{input_per_mtok, output_per_mtok}}")
            cost = Cost(_price(c.get("input_per_mtok"), f"{where} ({name}) cost.input_per_mtok"),
                        _price(c.get("output_per_mtok"), f"{where} ({name}) cost.output_per_mtok"))
        serve = item.get("serve") or {}
        if not isinstance(serve, dict):
            raise CandidatesError(f"{where} ({name}): 'serve' must be a mapping")
        check_serve(serve, f"{where} ({name}) serve")
        out.append(Candidate(name, cost, dict(serve)))
    return out


SERVE_KEYS = {"triton_model", "triton_url", "protocol", "io", "openai_base_url", "model", "api_key_env", "max_concurrency"}


def check_serve(serve: dict, where: str) -> None:
    """A `serve` entry's form: known keys, one way to reach the candidate, URLs and io that can work."""
    from zooter.runtime.candidate_io import IOS, OPENAI

    unknown = sorted(set(map(str, serve)) - SERVE_KEYS)
    if unknown:
        raise CandidatesError(f"{where}: unknown key(s) {unknown}; known: {sorted(SERVE_KEYS)}")
    if serve.get("triton_model") and serve.get("openai_base_url"):
        raise CandidatesError(f"{where}: give triton_model or openai_base_url, not both")
    url = serve.get("openai_base_url")
    if url is not None and (not isinstance(url, str) or not url.startswith(("http://", "https://"))
                            or not url.split("://", 1)[1].strip("/")):
        raise CandidatesError(f"{where}: openai_base_url must start with http:// or https:// and name a host "
                              f"(http://host:port/v1), got {url!r}")
    url = serve.get("triton_url")
    if url is not None:
        address = str(url).split("://", 1)[-1].rstrip("/")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or "/" in address or not 0 < int(port) < 65536:
            raise CandidatesError(f"{where}: triton_url must be host:port (or grpc://host:port, http://host:port), got {url!r}")
    io = serve.get("io")
    if io is not None:
        if io not in IOS:
            raise CandidatesError(f"{where}: io must be one of {', '.join(IOS)}, got {io!r}")
        if (io == OPENAI) != bool(serve.get("openai_base_url")):
            raise CandidatesError(f"{where}: io {io} goes with {'openai_base_url' if io == OPENAI else 'triton_model'}")


def load_candidates(path: str | Path) -> list[Candidate]:
    import yaml

    from zooter.runtime.files import read_text

    path = Path(path)
    try:
        items = yaml.safe_load(read_text(path, "candidates file"))
    except yaml.YAMLError as err:
        raise CandidatesError(f"{path}: invalid YAML{_yaml_where(err)}") from None
    return parse_candidates(items, str(path))


def _yaml_where(err) -> str:
    """' at line L, column C: what' on one line (PyYAML's own message spans three, with a source excerpt)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = " ".join((getattr(err, "problem", None) or str(err)).split())
    context = getattr(err, "context", None)
    return f"{where}: {what}" + (f" ({context})" if context else "")


def save_candidates(candidates: Sequence[Candidate], path: str | Path) -> None:
    import yaml

    from zooter.runtime.files import write_text_atomic

    write_text_atomic(yaml.safe_dump([c.to_json() for c in candidates], sort_keys=False), path)


@dataclass
class OpenAIEndpoint:
    """Where and how to call a candidate served over an OpenAI-compatible API (its `serve` entry)."""

    base_url: str              # without a trailing slash, e.g. http://host:8000/v1
    model: str                 # the model name the upstream expects
    api_key: str | None        # read from serve.api_key_env; never printed

    def headers(self) -> dict[str, str]:
        out = {"content-type": "application/json"}
        if self.api_key:
            out["authorization"] = f"Bearer {self.api_key}"
        return out


def openai_endpoint(name: str, serve: dict) -> OpenAIEndpoint:
    """The endpoint of a candidate's `serve: {openai_base_url, model?, api_key_env?}`; a UserError names
    what is wrong (a URL without http(s)://, a key variable that is not set)."""
    import os

    base = str(serve["openai_base_url"]).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise CandidatesError(f"candidate {name!r}: openai_base_url must start with http:// or https://, got {base!r}")
    key = None
    if serve.get("api_key_env"):
        key = os.environ.get(str(serve["api_key_env"]))
        if not key:
            raise CandidatesError(f"candidate {name!r}: api_key_env {serve['api_key_env']} is not set in the environment")
    return OpenAIEndpoint(base, str(serve.get("model") or name), key)


def costs_for(candidates: Sequence[Candidate], labels: Sequence[str]) -> dict[str, Cost] | None:
    """Costs in label order; None when any label has no price (then nothing is cost-aware)."""
    by_name = {c.name: c for c in candidates}
    missing = [name for name in labels if name not in by_name]
    if missing:
        raise CandidatesError(f"candidates file has no entry for {missing}")
    if any(by_name[name].cost is None for name in labels):
        return None
    return {name: by_name[name].cost for name in labels}


def from_prices(path: str | Path) -> list[Candidate]:
    """The LLMRouter price list (`llm_candidates.json`: {model: {input_price, output_price, ...}})."""
    path = Path(path)
    if not path.is_file():
        raise CandidatesError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CandidatesError(f"{path}: invalid JSON: {json_error(err)}") from None
    if not isinstance(data, dict):
        raise CandidatesError(f"{path}: expected an object {{model: {{input_price, output_price}}}}")
    out = []
    for name, info in data.items():
        if not isinstance(info, dict) or "input_price" not in info or "output_price" not in info:
            raise CandidatesError(f"{path}: model {name!r} lacks input_price/output_price")
        out.append(Candidate(name, Cost(_price(info["input_price"], f"{path}: {name}.input_price"),
                                        _price(info["output_price"], f"{path}: {name}.output_price"))))
    return out
