"""Triton's zooter_route with dynamic batching on decides every query as Router.route does in
process (issue 20), for the tiny INT8 bundle whose padded batches change answers: requests of many
rows of mixed lengths, and single-row requests from many clients at once that the dynamic batcher
gathers into one execute()."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from test_batch_invariance import MIXED


def as_served(d) -> dict:
    """An in-process Decision as zooter_route answers it (its numbers travel as float32)."""
    f32 = lambda v: float(np.float32(v))  # noqa: E731
    return {"candidate": d.candidate, "expected_reward": f32(d.expected_reward), "confidence": f32(d.confidence),
            "expected_rewards": {k: f32(v) for k, v in d.expected_rewards.items()},
            "probabilities": {k: f32(v) for k, v in d.probabilities.items()}, "ranking": d.ranking}


def test_an_onnxruntime_backend_repository_refuses_a_dynamic_int8_bundle(bundles, tmp_path):
    """Triton's onnxruntime backend runs the rows of a request as one padded tensor: an INT8 bundle
    there would decide by batch, so the builder says so and names the ways out."""
    from zooter.export.triton_repo import build_repository
    from zooter.runtime.errors import UserError

    with pytest.raises(UserError, match="depend on its batch companions.*--router-backend python"):
        build_repository(bundles["int8"], tmp_path / "ort", router_backend="onnxruntime")
    assert not (tmp_path / "ort").exists()
    build_repository(bundles["fp32"], tmp_path / "ort", router_backend="onnxruntime")   # fp32 is allowed


@pytest.mark.triton
@pytest.mark.slow
def test_zooter_route_with_dynamic_batching_equals_route_in_process(bundles, tmp_path):
    from triton_helpers import tritonserver
    from zooter.export.triton_repo import build_repository
    from zooter.runtime.router import Router
    from zooter.serving.triton_client import connect, route_rows

    built = build_repository(bundles["int8"], tmp_path / "repo")
    router = Router.load(bundles["int8"])
    expected = {q: as_served(router.route(q)) for q in MIXED}
    # Leaving it removes the server's working folder in /tmp.
    with tritonserver(built.path, model_control=True, load_models=("zooter_route",)) as server:
        def ask(texts):
            client, module = connect(server.http_url)
            try:
                return route_rows(client, module, texts)
            finally:
                client.close()

        # Requests of many rows, short queries beside ones 10x longer.
        for size in (8, 32):
            for start in range(0, len(MIXED), size):
                part = MIXED[start:start + size]
                assert ask(part) == [expected[q] for q in part], f"rows {start}.. in requests of {size}"
        # Many clients at once, single rows and small requests: the dynamic batcher gathers them.
        work = [MIXED[i:i + 1] for i in range(len(MIXED))] + [MIXED[i:i + 3] for i in range(0, len(MIXED), 3)]
        with ThreadPoolExecutor(8) as pool:
            for texts, got in zip(work * 2, pool.map(ask, work * 2)):
                assert got == [expected[q] for q in texts]
        assert server.stop() == 0, server.log_tail()
