"""The one candidate-calling core (runtime/candidate_io.py) and its faces: `zooter generate`'s TritonClient
(sync) and the gateway's TritonModelUpstream (async gRPC), against both Triton I/Os a candidate can have:
TensorRT-LLM's LLM-API model and the older ensemble/BLS I/O, served by a real tritonserver as fast echo
models that declare each I/O as the real models do (no LLM behind them), and a model with neither.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from zooter.runtime.candidate_io import (ENSEMBLE, LLMAPI, Ask, IOMismatch, Reading, TritonModel, config_inputs,
                                         detect, error_message, status_kind, triton_kind)
from zooter.runtime.errors import UserError

# --- the core, without a server -------------------------------------------------------------------------
# As the LLM-API model declares them: max_batch_size 0 (model.yaml), so no batch dimension.
LLMAPI_META = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [-1]},
                          {"name": "streaming", "datatype": "BOOL", "shape": [1]},
                          {"name": "sampling_param_max_tokens", "datatype": "INT32", "shape": [1]},
                          {"name": "sampling_param_temperature", "datatype": "FP32", "shape": [1]},
                          {"name": "sampling_param_top_p", "datatype": "FP32", "shape": [1]},
                          {"name": "sampling_param_seed", "datatype": "UINT64", "shape": [1]},
                          {"name": "sampling_param_stop", "datatype": "BYTES", "shape": [-1]},
                          {"name": "return_finish_reason", "datatype": "BOOL", "shape": [1]}],
               "outputs": [{"name": "text_output"}, {"name": "finish_reason"}, {"name": "stop_reason"}]}
DECOUPLED = {"model_transaction_policy": {"decoupled": True}}
ENSEMBLE_META = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [-1, -1]},
                            {"name": "max_tokens", "datatype": "INT32", "shape": [-1, -1]},
                            {"name": "stream", "datatype": "BOOL", "shape": [-1, 1]},
                            {"name": "temperature", "datatype": "FP32", "shape": [-1, 1]},
                            {"name": "exclude_input_in_output", "datatype": "BOOL", "shape": [-1, 1]}],
                 "outputs": [{"name": "text_output"}]}


def test_the_io_is_detected_from_metadata_or_named_when_both_fit():
    assert TritonModel.from_metadata("m", LLMAPI_META).io == LLMAPI
    assert TritonModel.from_metadata("m", ENSEMBLE_META).io == ENSEMBLE
    both = {"inputs": LLMAPI_META["inputs"] + [{"name": "max_tokens", "datatype": "INT32", "shape": [-1, 1]}],
            "outputs": [{"name": "text_output"}]}
    with pytest.raises(IOMismatch, match="fits both .* serve.io: llmapi | ensemble"):
        TritonModel.from_metadata("m", both)
    assert TritonModel.from_metadata("m", both, named=LLMAPI).io == LLMAPI
    with pytest.raises(IOMismatch, match="lacks the llmapi I/O"):
        TritonModel.from_metadata("m", ENSEMBLE_META, named=LLMAPI)
    with pytest.raises(IOMismatch, match=r"model 'resnet' has none of the known I/Os.*inputs: \['image'\]"):
        detect("resnet", {"image": None}, ["scores"])


def test_a_request_maps_onto_each_io():
    ask = Ask("hello", 7, stream=True, temperature=0.5, top_p=0.9, seed=3, stop=["\n", "END"])
    model = TritonModel.from_metadata("m", LLMAPI_META, DECOUPLED)
    specs = {name: (dt, shape, value) for name, dt, shape, value in model.specs(ask)}
    assert specs["text_input"][:2] == ("BYTES", [1]) and specs["text_input"][2][0] == b"hello"    # 1-D, unbatched
    assert specs["sampling_param_max_tokens"][0] == "INT32" and int(specs["sampling_param_max_tokens"][2][0]) == 7
    assert bool(specs["streaming"][2][0]) and specs["return_finish_reason"][2][0]
    assert specs["sampling_param_temperature"][2].dtype == np.float32 and specs["sampling_param_seed"][2].dtype == np.uint64
    assert specs["sampling_param_stop"][1] == [2] and list(specs["sampling_param_stop"][2]) == [b"\n", b"END"]
    assert "sampling_param_top_k" not in specs      # not asked for
    # The LLM-API model refuses streaming unless decoupled (its model.yaml's default): asked whole instead.
    plain = TritonModel.from_metadata("m", LLMAPI_META)
    assert not any(bool(v.reshape(-1)[0]) for n, _, _, v in plain.specs(ask) if n == "streaming")
    assert plain.reading(ask).stream is False and model.reading(ask).stream is True
    assert TritonModel.declared("m", LLMAPI).inputs["text_input"] == ("BYTES", [1])
    assert TritonModel.declared("m", ENSEMBLE).inputs["text_input"] == ("BYTES", [1, 1])
    specs = {name: value for name, _, _, value in TritonModel.from_metadata("m", ENSEMBLE_META, DECOUPLED).specs(ask)}
    # Only what the model declares: this ensemble takes no top_p, seed or stop words.
    assert set(specs) == {"text_input", "max_tokens", "stream", "temperature", "exclude_input_in_output"}
    assert int(specs["max_tokens"][0, 0]) == 7 and bool(specs["exclude_input_in_output"][0, 0])
    with pytest.raises(IOMismatch, match="no sampling_param_max_tokens input"):
        TritonModel("m", LLMAPI, {"text_input": ("BYTES", [1, 1])}).specs(ask)
    assert '{ name: "sampling_param_max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }' in config_inputs(LLMAPI)


def test_answers_read_the_same_whatever_the_io():
    # The LLM-API model streams the whole text so far, finish_reason "None" until the end; deltas come out.
    reading = Reading(LLMAPI, max_tokens=3, stream=True)
    assert [reading.add({"text_output": np.array([[t.encode()]], dtype=object),
                         "finish_reason": np.array([[f.encode()]], dtype=object)})
            for t, f in (("a", "None"), ("a b", "None"), ("a b c", "length"))] == ["a", " b", " c"]
    assert reading.so_far == "a b c" and reading.finish == "length" and reading.usage is None
    reading = Reading(ENSEMBLE, max_tokens=3)
    assert [reading.add({"text_output": t}) for t in ("a", " b")] == ["a", " b"]
    reading.add({"text_output": "", "prompt_tokens": "5", "completion_tokens": "3"})
    assert reading.finish == "length" and reading.usage == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_statuses_and_error_bodies_are_classified_in_one_place():
    assert [status_kind(s) for s in (400, 413, 422, 429, 408, 503, 401, 404)] == \
        ["client"] * 3 + ["retry"] * 3 + ["refused"] * 2
    assert error_message(b'{"error": {"message": "bad temperature"}}') == "bad temperature"
    assert error_message('{"error": "plain"}') == "plain" and error_message(b"<html>oops</html>") == "<html>oops</html>"
    assert triton_kind("StatusCode.INVALID_ARGUMENT", "x") == "bad_request"
    assert triton_kind("StatusCode.UNAVAILABLE", "x") == "refused"
    assert triton_kind("StatusCode.NOT_FOUND", "x") == "missing"
    assert triton_kind("StatusCode.INTERNAL", "Request for unknown model: 'm' is not found") == "unloaded"


@pytest.mark.parametrize("serve, words", [
    ({"triton_model": "m", "triton_urll": "h:1"}, r"unknown key\(s\) \['triton_urll'\]"),
    ({"openai_base_url": "localhost:8000/v1"}, "openai_base_url must start with http:// or https://"),
    ({"triton_model": "m", "triton_url": "host"}, "triton_url must be host:port"),
    ({"triton_model": "m", "io": "vllm"}, "io must be one of llmapi, ensemble, openai"),
    ({"triton_model": "m", "io": "openai"}, "io openai goes with openai_base_url"),
])
def test_a_typo_in_serve_is_a_one_line_error(serve, words):
    from zooter.serving.candidates import CandidatesError, parse_candidates

    with pytest.raises(CandidatesError, match=words) as err:
        parse_candidates([{"name": "a", "serve": serve}], "c.yaml")
    assert "\n" not in str(err.value) and "c.yaml: candidate #1 (a) serve" in str(err.value)


# --- both faces against a real tritonserver ---------------------------------------------------------------
CONFIG = '''
name: "{name}"
backend: "python"
max_batch_size: {batch}
model_transaction_policy {{ decoupled: {decoupled} }}
input [
{inputs}
]
output [
{outputs}
]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
'''
OUTPUTS = {
    LLMAPI: '  { name: "text_output" data_type: TYPE_STRING dims: [ -1 ] },\n'
            '  { name: "finish_reason" data_type: TYPE_STRING dims: [ -1 ] },\n'
            '  { name: "stop_reason" data_type: TYPE_STRING dims: [ -1 ] }',
    ENSEMBLE: '  { name: "text_output" data_type: TYPE_STRING dims: [ -1 ] },\n'
              '  { name: "prompt_tokens" data_type: TYPE_INT32 dims: [ 1 ] },\n'
              '  { name: "completion_tokens" data_type: TYPE_INT32 dims: [ 1 ] }',
}
NONE_INPUTS = '  { name: "image" data_type: TYPE_FP32 dims: [ 3 ] }'


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    import shutil

    from triton_helpers import FAKE_MODELS, tritonserver

    repo = tmp_path_factory.mktemp("io_repo")
    # The LLM-API model as its model.yaml sets it (no batching), decoupled to stream and not (its default).
    models = {"echo_llmapi": (config_inputs(LLMAPI), OUTPUTS[LLMAPI], 0, "true"),
              "echo_llmapi_plain": (config_inputs(LLMAPI), OUTPUTS[LLMAPI], 0, "false"),
              "echo_ensemble": (config_inputs(ENSEMBLE), OUTPUTS[ENSEMBLE], 8, "true"),
              "classifier": (NONE_INPUTS, OUTPUTS[ENSEMBLE], 8, "true")}
    for name, (inputs, outputs, batch, decoupled) in models.items():
        shutil.copytree(FAKE_MODELS / "io_echo" / "1", repo / name / "1")
        (repo / name / "config.pbtxt").write_text(CONFIG.format(name=name, inputs=inputs, outputs=outputs, batch=batch,
                                                                decoupled=decoupled))
    with tritonserver(repo) as server:
        yield server


@pytest.mark.triton
@pytest.mark.parametrize("model", ["echo_llmapi", "echo_llmapi_plain", "echo_ensemble"])
def test_generate_speaks_both_triton_ios(triton, model):
    from zooter.serving.clients import Sampling, TritonClient

    client = TritonClient({"triton_model": model, "triton_url": triton.grpc_url},
                          Sampling(max_tokens=3, temperature=0.5, top_p=0.75, seed=11, stop=("zz",), timeout_s=60))
    answer = client.complete("one two three four")
    assert (answer.text, answer.finish_reason) == ("four three two", "length")
    assert answer.output_tokens == (3 if model == "echo_ensemble" else None)   # the LLM-API model counts nothing
    assert client.complete("a b").finish_reason == "stop"
    knobs = json.loads(TritonClient({"triton_model": model, "triton_url": triton.grpc_url},
                                    Sampling(max_tokens=5, temperature=0.5, top_p=0.75, seed=11, stop=("zz",))
                                    ).complete("knobs").text)
    assert knobs == {"max_tokens": 5, "stream": False, "temperature": 0.5, "top_p": 0.75, "seed": 11, "stop": ["zz"]}


@pytest.mark.triton
@pytest.mark.parametrize("model", ["echo_llmapi", "echo_llmapi_plain", "echo_ensemble"])
def test_the_gateway_speaks_both_triton_ios(triton, model):
    from zooter.servers.gateway.requests import parse_chat
    from zooter.servers.gateway.upstreams import GrpcClients, TritonModelUpstream

    async def run():
        clients = GrpcClients()
        try:
            upstream = TritonModelUpstream("cand", {"triton_model": model, "triton_url": f"grpc://{triton.grpc_url}"},
                                           clients, max_tokens=16)
            body = {"model": "cand", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
            call = parse_chat(body)
            call.prompt = "one two three four"
            chunks = [c async for c in upstream.stream(call)]
            answer = await upstream.complete(call, 30)
            call.prompt = "knobs"
            call.body.update(temperature=0.25, seed=4, stop="zz")
            call.sampling = {"temperature": 0.25}
            call.max_tokens = 9
            knobs = await upstream.complete(call, 30)
            return chunks, answer, knobs
        finally:
            await clients.close()

    chunks, answer, knobs = asyncio.run(run())
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks]
    # A model that is not decoupled cannot stream: its whole answer is one chunk.
    expected = ["four three two", ""] if model == "echo_llmapi_plain" else ["four", " three", " two", ""]
    assert deltas == expected and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert answer["choices"][0]["message"]["content"] == "four three two"
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer.get("usage") == ({"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
                                   if model == "echo_ensemble" else None)
    assert json.loads(knobs["choices"][0]["message"]["content"]) == \
        {"max_tokens": 9, "stream": False, "temperature": 0.25, "top_p": None, "seed": 4, "stop": ["zz"]}


@pytest.mark.triton
def test_a_model_with_no_known_io_is_refused_naming_its_inputs(triton):
    from zooter.serving.clients import CallError, Sampling, TritonClient
    from zooter.servers.gateway.upstreams import GrpcClients, TritonModelUpstream

    with pytest.raises(UserError, match=r"candidate 'cand' .*model 'classifier' has none of the known I/Os.*\['image'\]"):
        TritonModelUpstream("cand", {"triton_model": "classifier", "triton_url": triton.grpc_url}, GrpcClients(), 16)
    with pytest.raises(UserError, match="lacks the llmapi I/O its serve.io names"):
        TritonModelUpstream("cand", {"triton_model": "echo_ensemble", "triton_url": triton.grpc_url, "io": "llmapi"},
                            GrpcClients(), 16)
    with pytest.raises(CallError, match="none of the known I/Os") as err:
        TritonClient({"triton_model": "classifier", "triton_url": triton.grpc_url}, Sampling()).complete("hi")
    assert not err.value.retryable
    # A server that cannot be reached at start is no reason to refuse: /health names it.
    TritonModelUpstream("cand", {"triton_model": "x", "triton_url": "127.0.0.1:9"}, GrpcClients(), 16)


@pytest.mark.triton
def test_triton_build_reads_a_candidates_io_and_refuses_one_with_none(triton, bundles, tmp_path):
    from zooter.export.triton_repo import build_repository
    from zooter.runtime.router import Router
    from zooter.serving.candidates import parse_candidates

    labels = Router.load(bundles["fp32"]).labels

    def build(model, **serve):
        entries = [{"name": labels[0], "serve": {"triton_model": model, "triton_url": triton.grpc_url, **serve}},
                   *({"name": n} for n in labels[1:])]
        return build_repository(bundles["fp32"], tmp_path / model, parse_candidates(entries))

    assert build("echo_llmapi").serving[labels[0]]["io"] == "llmapi"       # read from the model's metadata
    assert build("echo_ensemble").serving[labels[0]]["io"] == "ensemble"
    with pytest.raises(UserError, match=rf"candidate '{labels[0]}' .*model 'classifier' has none of the known I/Os"
                                        r".*inputs: \['image'\]"):
        build("classifier")


@pytest.mark.slow
@pytest.mark.triton
def test_the_zooter_model_asks_an_llmapi_model_that_is_not_decoupled_for_whole_answers(triton, bundles, tmp_path):
    """TensorRT-LLM ships its LLM-API model not decoupled, and such a model refuses `streaming`: the build
    records that from the model's config, and the `zooter` model asks it for whole answers, which a streaming
    client then gets as one piece, from the candidate it chose (no fallback)."""
    import urllib.request

    from triton_helpers import tritonserver
    from zooter.export.triton_repo import build_repository
    from zooter.runtime.router import Router
    from zooter.serving.candidates import parse_candidates

    labels = Router.load(bundles["fp32"]).labels
    entries = [{"name": labels[0], "serve": {"triton_model": "echo_llmapi_plain", "triton_url": triton.grpc_url}},
               *({"name": n} for n in labels[1:])]
    built = build_repository(bundles["fp32"], tmp_path / "repo", parse_candidates(entries))
    assert built.serving[labels[0]]["decoupled"] is False
    with tritonserver(tmp_path / "repo", extra_repositories=[triton.repository]) as server:
        body = {"text_input": "one two three four", "max_tokens": 3, "answer_with": labels[0], "stream": True}
        request = urllib.request.Request(f"http://{server.http_url}/v2/models/zooter/generate_stream",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            pieces = [json.loads(line[5:]) for line in response.read().decode().splitlines() if line.startswith("data:")]
    assert all("error" not in p for p in pieces), pieces
    assert {p["candidate"] for p in pieces} == {labels[0]} and not any(p.get("note") for p in pieces)
    assert "".join(p["text_output"] for p in pieces) == "four three two" and pieces[-1]["finish_reason"] == "length"


@pytest.mark.triton
def test_the_gateway_refuses_to_start_on_a_model_with_no_known_io(triton, bundles, tmp_path, capsys):
    from zooter.cli import main
    from zooter.runtime.router import Router

    labels = Router.load(bundles["fp32"]).labels
    entries = [{"name": labels[0], "serve": {"triton_model": "classifier", "triton_url": f"grpc://{triton.grpc_url}"}},
               *({"name": n, "serve": {"openai_base_url": "http://127.0.0.1:9/v1"}} for n in labels[1:])]
    (tmp_path / "c.yaml").write_text(json.dumps(entries))
    assert main(["gateway", "--bundle", str(bundles["fp32"]), "--candidates", str(tmp_path / "c.yaml"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model 'classifier' has none of the known I/Os" in err and "['image']" in err
