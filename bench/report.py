"""The one report type every bench writes: cells of latency percentiles, looked up, printed and saved alike.

A bench report is a dict (it is saved as JSON as it is): its `cells` each hold the percentiles of one
(engine, setting) measurement beside the keys that name it. Here live the pieces every bench shares:
the percentiles of a list of latencies, the lookup of a cell's figure by the keys that name it, a
fixed-width table printer, the atomic JSON write, and the reader of Prometheus' text format (Triton's
and the gateway's /metrics), which the tests use too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from zooter.runtime.files import write_text_atomic


def percentiles(ms: Sequence[float], batch: int = 1, cpu_ms: Sequence[float] | None = None) -> dict:
    """Latency percentiles (ms) of calls that each answered `batch` queries, and their throughput."""
    a = np.asarray(ms, dtype=np.float64)
    out = {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
           "p95_ms": float(np.percentile(a, 95)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()),
           "qps": float(batch * 1000 / a.mean())}
    if cpu_ms is not None:
        # CPU time of this process per call: on a shared machine, close to what the call takes on a
        # core of its own (with one thread); with more threads it sums them.
        out["cpu_p50_ms"] = float(np.percentile(cpu_ms, 50))
    return out


def find_cell(cells: Iterable[dict], **named) -> dict | None:
    """The first cell whose keys equal `named` (engine="triton-http", concurrency=1, ...) and that measured
    something (n > 0, where the cell says), else None."""
    return next((c for c in cells if all(c.get(k) == v for k, v in named.items()) and c.get("n", 1)), None)


def p50(cells: Iterable[dict], **named) -> float | None:
    """p50_ms of the cell `named` picks (see find_cell), None when there is none."""
    cell = find_cell(cells, **named)
    return None if cell is None else cell["p50_ms"]


def write_json(report: dict, path: str | Path) -> None:
    """The report as indented JSON, written whole or not at all (temporary file, then renamed)."""
    write_text_atomic(json.dumps(report, indent=2) + "\n", Path(path))


def publish(report: dict, json_out: str | Path | None, quiet: bool, format_table) -> dict:
    """A bench's last step: the report to `json_out` (when given), its table to stdout (unless quiet); returns it."""
    if json_out:
        write_json(report, json_out)
    if not quiet:
        print(format_table(report))
    return report


@dataclass(frozen=True)
class Column:
    """One column of a fixed-width table: its title, width, alignment ('<' or '>'), the format of its numbers
    (a str value is shown as it is) and what separates it from the column before."""

    title: str
    width: int = 0
    align: str = ">"
    fmt: str = ""
    sep: str = " "


class Table:
    """Fixed-width rows under a title line: `header()` then one `row(*values)` a row."""

    def __init__(self, *columns: Column):
        self.columns = columns

    def header(self) -> str:
        return self._join(c.title for c in self.columns)

    def row(self, *values) -> str:
        cells = []
        for column, value in zip(self.columns, values):
            cells.append(value if isinstance(value, str) else f"{value:{column.fmt}}")
        return self._join(cells)

    def _join(self, texts: Iterable[str]) -> str:
        out = ""
        for i, (column, text) in enumerate(zip(self.columns, texts)):
            out += ("" if i == 0 else column.sep) + f"{text:{column.align}{column.width}}"
        return out


# A sample line of Prometheus' text format: name, optional {labels}, value (timestamps are not used here).
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample in a Prometheus text exposition (comments skipped)."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            labels = {k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
                      for k, v in _LABEL.findall(m.group(2) or "")}
            out.append((m.group(1), labels, float(m.group(3))))
    return out


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there is none)."""
    return sum(value for n, have, value in metric_samples(text)
               if n == name and all(have.get(k) == v for k, v in labels.items()))
