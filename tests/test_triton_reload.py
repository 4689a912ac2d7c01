"""Swapping the router of a running tritonserver: `zooter triton reload` writes the new bundle as the next
version of zooter_route, and of zooter (which routes in its own stub in a CPU repository), or of the three
steps of the onnxruntime-backend ensemble (then pins the ensemble to it), and loads them through the
repository API; no request is lost, every answer names the router that chose it, and a bundle that does not
fit, or a load Triton refuses, leaves the running router serving. The ensemble's zooter_router runs on a
stand-in for Triton's onnxruntime backend (tests/fake_models/onnxruntime_standin), the rest as built."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import pytest

from zooter.cli import main
from zooter.runtime.bundle import Manifest

CLIENTS, REQUESTS = 32, 500


def rid(bundle) -> str:
    return Manifest.read(bundle).router_id


@pytest.fixture()
def repo(bundles, tmp_path):
    """The int8 router's repository; every candidate is served by `fake_llm` (TensorRT-LLM I/O), in an extra repository."""
    from tiny import LABELS
    from triton_helpers import fake_repository
    from zooter.export.triton_repo import build_repository
    from zooter.serving.candidates import parse_candidates

    fake_repository(tmp_path / "fake", fake_llm="fake_trtllm")
    candidates = parse_candidates([{"name": n, "serve": {"triton_model": "fake_llm"}} for n in LABELS])
    return build_repository(bundles["int8"], tmp_path / "repo", candidates).path


STEPS = ["zooter_tokenize", "zooter_router", "zooter_decide"]


@pytest.fixture(scope="module")
def other_fp32(tiny_backbone, bundles, tmp_path_factory):
    """An fp32 bundle of other heads on the same encoder: what can replace `fp32` in an ensemble (no INT8 there)."""
    from tiny import make_tiny_run

    root = tmp_path_factory.mktemp("other")
    run = make_tiny_run(tiny_backbone, root / "run", seed=2)
    assert main(["export", str(run), "--out", str(root / "fp32"), "--parity-data", str(bundles["parity"]),
                 "--quantize", "none"]) == 0
    return root / "fp32"


@pytest.fixture()
def ensemble(bundles, tmp_path):
    """The fp32 router's onnxruntime-backend repository (tokenize -> router -> decide, the GPU build), its
    zooter_router on the stand-in; every candidate is served by `fake_llm`, in an extra repository."""
    from tiny import LABELS
    from triton_helpers import fake_repository, onnxruntime_standin
    from zooter.export.triton_repo import build_repository
    from zooter.serving.candidates import parse_candidates

    fake_repository(tmp_path / "fake", fake_llm="fake_trtllm")
    candidates = parse_candidates([{"name": n, "serve": {"triton_model": "fake_llm"}} for n in LABELS])
    repo = build_repository(bundles["fp32"], tmp_path / "ort", candidates, router_backend="onnxruntime").path
    onnxruntime_standin(repo)
    return repo


def files(repo) -> list[str]:
    return sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))


def test_an_ensemble_is_refused_a_bundle_its_onnxruntime_config_cannot_run_and_an_unpinned_one_any(ensemble, bundles, capsys):
    """INT8 on the onnxruntime backend would batch queries together (zooter triton build refuses it too); an
    ensemble built before its steps were pinned to one version cannot swap them together. One line each, the
    repository untouched."""
    before = files(ensemble)
    assert main(["triton", "reload", str(ensemble), "--bundle", str(bundles["int8"]), "--triton", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"router {rid(bundles['fp32'])} keeps serving" in err, err
    assert "INT8" in err and "--router-backend python" in err, err
    assert files(ensemble) == before
    config = ensemble / "zooter_route" / "config.pbtxt"
    config.write_text(config.read_text().replace("model_version: 1", "model_version: -1"))
    assert main(["triton", "reload", str(ensemble), "--bundle", str(bundles["fp32"]), "--triton", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not pin its steps" in err and "zooter triton build" in err, err
    assert files(ensemble) == before


def test_an_ensemble_whose_pin_triton_refuses_goes_back_to_its_steps_and_pin(ensemble, bundles, other_fp32, monkeypatch, capsys):
    """The three steps loaded the new router, then Triton refused zooter_route with the new pin: the new version
    folders go, the pin goes back, and the steps are loaded back onto the running router."""
    import zooter.serving.triton_client as triton_client

    loads, pins = [], []
    config = ensemble / "zooter_route" / "config.pbtxt"

    def load_model(url, model, key=None):
        loads.append(model)
        if model == "zooter_route":
            pins.append(sorted(set(re.findall(r"model_version: (\d+)", config.read_text()))))
            raise triton_client.TritonRequestError("load zooter_route: HTTP 400: failed to load 'zooter_route'")

    monkeypatch.setattr(triton_client, "load_model", load_model)
    before, pinned = files(ensemble), config.read_text()
    assert main(["triton", "reload", str(ensemble), "--bundle", str(other_fp32), "--triton", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"did not load router {rid(other_fp32)} into zooter_route" in err, err
    assert f"router {rid(bundles['fp32'])} keeps serving" in err, err
    assert loads == [*STEPS, "zooter_route", *STEPS] and pins == [["2"]]
    assert files(ensemble) == before and config.read_text() == pinned


def test_an_ensemble_reload_triton_did_not_answer_is_not_staged_over(ensemble, bundles, other_fp32, monkeypatch, capsys):
    """No answer to a step's load: Triton may still load it, so its new version stays, the message says what to
    remove; a second reload before that is refused in one line, naming them, and writes nothing."""
    import zooter.serving.triton_client as triton_client

    def load_model(url, model, key=None):
        if model == "zooter_router":
            raise OSError("timed out")

    monkeypatch.setattr(triton_client, "load_model", load_model)
    args = ["triton", "reload", str(ensemble), "--bundle", str(other_fp32), "--triton", "127.0.0.1:9"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no answer from Triton" in err and "remove the new version folders" in err, err
    assert all((ensemble / step / "2").is_dir() for step in STEPS)
    left = files(ensemble)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "left by an earlier reload" in err and str(ensemble / "zooter_tokenize" / "2") in err, err
    assert f"router {rid(bundles['fp32'])} keeps serving" in err, err
    assert files(ensemble) == left


def route(http: httpx.Client, url: str, text: str) -> httpx.Response:
    return http.post(f"http://{url}/v2/models/zooter_route/infer", timeout=300,
                     json={"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [text]}],
                           "outputs": [{"name": "candidate"}, {"name": "router"}]})


def output(response: httpx.Response, name: str) -> str:
    return next(o["data"][0] for o in response.json()["outputs"] if o["name"] == name)


def answered_by(response: httpx.Response) -> str:
    return output(response, "router")


def answer(http: httpx.Client, url: str, text: str) -> httpx.Response:
    """An answer through the `zooter` model (not streamed)."""
    return http.post(f"http://{url}/v2/models/zooter/generate", timeout=300, json={"text_input": text, "max_tokens": 4})


def asked(url: str) -> str:
    """The router the `zooter` model names in its answer."""
    with httpx.Client() as http:
        r = answer(http, url, "what is 2 + 2?")
    assert r.status_code == 200, r.text
    return r.json()["router"]


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("built", ["python", "ensemble"])
def test_reload_swaps_the_router_under_load_and_loses_no_request(built, request, bundles, tmp_path, capsys):
    """python: zooter_route and zooter (the CPU build); ensemble: its three steps, then the pin (the GPU build,
    its router on the onnxruntime stand-in). `zooter` routes in its own stub in the first, asks the ensemble in
    the second."""
    from zooter.runtime.router import Router
    from zooter.servers.tritonserver import TritonServer

    if built == "python":
        repo, before, after = request.getfixturevalue("repo"), bundles["int8"], bundles["fp32"]
        swapped, versioned = "zooter_route version 2, zooter version 2", ["zooter_route", "zooter"]
    else:
        repo, before, after = request.getfixturevalue("ensemble"), bundles["fp32"], request.getfixturevalue("other_fp32")
        swapped, versioned = ", ".join(f"{m} version 2" for m in STEPS) + ", zooter_route pinned to 2", STEPS
    old, new = rid(before), rid(after)
    assert old != new
    server = TritonServer(repo, extra_repositories=[tmp_path / "fake"], model_control=True, http_port=0, grpc_port=0, metrics_port=0,
                          log_file=tmp_path / "server.log")
    key_file = tmp_path / "control.key"
    key_file.write_text(server.control_key + "\n")
    server.start(timeout=300)
    try:
        assert asked(server.http_url) == old
        results, lock, codes, answers = [], threading.Lock(), [], []
        sent_at, reloaded_at = [0.0], [float("inf")]
        reloaded = threading.Event()

        def reload():
            sent_at[0] = time.monotonic()
            codes.append(main(["triton", "reload", str(repo), "--bundle", str(after),
                               "--triton", server.http_url, "--control-key-file", str(key_file)]))
            reloaded_at[0] = time.monotonic()
            reloaded.set()

        reloader = threading.Thread(target=reload)

        def one(i: int, http: httpx.Client):
            if i == REQUESTS // 2:
                reloader.start()
            if i >= REQUESTS * 4 // 5:      # the last fifth after the swap, so both routers answer however slow the load
                assert reloaded.wait(300)
            elif i > REQUESTS // 2:         # the middle spread over a few seconds, so requests are in flight as it swaps
                reloaded.wait(0.03 * (i - REQUESTS // 2))
            text = f"question {i}: what is {i} + {i}?"
            started = time.monotonic()
            if i % 4 == 0:      # a quarter answered through `zooter`
                r = answer(http, server.http_url, text)
                named = r.json()["router"] if r.status_code == 200 else r.text
                chosen = r.json()["candidate"] if r.status_code == 200 else None
            else:
                r = route(http, server.http_url, text)
                named, chosen = (answered_by(r), output(r, "candidate")) if r.status_code == 200 else (r.text, None)
            finished = time.monotonic()
            with lock:
                results.append((started, r.status_code, named, finished))
                if chosen is not None:
                    answers.append((text, named, chosen))

        with httpx.Client(limits=httpx.Limits(max_connections=CLIENTS)) as http, ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(lambda i: one(i, http), range(REQUESTS)))
        reloader.join(300)
        assert codes == [0]
        assert f"router {old} -> {new} ({swapped})" in capsys.readouterr().out

        # The figures docs/triton.md quotes (pytest -s shows them); nothing here is timed.
        print(f"\nreload under load ({built}): {REQUESTS} requests from {CLIENTS} clients, "
              f"{sum(r[1] != 200 for r in results)} failed, {sum(r[2] == old for r in results)} by router {old}, "
              f"{sum(r[2] == new for r in results)} by {new}; the reload took {reloaded_at[0] - sent_at[0]:.2f} s, "
              f"{sum(sent_at[0] <= r[0] <= reloaded_at[0] for r in results)} requests started during it")
        assert len(results) == REQUESTS and [r for r in results if r[1] != 200] == []
        assert {router for _, _, router, _ in results} <= {old, new}
        # Answered before the reload began: the old router; sent after it returned: the new one. (A request
        # sent before may reach Triton after the swap, so its start time decides nothing.)
        assert all(router == old for _, _, router, finished in results if finished < sent_at[0])
        assert all(router == new for started, _, router, _ in results if started > reloaded_at[0])
        assert sum(started > reloaded_at[0] for started, _, _, _ in results) >= REQUESTS // 5
        assert asked(server.http_url) == new
        # Each answer went to (or routed to) the candidate the router it names chose, before and after the swap: in
        # the ensemble, no request mixed one router's steps with the other's.
        routers = {old: Router.load(before), new: Router.load(after)}
        assert {named for _, named, _ in answers} == {old, new}
        assert all(chosen == routers[named].route(text).candidate for text, named, chosen in answers)
        if built == "python":
            metrics = httpx.get(server.metrics_url, timeout=30).text
            assert f'zooter_route_decisions_total{{router="{new}"}}' in metrics
        for model in versioned:
            assert sorted(p.name for p in (repo / model).iterdir()) == ["1", "2", "config.pbtxt"]
    finally:
        server.close()


def test_a_bundle_that_does_not_fit_is_refused_in_one_line_and_nothing_changes(repo, bundles, monkeypatch, capsys):
    import zooter.export.triton_reload as reload

    old = Manifest.read(bundles["int8"])
    before = sorted(p.name for p in (repo / "zooter_route").iterdir())

    def refused(fake: Manifest, *words: str) -> None:
        monkeypatch.setattr(reload, "read_bundle", lambda b: (bundles["fp32"], fake))
        # No server at this address: a refused bundle never gets as far as asking it.
        assert main(["triton", "reload", str(repo), "--bundle", str(bundles["fp32"]), "--triton", "127.0.0.1:9"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"router {rid(bundles['int8'])} keeps serving" in err, err
        assert all(w in err for w in words), err
        assert sorted(p.name for p in (repo / "zooter_route").iterdir()) == before

    refused(replace(old, max_length=old.max_length // 2), "another encoder", "max_length")
    refused(replace(old, labels=old.labels[::-1]), "another label set", "--candidates")
    monkeypatch.undo()
    broken = repo.parent / "broken"
    broken.mkdir()
    (broken / "router.json").write_text("{not json")
    assert main(["triton", "reload", str(repo), "--bundle", str(broken), "--triton", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "router.json" in err, err
    assert sorted(p.name for p in (repo / "zooter_route").iterdir()) == before


def test_a_load_triton_refuses_leaves_every_model_on_the_running_router(repo, bundles, monkeypatch, capsys):
    """zooter_route loaded the new router, then Triton refused it for `zooter`: both new version folders go and
    zooter_route is loaded back onto the old one, so no model answers with a router the others do not have."""
    import zooter.serving.triton_client as triton_client

    loads = []

    def load_model(url, model, key=None):
        loads.append(model)
        if model == "zooter" and loads.count("zooter") == 1:
            raise triton_client.TritonRequestError("load zooter: HTTP 400: failed to load 'zooter' version 2: out of memory")

    monkeypatch.setattr(triton_client, "load_model", load_model)
    before = {m: sorted(p.name for p in (repo / m).iterdir()) for m in ("zooter_route", "zooter")}
    assert main(["triton", "reload", str(repo), "--bundle", str(bundles["fp32"]), "--triton", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"did not load router {rid(bundles['fp32'])} into zooter" in err, err
    assert f"router {rid(bundles['int8'])} keeps serving" in err and "out of memory" in err, err
    assert loads == ["zooter_route", "zooter", "zooter_route"]
    assert {m: sorted(p.name for p in (repo / m).iterdir()) for m in before} == before


@pytest.mark.slow
@pytest.mark.triton
def test_a_zooter_without_its_own_router_asks_zooter_route_and_a_reload_swaps_that(repo, bundles, tmp_path, capsys):
    """A repository built before `zooter` routed in its own stub (no bundle beside its model.py): it asks zooter_route,
    as the onnxruntime ensemble's `zooter` does, and a reload gives zooter_route the new router, which zooter then names."""
    from zooter.servers.tritonserver import TritonServer

    for path in (repo / "zooter" / "1").iterdir():
        if path.name not in ("model.py", "routing.json"):
            path.unlink()
    old, new = rid(bundles["int8"]), rid(bundles["fp32"])
    server = TritonServer(repo, extra_repositories=[tmp_path / "fake"], model_control=True, http_port=0, grpc_port=0,
                          metrics_port=0, log_file=tmp_path / "server.log")
    key_file = tmp_path / "control.key"
    key_file.write_text(server.control_key + "\n")
    server.start(timeout=300)
    try:
        def routed() -> dict:
            """{zooter_route version: requests it answered} of the versions loaded."""
            stats = httpx.get(f"http://{server.http_url}/v2/models/zooter_route/stats", timeout=30).json()
            return {m["version"]: int(m["inference_stats"]["success"]["count"]) for m in stats["model_stats"]}

        assert asked(server.http_url) == old and routed() == {"1": 1}
        assert main(["triton", "reload", str(repo), "--bundle", str(bundles["fp32"]), "--triton", server.http_url,
                     "--control-key-file", str(key_file)]) == 0
        assert f"router {old} -> {new} (zooter_route version 2)" in capsys.readouterr().out
        assert sorted(p.name for p in (repo / "zooter").iterdir()) == ["1", "config.pbtxt"]
        assert asked(server.http_url) == new and routed() == {"2": 1}
    finally:
        server.close()
