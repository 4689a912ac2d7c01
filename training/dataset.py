"""The routing-data contract: one JSON object a line, validated with the file, line and reason.

    {"id": str, "query": str, "rewards": {candidate: float or null}, "tags": [str],
     "responses": {candidate: str} (optional), "source": str}

A null reward means "not scored": it stays NaN in the reward matrix and is masked
everywhere downstream, never read as zero. A reward is a finite number within +-REWARD_LIMIT.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from zooter.runtime.errors import DataError
from zooter.runtime.files import read_jsonl, write_jsonl_atomic

__all__ = ["DataError", "REWARD_LIMIT", "Row", "RoutingDataset", "parse_row", "read_jsonl"]

# Rewards become softmax(r / tau), and calibration squares their errors: past about 1e154 the squares
# overflow to inf and every figure turns into inf or nan. Real scales (a [0, 1] metric, a reward
# model's logits, a 1-10 judge, 0-100 points) stay far below 1e6, so a larger value is a unit
# mistake or a sentinel such as 1e308, refused rather than trained on.
REWARD_LIMIT = 1e6


@dataclass
class Row:
    id: str
    query: str
    rewards: dict[str, float | None]
    tags: list[str] = field(default_factory=list)
    responses: dict[str, str] | None = None
    source: str = ""

    def to_json(self) -> dict:
        obj = {"id": self.id, "query": self.query, "rewards": self.rewards, "tags": self.tags}
        if self.responses is not None:
            obj["responses"] = self.responses
        obj["source"] = self.source
        return obj


def _reward(value, path, line, name) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(path, line, f"reward for {name!r} is {value!r}, expected a number or null")
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(path, line, f"reward for {name!r} is {value}, rewards must be finite (use null for 'not scored')")
    if abs(value) > REWARD_LIMIT:   # compared before float(): an integer can be too large for a float
        try:
            shown = repr(float(value))
        except OverflowError:
            shown = "beyond a float's range"
        raise DataError(path, line, f"reward for {name!r} is {shown}, outside the accepted range "
                        f"[-{REWARD_LIMIT:g}, {REWARD_LIMIT:g}]; rescale the rewards (docs/data.md)")
    return float(value)


def required(obj: dict, key: str, kind: type, problem: str, path: str | Path, line: int | None):
    """obj[key] when it is a `kind` with something in it (a str with text, a non-empty dict), else a
    DataError saying `problem`: the one check of a record's query and rewards, here and in the importers."""
    value = obj.get(key)
    if not isinstance(value, kind) or not (value.strip() if isinstance(value, str) else value):
        raise DataError(path, line, problem)
    return value


def parse_row(obj, path: str | Path = "<data>", line: int | None = None) -> Row:
    """Check one decoded JSON object against the contract (candidate membership is checked by the dataset)."""
    if not isinstance(obj, dict):
        raise DataError(path, line, f"expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    if not isinstance(rid, str) or not rid:
        raise DataError(path, line, "'id' must be a non-empty string")
    query = required(obj, "query", str, f"row {rid!r}: empty query", path, line)
    rewards = required(obj, "rewards", dict, f"row {rid!r}: 'rewards' must be a non-empty object {{candidate: number or null}}",
                       path, line)
    rewards = {str(k): _reward(v, path, line, k) for k, v in rewards.items()}
    if all(v is None for v in rewards.values()):
        raise DataError(path, line, f"row {rid!r}: every reward is null, nothing to learn from")
    tags = obj.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise DataError(path, line, f"row {rid!r}: 'tags' must be a list of strings")
    responses = obj.get("responses")
    if responses is not None and (
        not isinstance(responses, dict) or not all(isinstance(v, str) for v in responses.values())
    ):
        raise DataError(path, line, f"row {rid!r}: 'responses' must be an object {{candidate: string}}")
    source = obj.get("source", "")
    if not isinstance(source, str):
        raise DataError(path, line, f"row {rid!r}: 'source' must be a string")
    return Row(rid, query, rewards, list(tags), dict(responses) if responses is not None else None, source)


class RoutingDataset:
    """Rows plus the ordered candidate list; `rewards()` is the (rows x candidates) matrix with NaN for null."""

    def __init__(self, rows: Sequence[Row], candidates: Sequence[str] | None = None, path: str | Path = "<data>"):
        self.rows = list(rows)
        self.path = str(path)
        if candidates is None:
            seen: dict[str, None] = {}
            for row in self.rows:
                for name in row.rewards:
                    seen.setdefault(name, None)
            candidates = list(seen)
        self.candidates = list(candidates)
        self._validate()

    def _validate(self) -> None:
        if len(self.candidates) < 2:
            raise DataError(self.path, None, f"found {len(self.candidates)} candidate(s) {self.candidates}; routing needs at least 2")
        known = set(self.candidates)
        ids: dict[str, int] = {}
        for i, row in enumerate(self.rows, start=1):
            line = getattr(row, "_line", i)
            if row.id in ids:
                raise DataError(self.path, line, f"duplicate id {row.id!r} (first seen on line {ids[row.id]})")
            ids[row.id] = line
            unknown = [name for name in row.rewards if name not in known]
            if unknown:
                raise DataError(self.path, line, f"row {row.id!r}: reward for candidate(s) {unknown} not in the candidate list {self.candidates}")

    # --- I/O -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, candidates: Sequence[str] | None = None) -> "RoutingDataset":
        rows = []
        for lineno, obj in read_jsonl(path, "routing-data file"):
            row = parse_row(obj, path, lineno)
            row._line = lineno  # for error messages raised by dataset-level checks
            rows.append(row)
        if not rows:
            raise DataError(path, None, "no rows")
        return cls(rows, candidates, path)

    def save(self, path: str | Path) -> None:
        write_jsonl_atomic((row.to_json() for row in self.rows), path)

    # --- views -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    @property
    def queries(self) -> list[str]:
        return [row.query for row in self.rows]

    def rewards(self) -> np.ndarray:
        """(rows, candidates) float64 matrix; NaN where a reward is null or absent."""
        matrix = np.full((len(self.rows), len(self.candidates)), np.nan)
        col = {name: j for j, name in enumerate(self.candidates)}
        for i, row in enumerate(self.rows):
            for name, value in row.rewards.items():
                if value is not None:
                    matrix[i, col[name]] = value
        return matrix

    def subset(self, indices: Iterable[int]) -> "RoutingDataset":
        return RoutingDataset([self.rows[i] for i in indices], self.candidates, self.path)

    def sha256(self) -> str:
        """Hash of the canonical content: provenance for runs and bundles."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.candidates).encode())
        for row in self.rows:
            digest.update(json.dumps(row.to_json(), sort_keys=True, ensure_ascii=False).encode())
        return digest.hexdigest()
