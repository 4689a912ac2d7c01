"""Query files and query ids: the one reader every command uses for "a file of queries".

Accepted layouts (the first non-blank character decides):
    one query a line                      plain text; a repeated line is skipped and counted
    JSON lines  {...}                     routing data, MT-Bench question.jsonl, prompt files
    a JSON list [{...}, ...]
In an object the text is the first of "query", "prompt", "instruction", "text", or "turns"[0]
(MT-Bench: route on the first turn); the id is "id" or "question_id", else `text_id(text)`; tags are
"tags", else ["category"] when there is one. Every bad line is reported as FILE:LINE: reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from zooter.runtime.errors import DataError
from zooter.runtime.files import json_error, lines_of, read_jsonl, read_text

TEXT_KEYS = ("query", "prompt", "instruction", "text")


def text_id(text: str, prefix: str = "q") -> str:
    """A stable id for a text: the same text always gets the same id (re-imports and re-runs agree)."""
    return f"{prefix}-{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"


@dataclass
class Query:
    id: str
    text: str
    tags: list[str] = field(default_factory=list)
    line: int | None = None


def query_from_object(obj, path: str | Path = "<queries>", line: int | None = None) -> Query:
    if not isinstance(obj, dict):
        raise DataError(path, line, f"expected a JSON object, got {type(obj).__name__}")
    text = next((obj[k] for k in TEXT_KEYS if obj.get(k) is not None), None)
    if text is None and isinstance(obj.get("turns"), list) and obj["turns"]:
        text = obj["turns"][0]
    if not isinstance(text, str) or not text.strip():
        raise DataError(path, line, "no query: expected a non-empty 'query' (or 'prompt', 'instruction', 'text', 'turns'[0])")
    rid = obj.get("id", obj.get("question_id"))
    rid = text_id(text) if rid is None else str(rid)
    tags = obj.get("tags")
    if tags is None:
        tags = [str(obj["category"])] if obj.get("category") else []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise DataError(path, line, f"query {rid!r}: 'tags' must be a list of strings")
    return Query(rid, text, list(tags), line)


def read_queries(path: str | Path) -> tuple[list[Query], int]:
    """(queries, repeated plain-text lines skipped) from any accepted layout; ids must be unique."""
    text = read_text(path, "queries file")
    stripped = text.lstrip()
    out: list[Query] = []
    skipped = 0
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(path, err.lineno, f"invalid JSON: {json_error(err, line=False)}") from None
        out = [query_from_object(obj, path, None) for obj in items]
    elif stripped.startswith("{"):
        out = [query_from_object(obj, path, lineno) for lineno, obj in read_jsonl(path, "queries file")]
    else:
        seen = set()
        for lineno, line in enumerate(lines_of(text), start=1):
            line = line.strip()
            if not line:
                continue
            if line in seen:
                skipped += 1
                continue
            seen.add(line)
            out.append(Query(text_id(line), line, [], lineno))
    ids: dict[str, int | None] = {}
    for query in out:
        try:
            query.text.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(path, query.line, "holds an escaped lone surrogate (such as \\udcff): not valid Unicode text") from None
        if query.id in ids:
            raise DataError(path, query.line, f"duplicate id {query.id!r} (first seen on line {ids[query.id]})")
        ids[query.id] = query.line
    if not out:
        raise DataError(path, None, "no queries")
    return out, skipped


def read_query_texts(path: str | Path) -> list[str]:
    """The texts of a queries file (any layout above), for commands that need only the texts."""
    return [q.text for q in read_queries(path)[0]]
