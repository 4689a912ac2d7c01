"""The cluster shape on loopback, shared by tests/test_topology.py and demo/47-topology.sh: which candidates get
the two stand-in tritonservers, and how each is started (not started here: the caller starts, kills, restarts)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def by_routed_share(router, texts: Sequence[str]) -> list[str]:
    """The router's labels, the one it picks most often for `texts` first (ties in label order)."""
    counts = {label: 0 for label in router.labels}
    for text in texts:
        counts[router.route(text).candidate] += 1
    return sorted(router.labels, key=lambda n: -counts[n])


def standin_server(repo: str | Path, label: str, log_file: str | Path, **ports):
    """A TritonServer (model control on) on a stand-in repository that loads only the shared stand-in LLM and `label`'s
    stand-in; `ports` (http_port, grpc_port, metrics_port) restart one where it was."""
    from zooter.export.triton_repo import model_name_for
    from zooter.servers.tritonserver import TritonServer

    return TritonServer(repo, model_control=True, load_models=["zooter_standin_llm", model_name_for(label)],
                        log_file=log_file, **ports)
