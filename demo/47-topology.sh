#!/usr/bin/env bash
# Stage 47: candidates across servers, the documented cluster shape. Three candidate servers on loopback: a
# tritonserver whose stand-in has the I/O of TensorRT-LLM's LLM-API model, one whose stand-in has the older
# ensemble I/O, and the OpenAI-compatible stub for the other candidates; two `zooter gateway` processes (routing
# in process) on one candidates file. Ask through the openai client, kill the LLM-API server (SIGKILL) and show
# the fallback and /health, restart it and show traffic return, print both gateways' metrics. Then write the
# Kubernetes folder for the same shape (`zooter deploy kubernetes`) and validate every manifest against the
# Kubernetes schemas. Everything started here is stopped at the end, and on any failure.
set -euo pipefail
: "${ZOOTER_DATA:?}" "${OUT:?}"
export HF_HUB_OFFLINE=1
DIR="$OUT/topology"
rm -rf "$DIR" && mkdir -p "$DIR"
test -d "$OUT/bundle" || { echo "no $OUT/bundle: run demo/30-export.sh first" >&2; exit 1; }

for io in llmapi ensemble; do
    zooter triton build "$OUT/bundle" --candidates "$OUT/candidates.yaml" --out "$DIR/repo-$io" \
        --stand-ins --stand-in-io "$io" --max-tokens 16 > "$DIR/build-$io.log"
    head -1 "$DIR/build-$io.log"
done

python - "$OUT/bundle" "$OUT/candidates.yaml" "$DIR" "$ZOOTER_DATA/mt_bench/question.jsonl" <<'PY'
import json, os, signal, socket, subprocess, sys, time
from pathlib import Path

import httpx
import yaml
from openai import OpenAI

from zooter.bench.processes import stop_processes
from zooter.export.triton_repo import model_name_for
from zooter.runtime.router import Router

sys.path.insert(0, "tests")         # the shape the topology test runs too
from topology_shape import by_routed_share, standin_server  # noqa: E402

bundle, priced, out, questions = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
prompts = [json.loads(line)["turns"][0] for line in open(questions) if line.strip()]
router = Router.load(bundle)
order = by_routed_share(router, prompts)
llmapi, ensemble = order[0], order[1]
asked_of_llmapi = [p for p in prompts if router.route(p).candidate == llmapi]


def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(condition, what, limit=600):
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.3)


def health(url):
    try:
        return httpx.get(url + "/health", timeout=10).json().get("upstreams", {})
    except (httpx.HTTPError, ValueError):
        return {}


def triton(io, label, **ports):
    return standin_server(out / f"repo-{io}", label, out / f"tritonserver-{io}.log", **ports)


servers, processes = {}, []
try:
    stub_log = open(out / "stub.log", "w")
    processes.append(subprocess.Popen([sys.executable, "-m", "zooter.cli", "stub-llm", "--delay", "0.02"],
                                      stdout=stub_log, stderr=subprocess.STDOUT, start_new_session=True))
    wait(lambda: "listening on " in (out / "stub.log").read_text(), "the OpenAI-compatible stub")
    stub_url = (out / "stub.log").read_text().split("listening on ")[1].split()[0]
    servers["llmapi"] = triton("llmapi", llmapi).start(timeout=600)
    servers["ensemble"] = triton("ensemble", ensemble).start(timeout=600)
    costs = {c["name"]: c.get("cost") for c in yaml.safe_load(open(priced))}
    serve = {llmapi: {"triton_model": model_name_for(llmapi), "triton_url": f"grpc://{servers['llmapi'].grpc_url}"},
             ensemble: {"triton_model": model_name_for(ensemble), "triton_url": f"grpc://{servers['ensemble'].grpc_url}"}}
    serve.update({label: {"openai_base_url": stub_url, "model": label} for label in order[2:]})
    cluster = out / "candidates.cluster.yaml"
    cluster.write_text(yaml.safe_dump([{"name": n, **({"cost": costs[n]} if costs.get(n) else {}), "serve": s}
                                       for n, s in serve.items()], sort_keys=False))
    print(f"candidate servers: {llmapi} -> tritonserver {servers['llmapi'].grpc_url} (LLM-API stand-in), "
          f"{ensemble} -> tritonserver {servers['ensemble'].grpc_url} (ensemble stand-in), "
          f"{', '.join(order[2:])} -> OpenAI-compatible stub {stub_url}")
    urls = []
    for i in range(2):
        p = port()
        log = open(out / f"gateway{i}.log", "w")
        processes.append(subprocess.Popen(["zooter", "gateway", "--bundle", bundle, "--candidates", str(cluster),
                                           "--port", str(p), "--max-tokens", "16", "--log-level", "warning"],
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        urls.append(f"http://127.0.0.1:{p}")
    for url in urls:
        wait(lambda: health(url).get(llmapi) == "up", f"gateway {url}")
    print(f"two gateway replicas: {', '.join(urls)}")

    def ask(prompt, i):
        client = OpenAI(base_url=urls[i % 2] + "/v1", api_key="not-needed-on-loopback")
        raw = client.chat.completions.with_raw_response.create(
            model="zooter", messages=[{"role": "user", "content": prompt}], max_tokens=12)
        answer = raw.parse()
        return raw.headers["x-zooter-candidate"], raw.headers["x-zooter-fallback"], answer.choices[0].message.content

    print("\n== all servers up: prompts the router sends to", llmapi, "==")
    for i, prompt in enumerate(asked_of_llmapi[:2]):
        who, fallback, text = ask(prompt, i)
        print(f"  gateway {i % 2}: answered by {who} (fallback {fallback}): {text[:80]!r}")

    print(f"\n== SIGKILL the LLM-API server ({llmapi}) ==")
    os.killpg(servers["llmapi"].process.pid, signal.SIGKILL)
    ports = {k: getattr(servers["llmapi"], k) for k in ("http_port", "grpc_port", "metrics_port")}
    servers["llmapi"].close()
    for i, prompt in enumerate(asked_of_llmapi[:4]):
        who, fallback, text = ask(prompt, i)
        print(f"  gateway {i % 2}: routed to {llmapi}, answered by {who} (fallback {fallback}): {text[:60]!r}")
    for url in urls:
        wait(lambda: health(url).get(llmapi, "").startswith("down"), f"{url}/health")
        print(f"  {url}/health: {llmapi}: {health(url)[llmapi]}")

    print("\n== restart it on the same ports ==")
    servers["llmapi"] = triton("llmapi", llmapi, **ports).start(timeout=600)
    ready = time.monotonic()
    for i in range(60):
        sent = time.monotonic()
        who, fallback, text = ask(asked_of_llmapi[i % len(asked_of_llmapi)], i)
        if who == llmapi:
            print(f"  traffic is back on {llmapi}: a request sent {sent - ready:.1f} s after it was ready was answered "
                  f"by it ({time.monotonic() - sent:.1f} s to answer): {text[:60]!r}")
            break
    else:
        sys.exit(f"traffic did not return to {llmapi}")

    print("\n== both gateways' metrics: fallbacks and upstream failures ==")
    for url in urls:
        for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(("zooter_gateway_fallbacks_total", "zooter_gateway_upstream_failures_total")):
                print(f"  {url[-5:]} {line}")
finally:
    stop_processes(processes)
    for server in servers.values():
        server.close()
PY

echo
echo "== the same shape for Kubernetes: zooter deploy kubernetes, every manifest validated =="
zooter deploy kubernetes --bundle "$OUT/bundle" --candidates "$DIR/candidates.cluster.yaml" --out "$DIR/k8s" | tail -3
python - "$DIR/k8s" <<'PY'
import sys
from pathlib import Path

import kubernetes_validate
import yaml

folder = Path(sys.argv[1])
version = kubernetes_validate.latest_version()
checked = 0
for name in yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"]:
    for doc in yaml.safe_load_all((folder / name).read_text()):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
print(f"  {checked} manifests valid against Kubernetes {version}'s schemas (strict)")
PY
