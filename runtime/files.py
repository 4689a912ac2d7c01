"""Reading and writing the project's files so that nothing is lost and every bad input names itself.

- `read_jsonl`: JSON lines, each bad line reported as `FILE:LINE: reason` (invalid UTF-8, invalid
  JSON, a lone surrogate escape such as "\\udcff" that no UTF-8 file can hold).
- `write_jsonl_atomic` / `write_text_atomic`: written beside the target, fsynced, renamed into place,
  so a crash or Ctrl-C leaves the old file or the new one, never half of one.
- `sha256_file`: checksums for bundles and provenance.
- `json_error`: a JSON parse error as a whole phrase with its place (json's own messages stop
  mid-phrase, "Invalid control character at", and lean on the position str(err) appends).
Standard library only: the bottom layer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from zooter.runtime.errors import DataError, UserError


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_error(err: json.JSONDecodeError, line: bool = True) -> str:
    """'Invalid control character at line 2 column 5': json's message completed with where it stopped.
    line=False gives the column only, for a caller that names the file's line itself (JSON lines)."""
    where = f"line {err.lineno} column {err.colno}" if line else f"column {err.colno}"
    return f"{err.msg} {where}" if err.msg.endswith(" at") else f"{err.msg} at {where}"


def open_for_reading(path: str | Path, what: str = "file"):
    """A binary file object, or a DataError that says why it cannot be read (missing, a folder, no permission)."""
    path = Path(path)
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError(path, None, f"no such {what}") from None
    except IsADirectoryError:
        raise DataError(path, None, f"is a folder, expected a {what}") from None
    except PermissionError:
        raise DataError(path, None, "permission denied (cannot read it)") from None


def decode_line(raw: bytes, path: str | Path, line: int | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(path, line, f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})") from None


def read_text(path: str | Path, what: str = "file") -> str:
    """A whole UTF-8 text file; a bad byte is reported with its line."""
    with open_for_reading(path, what) as fh:
        data = fh.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(path, line, f"not valid UTF-8 (byte 0x{data[err.start]:02x})") from None


def lines_of(text: str) -> list[str]:
    """The lines of a text file's contents, split at "\n" only (a trailing "\r" dropped). str.splitlines
    would also split inside a JSON string at characters such as U+0085 or U+2028, which JSON writers
    leave unescaped (dcrouter has queries with U+0085)."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def _no_lone_surrogates(obj, path, line) -> None:
    # json.loads turns "\udcff" into a lone surrogate: a str no UTF-8 file, tokenizer or socket can take.
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(path, line, "holds an escaped lone surrogate (such as \\udcff): not valid Unicode text") from None


def read_jsonl(path: str | Path, what: str = "JSONL file") -> Iterator[tuple[int, object]]:
    """Yield (line number, decoded object) for each non-blank line; a bad line is a DataError naming it."""
    with open_for_reading(path, what) as fh:
        for lineno, raw in enumerate(fh, start=1):
            text = decode_line(raw, path, lineno)
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(path, lineno, f"invalid JSON: {json_error(err, line=False)}") from None
            except ValueError as err:   # "Exceeds the limit (4300 digits) for integer string conversion: ..."
                raise DataError(path, lineno, f"invalid JSON: {str(err).split(':')[0]}") from None
            _no_lone_surrogates(obj, path, lineno)
            yield lineno, obj


def _writable_target(path: Path) -> Path:
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a file name to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _replace(tmp: Path, path: Path, write) -> None:
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl_atomic(rows: Iterable[dict], path: str | Path) -> None:
    """One JSON object a line, fsynced, renamed into place."""
    path = Path(path)

    def write(fh):
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    _replace(_writable_target(path), path, write)


def write_text_atomic(text: str, path: str | Path) -> None:
    path = Path(path)
    _replace(_writable_target(path), path, lambda fh: fh.write(text))
