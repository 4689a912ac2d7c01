"""Importers: public routing data -> the routing-data contract (training/dataset.py).

alpaca-eval  AlpacaEval results: SRC/results/<model>/weighted_alpaca_eval_gpt4_turbo/annotations.json,
             reward = preference - 1 (the judge's probability that the model beats the reference).
scores       a JSON list of {"question", "scores": {model: float}, "cluster_id"?, "task"?, "tags"?}
             (LLMRouter's dcrouter format).
jsonl        the contract itself, validated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from zooter.runtime.errors import DataError, UserError
from zooter.runtime.files import json_error, read_text
from zooter.runtime.queries import text_id
from zooter.training.dataset import RoutingDataset, Row, parse_row, required

ALPACA_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"


def _load_json(path: Path):
    try:
        obj = json.loads(read_text(path, "JSON file"))
    except json.JSONDecodeError as err:
        raise DataError(path, err.lineno, f"invalid JSON: {json_error(err, line=False)}") from None
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(path, None, "holds an escaped lone surrogate (such as \\udcff): not valid Unicode text") from None
    return obj


def _preference_reward(value, path: Path, index: int) -> float | None:
    if value is None or value == "":
        return None
    try:
        reward = float(value) - 1.0
    except (TypeError, ValueError):
        raise DataError(path, None, f"record {index}: preference {value!r} is not a number") from None
    if not 0.0 <= reward <= 1.0:
        raise DataError(path, None, f"record {index}: preference {value!r} outside [1, 2]")
    return reward


def alpaca_eval_models(src: str | Path) -> list[str]:
    results = Path(src) / "results"
    if not results.is_dir():
        raise UserError(f"{src}: expected the AlpacaEval layout with a results/ folder")
    return sorted(p.parent.parent.name for p in results.glob(f"*/{ALPACA_ANNOTATOR}/annotations.json"))


def import_alpaca_eval(src: str | Path, models: Sequence[str] | None = None) -> RoutingDataset:
    """One row per instruction; instructions are matched across models by exact text."""
    src = Path(src)
    available = alpaca_eval_models(src)
    models = list(models) if models else available
    missing = [m for m in models if m not in available]
    if missing:
        raise UserError(f"{src}: no {ALPACA_ANNOTATOR} annotations for {missing}; available: {available}")
    if len(models) < 2:
        raise UserError(f"routing needs at least 2 models, got {models}")
    by_text: dict[str, Row] = {}
    for model in models:
        path = src / "results" / model / ALPACA_ANNOTATOR / "annotations.json"
        records = _load_json(path)
        if not isinstance(records, list):
            raise DataError(path, None, "expected a JSON list of annotation records")
        for i, rec in enumerate(records):
            text = rec.get("instruction")
            if not isinstance(text, str) or not text.strip():
                raise DataError(path, None, f"record {i}: missing instruction")
            row = by_text.get(text)
            if row is None:
                row = by_text[text] = Row(text_id(text, "alpaca"), text, {}, [], {}, "alpaca_eval")
            if model in row.rewards:
                continue  # the same instruction twice in one file: keep the first judgement
            row.rewards[model] = _preference_reward(rec.get("preference"), path, i)
            if isinstance(rec.get("output_2"), str):
                row.responses[model] = rec["output_2"]
            tag = rec.get("dataset")
            if isinstance(tag, str) and tag and tag not in row.tags:
                row.tags.append(tag)
    rows = [r for r in by_text.values() if any(v is not None for v in r.rewards.values())]
    return RoutingDataset(rows, models, src)


def import_scores(src: str | Path) -> RoutingDataset:
    src = Path(src)
    records = _load_json(src)
    if not isinstance(records, list):
        raise DataError(src, None, "expected a JSON list of {question, scores}")
    rows, seen = [], {}
    candidates: dict[str, None] = {}
    for i, rec in enumerate(records):
        where = f"record {i}"
        if not isinstance(rec, dict):
            raise DataError(src, None, f"{where}: expected an object")
        text = required(rec, "question", str, f"{where}: empty question", src, None)
        scores = required(rec, "scores", dict, f"{where}: 'scores' must be a non-empty object {{model: number}}", src, None)
        tags = [str(t) for t in rec.get("tags", []) or []]
        if rec.get("cluster_id") is not None:
            tags.append(f"cluster:{rec['cluster_id']}")
        if rec.get("task"):
            tags.append(f"task:{rec['task']}")
        rid = text_id(text, "q")
        if rid in seen:
            # The same question twice: a second id keeps both, the split keeps them together.
            seen[rid] += 1
            rid = f"{rid}-{seen[rid]}"
        else:
            seen[rid] = 0
        obj = {"id": rid, "query": text, "rewards": scores, "tags": tags, "source": str(rec.get("task") or src.stem)}
        try:
            row = parse_row(obj, src, None)
        except DataError as err:
            raise DataError(src, None, f"{where}: {err.reason}") from None
        for name in row.rewards:
            candidates.setdefault(name, None)
        rows.append(row)
    return RoutingDataset(rows, list(candidates), src)


def import_jsonl(src: str | Path, candidates: Sequence[str] | None = None) -> RoutingDataset:
    return RoutingDataset.load(src, candidates)

