"""`zooter deploy kubernetes` (docs/deploy.md), checked offline: every manifest against the Kubernetes schemas
(kubernetes-validate, its newest schema set, strict), checkov on the manifests and Dockerfiles, and the wiring:
the gateway's candidates file points at the generated Services, ports and probes match the processes' flags."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from zooter.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
CHECKOV = "checkov==3.3.30"

CANDIDATES = """\
- name: alpha-7b
  cost: {input_per_mtok: 0.2, output_per_mtok: 0.2}
  serve: {triton_model: alpha, triton_url: gpu-a.internal:8001}
- name: beta-70b
  serve: {triton_model: beta, triton_url: "grpc://gpu-b.internal:8001"}
- name: gamma-8b
  serve: {triton_model: gamma, triton_url: gpu-a.internal:8001, io: llmapi}
- name: delta-1b
  serve: {openai_base_url: "https://api.example.com/v1", model: delta, api_key_env: DELTA_KEY}
"""


@pytest.fixture(scope="module")
def deployed(bundles, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("deploy")
    (root / "c.yaml").write_text(CANDIDATES)
    assert main(["deploy", "kubernetes", "--bundle", str(bundles["int8"]), "--candidates", str(root / "c.yaml"),
                 "--out", str(root / "k8s"), "--triton-version", "25.01"]) == 0
    return root / "k8s"


def docs_of(out: Path) -> dict[tuple[str, str], dict]:
    """(kind, name) -> manifest for everything the kustomization applies."""
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    docs = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((out / name).read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def container_port(pod: dict, port) -> int:
    """The number a Service targetPort or a probe's port names in this pod."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for c in pod["containers"] for p in c.get("ports", []) if p["name"] == port]
    return number


def flag(args: list[str], name: str) -> str:
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_every_manifest_validates_against_the_kubernetes_schemas(deployed):
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    kustomization = yaml.safe_load((deployed / "kustomization.yaml").read_text())
    written = sorted(p.name for p in deployed.glob("*.yaml") if p.name not in ("kustomization.yaml", "candidates.yaml"))
    assert sorted(kustomization["resources"]) == written
    checked, custom = 0, []
    for path in [*(deployed / name for name in kustomization["resources"]), deployed / "prometheus-adapter" / "config.yaml"]:
        text = path.read_text()
        assert not re.search(r"[&*]id\d{3}", text), f"{path.name}: YAML aliases (kustomize refuses some)"
        for doc in yaml.safe_load_all(text):
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):   # a CRD: no schema in the package
                custom.append(doc)
                continue
            kubernetes_validate.validate(doc, version, strict=True)
            checked += 1
    assert checked >= 15 and {d["kind"] for d in custom} == {"PodMonitor"}
    pods = {name: d["spec"]["template"] for (kind, name), d in docs_of(deployed).items() if kind == "Deployment"}
    for monitor in custom:     # each PodMonitor selects its Deployment's pods and scrapes a port they declare
        template = pods[monitor["metadata"]["name"]]
        assert selects(monitor["spec"]["selector"]["matchLabels"], template["metadata"]["labels"])
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert container_port(template["spec"], endpoint["port"])


def test_the_gateway_takes_the_cluster_candidates_file(deployed, bundles, monkeypatch):
    """The rewritten file is one the gateway accepts: every candidate callable, Triton ones at the Services."""
    from zooter.servers.gateway import GatewaySettings, create_app

    monkeypatch.setenv("DELTA_KEY", "upstream-key")
    app = create_app(GatewaySettings(bundle=bundles["int8"], candidates=deployed / "candidates.yaml"))
    backend = app.state.gateway.backend
    try:
        assert not backend.unservable and sorted(backend.upstreams) == ["alpha-7b", "beta-70b", "delta-1b", "gamma-8b"]
        assert ({backend.upstreams[n].address for n in ("alpha-7b", "beta-70b", "gamma-8b")}
                == {"triton-gpu-a:8001", "triton-gpu-b:8001"})
    finally:
        asyncio.run(app.state.gateway.close())


def test_gateway_wiring_matches_the_gateway_process(deployed):
    from zooter.servers.gateway.metrics import Metrics
    from zooter.serving.candidates import load_candidates, parse_candidates
    from zooter.serving.triton_client import grpc_address

    docs = docs_of(deployed)
    deployment = docs[("Deployment", "zooter-gateway")]
    pod = deployment["spec"]["template"]["spec"]
    (gw,) = pod["containers"]
    args = gw["command"][1:] + gw["args"]
    parsed = build_parser().parse_args(args)          # the real CLI accepts every flag
    assert parsed.host == "0.0.0.0" and deployment["spec"]["replicas"] >= 2
    assert container_port(pod, "http") == parsed.port
    service = docs[("Service", "zooter-gateway")]
    assert selects(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    assert container_port(pod, service["spec"]["ports"][0]["targetPort"]) == parsed.port
    assert gw["readinessProbe"]["httpGet"]["path"] == "/health"
    assert gw["livenessProbe"]["httpGet"]["path"] == "/health?probe=live"
    assert container_port(pod, gw["livenessProbe"]["httpGet"]["port"]) == parsed.port
    sec = gw["securityContext"]
    assert sec["readOnlyRootFilesystem"] and sec["runAsNonRoot"] and not sec["allowPrivilegeEscalation"]
    assert gw["resources"]["requests"] and gw["resources"]["limits"]

    mounts = {m["mountPath"]: m for m in gw["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # --candidates is the ConfigMap's file, and that file is the rewritten candidates.yaml
    candidates_mount = mounts[parsed.candidates]
    config = docs[("ConfigMap", volumes[candidates_mount["name"]]["configMap"]["name"])]
    text = config["data"][candidates_mount["subPath"]]
    assert text == (deployed / "candidates.yaml").read_text()
    # --bundle is the volume the init container fills from the bundle image; --api-keys-file is in the Secret
    assert mounts[parsed.bundle]["readOnly"]
    (init,) = pod["initContainers"]
    assert [m["name"] for m in init["volumeMounts"]] == [mounts[parsed.bundle]["name"]]
    keys_dir, keys_file = os.path.split(parsed.api_keys_file)
    keys = volumes[mounts[keys_dir]["name"]]["secret"]
    assert keys_file in [item["path"] for item in keys["items"]]
    # the upstream key an OpenAI-compatible candidate names comes from a Secret
    env = {e["name"]: e for e in gw["env"]}
    assert env["DELTA_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "DELTA_KEY"

    # every Triton candidate points at a generated Service's gRPC port, which reaches tritonserver's --grpc-port
    cluster = parse_candidates(yaml.safe_load(text), "configmap")
    assert [c.name for c in cluster] == [c.name for c in load_candidates(deployed.parent / "c.yaml")]
    for c in cluster:
        if "triton_model" not in c.serve:
            assert c.serve["openai_base_url"] == "https://api.example.com/v1"     # kept as it was
            continue
        host, port = grpc_address(c.serve["triton_url"], c.name).rsplit(":", 1)
        svc = docs[("Service", host)]
        (svc_port,) = [p for p in svc["spec"]["ports"] if p["port"] == int(port)]
        triton = docs[("Deployment", host)]
        assert c.name in triton["metadata"]["annotations"]["zooter.dev/candidates"].split(",")
        assert selects(svc["spec"]["selector"], triton["spec"]["template"]["metadata"]["labels"])
        tpod = triton["spec"]["template"]["spec"]
        assert container_port(tpod, svc_port["targetPort"]) == int(flag(tpod["containers"][0]["args"], "--grpc-port"))
    groups = {c.serve["triton_url"] for c in cluster if "triton_model" in c.serve}
    assert groups == {"grpc://triton-gpu-a:8001", "grpc://triton-gpu-b:8001"}     # alpha and gamma share gpu-a

    # the HPA scales on the gateway's own in-flight gauge, which the adapter rule exposes under that name
    hpa = docs[("HorizontalPodAutoscaler", "zooter-gateway")]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric == Metrics().in_flight._name
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["scaleTargetRef"]["name"] == "zooter-gateway"
    adapter = yaml.safe_load(yaml.safe_load((deployed / "prometheus-adapter" / "config.yaml").read_text())["data"]["config.yaml"])
    exposed = {rule["name"]["as"] for rule in adapter["rules"]}
    triton_hpa = docs[("HorizontalPodAutoscaler", "triton-gpu-a")]
    assert {metric, triton_hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]} <= exposed
    pdb = docs[("PodDisruptionBudget", "zooter-gateway")]
    assert selects(pdb["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])


def test_triton_wiring_matches_the_launcher(deployed):
    from zooter.serving.triton_client import CONTROL_HEADER, RESTRICTED_APIS

    docs = docs_of(deployed)
    for name in ("triton-gpu-a", "triton-gpu-b"):
        deployment = docs[("Deployment", name)]
        pod = deployment["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["image"] == "nvcr.io/nvidia/tritonserver:25.01-trtllm-python-py3"
        assert flag(c["args"], "--model-control-mode") == "none"
        for option in ("--http-restricted-api", "--grpc-restricted-protocol"):
            apis, key = flag(c["args"], option).split(":", 1)
            assert apis == RESTRICTED_APIS and key == f"{CONTROL_HEADER}=$(TRITON_CONTROL_KEY)"
        env = {e["name"]: e for e in c["env"]}
        assert "secretKeyRef" in env["TRITON_CONTROL_KEY"]["valueFrom"]
        http = int(flag(c["args"], "--http-port"))
        for probe in ("startupProbe", "readinessProbe"):
            assert c[probe]["httpGet"]["path"] == "/v2/health/ready"
            assert container_port(pod, c[probe]["httpGet"]["port"]) == http
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60     # an engine load
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container_port(pod, "metrics") == int(flag(c["args"], "--metrics-port"))
        hpa = docs[("HorizontalPodAutoscaler", name)]
        assert hpa["spec"]["scaleTargetRef"]["name"] == name

    # only the gateway reaches the candidates' gRPC port; the gateway may reach them and the external candidate
    policy = docs[("NetworkPolicy", "zooter-candidates")]
    gateway_labels = docs[("Deployment", "zooter-gateway")]["spec"]["template"]["metadata"]["labels"]
    for name in ("triton-gpu-a", "triton-gpu-b"):
        assert selects(policy["spec"]["podSelector"]["matchLabels"], docs[("Deployment", name)]["spec"]["template"]["metadata"]["labels"])
    grpc_rules = [r for r in policy["spec"]["ingress"] if {"protocol": "TCP", "port": 8001} in r["ports"]]
    assert len(grpc_rules) == 1 and len(grpc_rules[0]["from"]) == 1
    assert selects(grpc_rules[0]["from"][0]["podSelector"]["matchLabels"], gateway_labels)
    assert not selects(grpc_rules[0]["from"][0]["podSelector"]["matchLabels"],
                       docs[("Deployment", "triton-gpu-a")]["spec"]["template"]["metadata"]["labels"])
    egress = docs[("NetworkPolicy", "zooter-gateway")]["spec"]["egress"]
    assert any(r["ports"] == [{"protocol": "TCP", "port": 8001}] for r in egress)
    assert any(r["ports"] == [{"protocol": "TCP", "port": 443}] and r["to"][0]["ipBlock"] for r in egress)


def test_the_dockerfiles_copy_every_package_and_use_the_nvidia_triton_image(deployed):
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    for name in ("gateway.Dockerfile", "triton-router.Dockerfile"):
        text = (deployed / "build" / name).read_text()
        for folder in package_dirs:
            assert f"COPY {folder} {folder}\n" in text, (name, folder)
    router = (deployed / "build" / "triton-router.Dockerfile").read_text()
    assert "ARG TRITON_VERSION=25.01\nFROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-trtllm-python-py3" in router
    assert "--model-control-mode=none" in router and "zooter-control-key=${ZOOTER_CONTROL_KEY" in router


def checkov_binary() -> Path:
    """checkov from $ZOOTER_CHECKOV, else its own venv in .venv/tools/checkov, made on first use: it pins
    packaging<24, which pytest cannot live with in one environment."""
    if os.environ.get("ZOOTER_CHECKOV"):
        return Path(os.environ["ZOOTER_CHECKOV"])
    venv = REPO / ".venv" / "tools" / "checkov"
    binary = venv / "bin" / "checkov"
    if not binary.is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", CHECKOV], check=True, timeout=900)
    return binary


@pytest.mark.slow
def test_checkov_reports_no_failed_check(deployed):
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    done = subprocess.run([str(checkov_binary()), "-d", str(deployed), "--framework", "kubernetes", "dockerfile",
                           "-o", "json", "--skip-download"], capture_output=True, text=True, env=env, timeout=600)
    reports = json.loads(done.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}, done.stderr[-2000:]
    failed = [(c["check_id"], c["file_path"], c["resource"]) for r in reports for c in r["results"]["failed_checks"]]
    assert not failed
    assert sum(r["summary"]["passed"] for r in reports) > 100
    skipped = [c for r in reports for c in r["results"]["skipped_checks"]]
    assert skipped and all(len(c["check_result"].get("suppress_comment") or "") > 20 for c in skipped)   # justified


def test_candidates_without_serve_are_named_in_one_line(bundles, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(CANDIDATES.replace("  serve: {triton_model: beta, triton_url: \"grpc://gpu-b.internal:8001\"}\n", "")
                                     .replace("  serve: {openai_base_url: \"https://api.example.com/v1\", model: delta, api_key_env: DELTA_KEY}\n", ""))
    rc = main(["deploy", "kubernetes", "--bundle", str(bundles["int8"]), "--candidates", str(tmp_path / "c.yaml"),
               "--out", str(tmp_path / "k8s")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "c.yaml" in err and "beta-70b, delta-1b" in err and "serve" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


@pytest.mark.parametrize("case", ["missing label", "http triton", "foreign folder", "latest tag", "one replica"])
def test_bad_setups_are_one_line_and_write_nothing(bundles, tmp_path, capsys, case):
    text, out, extra = CANDIDATES, tmp_path / "k8s", []
    if case == "missing label":
        text = CANDIDATES.split("- name: delta-1b")[0]
    elif case == "http triton":
        text = CANDIDATES.replace("gpu-a.internal:8001}", "http://gpu-a.internal:8000}", 1)
    elif case == "foreign folder":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    elif case == "latest tag":
        extra = ["--gateway-image", "registry.example/zooter-gateway:latest"]
    else:
        extra = ["--gateway-replicas", "1"]
    (tmp_path / "c.yaml").write_text(text)
    rc = main(["deploy", "kubernetes", "--bundle", str(bundles["int8"]), "--candidates", str(tmp_path / "c.yaml"),
               "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    expected = {"missing label": "delta-1b", "http triton": "grpc://", "foreign folder": "--out",
                "latest tag": "--gateway-image", "one replica": "--gateway-replicas"}[case]
    assert expected in err
    if case == "foreign folder":
        assert [p.name for p in out.iterdir()] == ["mine.txt"]
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".*partial"))


def test_a_second_run_replaces_its_own_folder(bundles, tmp_path):
    (tmp_path / "c.yaml").write_text(CANDIDATES)
    args = ["deploy", "kubernetes", "--bundle", str(bundles["int8"]), "--candidates", str(tmp_path / "c.yaml"),
            "--out", str(tmp_path / "k8s")]
    assert main(args) == 0
    (tmp_path / "c.yaml").write_text(CANDIDATES.replace("gpu-b.internal", "gpu-a.internal"))
    assert main(args + ["--namespace", "routing"]) == 0
    docs = docs_of(tmp_path / "k8s")
    assert ("Deployment", "triton-gpu-b") not in docs and not (tmp_path / "k8s" / "triton-gpu-b-service.yaml").exists()
    assert {d["metadata"].get("namespace") for (kind, _), d in docs.items() if kind != "Namespace"} == {"routing"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (its kustomize builds the folder)")
def test_kustomize_builds_the_folder(deployed):
    built = subprocess.run(["kubectl", "kustomize", str(deployed)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} == set(docs_of(deployed))
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"zooter"}
