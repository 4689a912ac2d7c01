"""The in-process Router as the python-backend models run it: `zooter_route`, and `zooter` on CPU repositories.

Both load the bundle in their own version folder (router.json, the ONNX file, tokenizer.json), with the
repository's cost knobs (routing.json) and the `intra_op_threads` parameter, so a query is routed in the
stub exactly as in an app. Two sessions: a lone request gets `intra_op_threads` onnxruntime threads (fastest
when the server is idle); when requests pile up every core already runs one, and one thread each does the
same work with less contention (docs/triton.md, "What each lever gave"). The same answers to the bit either
way (tests/test_runtime.py::test_thread_count_does_not_change_an_answer).

No pb_utils here: the per-request knobs arrive as numpy arrays, whatever input names a model gives them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from zooter.runtime.candidate_io import text
from zooter.runtime.router import Router
from zooter.runtime.routing import RoutingConfig

# A knob's input name on zooter_route -> its Router.route argument.
KNOB_ARGS = {"lambda": "lam", "tolerance": "tolerance", "candidates": "candidates"}


class StubRouter:
    """`router` for a lone request, `busy` (one onnxruntime thread) when others are being routed too."""

    def __init__(self, folder: str | Path, routing: RoutingConfig, intra_op_threads: str | int | None):
        threads = int(intra_op_threads or 0) or None
        self.router = Router.load(folder, providers=["CPUExecutionProvider"], threads=threads,
                                  lam=routing.lam, tolerance=routing.tolerance)
        self.busy = self.router if threads == 1 else Router.load(
            folder, providers=["CPUExecutionProvider"], threads=1, lam=routing.lam, tolerance=routing.tolerance)
        # Every answer names the router that chose it (`zooter triton reload` serves a new bundle as a new version).
        self.router_id = self.router.router_id

    def pick(self, busy: bool) -> Router:
        return self.busy if busy else self.router


def knobs(arrays: dict) -> dict:
    """Router.route's knobs from {zooter_route input name: its rows (n, k) array} of the ones a request sent.
    ValueError names a knob whose rows differ, or that is not one number a row."""
    out = {}
    for name, rows in arrays.items():
        rows = np.asarray(rows)
        rows = rows.reshape(rows.shape[0], -1) if rows.ndim else rows.reshape(1, 1)
        if any(not np.array_equal(row, rows[0]) for row in rows[1:]):
            raise ValueError(f"{name} differs between the rows of one request; send one value for all")
        if name == "candidates":
            out[KNOB_ARGS[name]] = [x for x in dict.fromkeys(text([v]) for v in rows[0]) if x]
        elif rows[0].size != 1:
            raise ValueError(f"{name}: one number per row, got {rows[0].size}")
        else:
            out[KNOB_ARGS[name]] = float(rows[0][0])
    return out
