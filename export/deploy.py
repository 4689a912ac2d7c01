"""`zooter deploy kubernetes`: the cluster shape (DESIGN.md, "Flow") as a Kustomize folder, written from
the same bundle and candidates file the gateway and `zooter triton build` read (docs/deploy.md).

    kustomization.yaml, namespace.yaml
    gateway-*.yaml         Deployment (Router in process, 2+ replicas, non-root, read-only root), Service,
                           PodDisruptionBudget, HPA on in-flight requests per pod, PodMonitor, the rewritten
                           candidates file as a ConfigMap, NetworkPolicy (its ingress and egress)
    triton-NAME-*.yaml     per candidate group (the candidates sharing one triton_url host): Deployment on
                           NVIDIA's TensorRT-LLM Triton image (GPUs, /v2/health/ready, a startup probe sized for
                           engine loads, model control off, control APIs keyed), Service, HPA on the
                           queue-to-compute ratio, PodMonitor
    candidates-networkpolicy.yaml   only the gateway (and Prometheus, for metrics) reaches the candidates
    candidates.yaml        the candidates file the gateway reads in the cluster (also in the ConfigMap)
    prometheus-adapter/config.yaml  the adapter rules behind both HPAs (not in the kustomization: it belongs
                           to the adapter's namespace)
    build/                 Dockerfiles: gateway, bundle (the volume the gateway reads), router-in-Triton

Names, ports and flags come from the processes they describe (the gateway's CLI and metrics, the Triton
launcher's restricted APIs), so the wiring the tests check is the wiring that runs.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from importlib.metadata import version as _version
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

from zooter.runtime.bundle import Manifest
from zooter.runtime.errors import UserError
from zooter.serving.candidates import Candidate, costs_for, load_candidates
from zooter.serving.triton_client import CONTROL_HEADER, RESTRICTED_APIS, grpc_address

GATEWAY_PORT = 8000
TRITON_HTTP, TRITON_GRPC, TRITON_METRICS = 8000, 8001, 8002
IN_FLIGHT_METRIC = "zooter_gateway_in_flight_requests"        # servers/gateway/metrics.py
QUEUE_COMPUTE_METRIC = "triton_queue_compute_ratio"           # exposed by the adapter rule below
__version__ = _version("zooter")
UID = 10001                                                    # non-root, above the host's user range
# Paths inside the gateway pod.
BUNDLE_DIR = "/var/lib/zooter/bundle"
CONFIG_DIR = "/etc/zooter"
KEYS_DIR = "/etc/zooter/keys"
# Secrets the manifests name; docs/deploy.md shows the commands that create them.
GATEWAY_KEYS_SECRET = "zooter-gateway-keys"      # api-keys (one a line), metrics-key (one of them, for Prometheus)
UPSTREAM_KEYS_SECRET = "zooter-upstream-keys"    # one entry per api_key_env an OpenAI-compatible candidate names
CONTROL_KEY_SECRET = "zooter-triton-control"     # control-key: Triton's restricted model-repository/logging APIs
# A TensorRT-LLM engine load can take many minutes; the startup probe allows 30 before the kubelet restarts it.
ENGINE_LOAD_SECONDS = 1800
PROBE_PERIOD = 10
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_PART = "app.kubernetes.io/part-of"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_NAME = "app.kubernetes.io/name"


@dataclass
class DeploySettings:
    namespace: str = "zooter"
    gateway_image: str = f"zooter-gateway:{__version__}"
    bundle_image: str | None = None                  # default: zooter-bundle:<first 12 of manifest_sha256>
    triton_version: str = "25.01"                    # NGC release yy.mm of tritonserver:<yy.mm>-trtllm-python-py3
    gateway_replicas: int = 2
    gateway_max_replicas: int = 10
    in_flight_target: int = 64                       # average in-flight requests per gateway pod (docs/deploy.md)
    gpus: int = 1                                    # nvidia.com/gpu per Triton pod
    candidate_max_replicas: int = 4
    queue_compute_target: str = "1"                  # queue time / compute time per Triton pod
    monitoring_namespace: str = "monitoring"         # where Prometheus runs (scrapes pass the NetworkPolicy)

    def check(self) -> None:
        if not _NAME.match(self.namespace):
            raise UserError(f"--namespace must be a DNS label (lower case letters, digits, '-'), got {self.namespace!r}")
        if not re.fullmatch(r"\d{2}\.\d{2}", self.triton_version):
            raise UserError(f"--triton-version must be an NGC release yy.mm (e.g. 25.01), got {self.triton_version!r}")
        if self.gateway_replicas < 2:
            raise UserError(f"--gateway-replicas must be at least 2 (one pod is a single point of failure), got {self.gateway_replicas}")
        if self.gateway_max_replicas < self.gateway_replicas:
            raise UserError("--gateway-max-replicas must be at least --gateway-replicas")
        for flag, value in (("--in-flight-target", self.in_flight_target), ("--gpus", self.gpus),
                            ("--candidate-max-replicas", self.candidate_max_replicas)):
            if value < 1:
                raise UserError(f"{flag} must be at least 1, got {value}")
        for flag, image in (("--gateway-image", self.gateway_image), ("--bundle-image", self.bundle_image)):
            if image is not None and (not image or image.endswith(":latest") or any(c.isspace() for c in image)):
                raise UserError(f"{flag} must name a fixed tag (not :latest), got {image!r}")


@dataclass
class TritonGroup:
    """The candidates one Triton server answers (one triton_url host): one Deployment and Service."""

    name: str                   # the Service's name, where the rewritten triton_url points
    host: str                   # the triton_url host in the user's file
    candidates: list[str]


def labels_for(component: str, name: str) -> dict:
    return {LABEL_NAME: name, LABEL_COMPONENT: component, LABEL_PART: "zooter"}


def _service_name(host: str, taken: set[str]) -> str:
    """A DNS-1035 Service name from a triton_url host: its first label, prefixed, made unique."""
    first = host.split(".")[0].lower() if not re.fullmatch(r"[\d.]+|\[.*\]", host) else host
    stem = re.sub(r"[^a-z0-9]+", "-", first).strip("-")[:40] or "server"
    name, i = f"triton-{stem}", 2
    while name in taken:
        name, i = f"triton-{stem}-{i}", i + 1
    taken.add(name)
    return name


def plan(candidates: Sequence[Candidate], labels: Sequence[str], source: str) -> tuple[list[TritonGroup], list[Candidate]]:
    """The Triton groups and the candidates file for the cluster (triton_url -> the group's Service).
    Candidates without a `serve` entry cannot be called from the cluster: refused, all named in one line."""
    try:
        costs_for(candidates, labels)      # every label the bundle routes to has an entry (names the missing)
    except UserError as err:
        raise UserError(f"{source}: {err} (the bundle routes to {', '.join(labels)})") from None
    bare = [c.name for c in candidates if not c.serve]
    if bare:
        raise UserError(f"{source}: no serve entry for {', '.join(bare)}: every candidate must say where it is "
                        "served (serve.triton_model or serve.openai_base_url) to be deployed")
    groups: dict[str, TritonGroup] = {}
    taken: set[str] = set()
    out = []
    for c in candidates:
        serve = dict(c.serve)
        if serve.get("triton_model"):
            if str(serve.get("protocol") or "grpc").lower() != "grpc":
                raise UserError(f"{source}: candidate {c.name!r}: the gateway calls Triton over gRPC: set protocol: grpc")
            address = grpc_address(str(serve.get("triton_url") or "localhost:8001"), f"{source}: candidate {c.name!r}")
            host = urlsplit(f"//{address}").hostname or "localhost"
            if host not in groups:
                groups[host] = TritonGroup(_service_name(host, taken), host, [])
            groups[host].candidates.append(c.name)
            serve["triton_url"] = f"grpc://{groups[host].name}:{TRITON_GRPC}"
            serve.pop("protocol", None)
        elif serve.get("openai_base_url"):
            if not str(serve["openai_base_url"]).startswith(("http://", "https://")):
                raise UserError(f"{source}: candidate {c.name!r}: openai_base_url must start with http:// or https://")
        else:
            raise UserError(f"{source}: candidate {c.name!r}: serve needs triton_model or openai_base_url")
        out.append(Candidate(c.name, c.cost, serve))
    return list(groups.values()), out


def _external_ports(candidates: Sequence[Candidate]) -> list[int]:
    ports = set()
    for c in candidates:
        if c.serve.get("openai_base_url"):
            url = urlsplit(str(c.serve["openai_base_url"]))
            ports.add(url.port or (443 if url.scheme == "https" else 80))
    return sorted(ports)


# --- manifests -----------------------------------------------------------------------------------------
def _meta(name: str, ns: str, labels: dict, annotations: dict | None = None) -> dict:
    meta = {"name": name, "namespace": ns, "labels": labels}
    if annotations:
        meta["annotations"] = annotations
    return meta


def _skip(**reasons: str) -> dict:
    """checkov's inline exceptions, each with its reason (docs/deploy.md lists them)."""
    return {f"checkov.io/skip{i}": f"{check}={why}" for i, (check, why) in enumerate(reasons.items(), 1)}


def _container_security() -> dict:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "runAsUser": UID, "runAsGroup": UID, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def _pod_security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _http_probe(path: str, port: str, period: int, failures: int, timeout: int = 3) -> dict:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "timeoutSeconds": timeout,
            "failureThreshold": failures}


def _pods_hpa(name: str, ns: str, labels: dict, minimum: int, maximum: int, metric: str, target: str,
              extra: Sequence[dict] = (), behavior: dict | None = None) -> dict:
    spec = {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": minimum, "maxReplicas": maximum,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": metric},
                                                  "target": {"type": "AverageValue", "averageValue": target}}},
                        *extra]}
    if behavior:
        spec["behavior"] = behavior
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(name, ns, labels),
            "spec": spec}


def _pod_monitor(name: str, ns: str, labels: dict, port: str, authorization: dict | None = None) -> dict:
    endpoint = {"port": port, "path": "/metrics", "interval": "15s"}
    if authorization:
        endpoint["authorization"] = authorization
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": _meta(name, ns, labels),
            "spec": {"selector": {"matchLabels": labels}, "podMetricsEndpoints": [endpoint]}}


def gateway_manifests(s: DeploySettings, candidates_text: str, upstream_envs: Sequence[str], bundle_image: str,
                      bundle_size_mib: int, external_ports: Sequence[int], triton_groups: Sequence[TritonGroup]) -> dict[str, dict]:
    ns, name = s.namespace, "zooter-gateway"
    labels = labels_for("gateway", name)
    args = ["gateway", "--host", "0.0.0.0", "--port", str(GATEWAY_PORT), "--bundle", BUNDLE_DIR,
            "--candidates", f"{CONFIG_DIR}/candidates.yaml", "--api-keys-file", f"{KEYS_DIR}/api-keys",
            "--log-level", "info"]
    env = [{"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}, {"name": "HOME", "value": "/tmp"}]
    env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": UPSTREAM_KEYS_SECRET, "key": var}}}
            for var in upstream_envs]
    skips = {"CKV_K8S_43": "images are named by tag; pin digests with kustomize images when you promote a build"}
    if upstream_envs:
        skips["CKV_K8S_35"] = "the gateway reads an upstream's key from serve.api_key_env, an environment variable"
    volume_mounts = [{"name": "bundle", "mountPath": BUNDLE_DIR, "readOnly": True},
                     {"name": "candidates", "mountPath": CONFIG_DIR + "/candidates.yaml", "subPath": "candidates.yaml",
                      "readOnly": True},
                     {"name": "keys", "mountPath": KEYS_DIR, "readOnly": True},
                     {"name": "tmp", "mountPath": "/tmp"}]
    container = {
        "name": "gateway", "image": s.gateway_image, "imagePullPolicy": "Always",
        "command": ["zooter"], "args": args, "env": env,
        "ports": [{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
        # Readiness is /health itself: ready while at least one candidate the router chooses answers.
        # (each probe asks every upstream, an OpenAI-compatible provider's /models included, 2 s at most)
        "readinessProbe": _http_probe("/health", "http", 10, 3, timeout=5),
        "livenessProbe": _http_probe("/health?probe=live", "http", 10, 6),
        "startupProbe": _http_probe("/health?probe=live", "http", 2, 60),
        "resources": {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "1Gi"}},
        "securityContext": _container_security(), "volumeMounts": volume_mounts,
        # The endpoints controller needs a moment to stop sending new requests before uvicorn drains.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
    }
    init = {"name": "bundle", "image": bundle_image, "imagePullPolicy": "Always",
            "command": ["cp", "-R", "/bundle/.", "/out/"],
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "500m", "memory": "128Mi"}},
            "securityContext": _container_security(), "volumeMounts": [{"name": "bundle", "mountPath": "/out"}]}
    pod = {
        "automountServiceAccountToken": False, "securityContext": _pod_security(),
        # Open streams may run to the gateway's --request-timeout (300 s) before the pod goes.
        "terminationGracePeriodSeconds": 320,
        "initContainers": [init], "containers": [container],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": {"labelSelector": {"matchLabels": labels},
                                                "topologyKey": "kubernetes.io/hostname"}}]}},
        "volumes": [{"name": "bundle", "emptyDir": {"sizeLimit": f"{bundle_size_mib}Mi"}},
                    {"name": "candidates", "configMap": {"name": "zooter-candidates"}},
                    {"name": "keys", "secret": {"secretName": GATEWAY_KEYS_SECRET, "defaultMode": 0o400,
                                                "items": [{"key": "api-keys", "path": "api-keys"}]}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
    }
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, ns, labels, _skip(**skips)),
                  "spec": {"replicas": s.gateway_replicas, "selector": {"matchLabels": labels},
                           "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                           "template": {"metadata": {"labels": labels}, "spec": pod}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, ns, labels),
               "spec": {"type": "ClusterIP", "selector": labels,
                        "ports": [{"name": "http", "port": GATEWAY_PORT, "targetPort": "http", "protocol": "TCP"}]}}
    pdb = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(name, ns, labels),
           "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}}}
    # In-flight requests say how busy a pod is (a stream waiting on tokens counts); CPU is the backstop
    # for routing, which is CPU-bound. The HPA takes the larger of the two.
    cpu = {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}
    hpa = _pods_hpa(name, ns, labels, s.gateway_replicas, s.gateway_max_replicas, IN_FLIGHT_METRIC,
                    str(s.in_flight_target), extra=[cpu])
    monitor = _pod_monitor(name, ns, labels, "http", authorization={
        "type": "Bearer", "credentials": {"name": GATEWAY_KEYS_SECRET, "key": "metrics-key"}})
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("zooter-candidates", ns, labels),
              "data": {"candidates.yaml": candidates_text}}
    dns = {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                   "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
           "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    egress = [dns]
    if triton_groups:
        egress.append({"to": [{"podSelector": {"matchLabels": {LABEL_COMPONENT: "candidate", LABEL_PART: "zooter"}}}],
                       "ports": [{"protocol": "TCP", "port": TRITON_GRPC}]})
    if external_ports:
        # OpenAI-compatible candidates are named by URL, and a NetworkPolicy cannot name hosts: their ports
        # are open to any address. docs/deploy.md says how to narrow this to the provider's ranges.
        egress.append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
                       "ports": [{"protocol": "TCP", "port": p} for p in external_ports]})
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(name, ns, labels),
              "spec": {"podSelector": {"matchLabels": labels}, "policyTypes": ["Ingress", "Egress"],
                       "ingress": [{"ports": [{"protocol": "TCP", "port": GATEWAY_PORT}]}], "egress": egress}}
    return {"gateway-deployment.yaml": deployment, "gateway-service.yaml": service, "gateway-pdb.yaml": pdb,
            "gateway-hpa.yaml": hpa, "gateway-podmonitor.yaml": monitor, "gateway-candidates-configmap.yaml": config,
            "gateway-networkpolicy.yaml": policy}


def triton_image(version: str) -> str:
    return f"nvcr.io/nvidia/tritonserver:{version}-trtllm-python-py3"


def triton_manifests(s: DeploySettings, group: TritonGroup) -> dict[str, dict]:
    ns, name = s.namespace, group.name
    labels = labels_for("candidate", name)
    restricted = f"{RESTRICTED_APIS}:{CONTROL_HEADER}=$(TRITON_CONTROL_KEY)"
    args = ["--model-repository=/models", "--model-control-mode=none",
            f"--http-port={TRITON_HTTP}", f"--grpc-port={TRITON_GRPC}", f"--metrics-port={TRITON_METRICS}",
            "--allow-metrics=true", "--allow-gpu-metrics=true",
            f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}",
            "--exit-timeout-secs=30"]
    container = {
        "name": "tritonserver", "image": triton_image(s.triton_version), "imagePullPolicy": "Always",
        "command": ["tritonserver"], "args": args,
        "env": [{"name": "HOME", "value": "/tmp"},
                {"name": "TRITON_CONTROL_KEY", "valueFrom": {"secretKeyRef": {"name": CONTROL_KEY_SECRET, "key": "control-key"}}}],
        "ports": [{"name": "http", "containerPort": TRITON_HTTP, "protocol": "TCP"},
                  {"name": "grpc", "containerPort": TRITON_GRPC, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": TRITON_METRICS, "protocol": "TCP"}],
        "startupProbe": _http_probe("/v2/health/ready", "http", PROBE_PERIOD, ENGINE_LOAD_SECONDS // PROBE_PERIOD),
        "readinessProbe": _http_probe("/v2/health/ready", "http", 5, 3),
        "livenessProbe": _http_probe("/v2/health/live", "http", 10, 6),
        "resources": {"requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": str(s.gpus)},
                      "limits": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": str(s.gpus)}},
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True},
                         {"name": "shm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    pod = {"automountServiceAccountToken": False, "securityContext": _pod_security(),
           "terminationGracePeriodSeconds": 60, "containers": [container],
           "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
           "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": f"{name}-models", "readOnly": True}},
                       # The python backend and TensorRT-LLM pass tensors through shared memory; a
                       # container's default /dev/shm is 64 MiB.
                       {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
                       {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]}
    skips = _skip(CKV_K8S_43="NVIDIA's image is named by its release tag (--triton-version)",
                  CKV_K8S_35="tritonserver takes the restricted APIs' key on its command line, which reads it "
                             "from this variable; it never leaves the pod")
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": _meta(name, ns, labels, {**skips, "zooter.dev/candidates": ",".join(group.candidates)}),
                  "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                           "template": {"metadata": {"labels": labels}, "spec": pod}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, ns, labels),
               "spec": {"type": "ClusterIP", "selector": labels,
                        "ports": [{"name": "grpc", "port": TRITON_GRPC, "targetPort": "grpc", "protocol": "TCP",
                                   "appProtocol": "grpc"}]}}
    # As in TensorRT-LLM's Triton autoscaling tutorial: add a server when requests wait in its queue as long
    # as they compute; scale down slowly, since a new pod needs its engine load again.
    behavior = {"scaleUp": {"stabilizationWindowSeconds": 60},
                "scaleDown": {"stabilizationWindowSeconds": 600, "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}]}}
    hpa = _pods_hpa(name, ns, labels, 1, s.candidate_max_replicas, QUEUE_COMPUTE_METRIC, s.queue_compute_target,
                    behavior=behavior)
    monitor = _pod_monitor(name, ns, labels, "metrics")
    return {f"{name}-deployment.yaml": deployment, f"{name}-service.yaml": service, f"{name}-hpa.yaml": hpa,
            f"{name}-podmonitor.yaml": monitor}


def candidates_policy(s: DeploySettings) -> dict:
    """Only the gateway reaches a candidate's gRPC port; Prometheus reaches its metrics port."""
    selector = {LABEL_COMPONENT: "candidate", LABEL_PART: "zooter"}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta("zooter-candidates", s.namespace, {LABEL_PART: "zooter"}),
            "spec": {"podSelector": {"matchLabels": selector}, "policyTypes": ["Ingress"],
                     "ingress": [
                         {"from": [{"podSelector": {"matchLabels": labels_for("gateway", "zooter-gateway")}}],
                          "ports": [{"protocol": "TCP", "port": TRITON_GRPC}]},
                         {"from": [{"namespaceSelector": {"matchLabels": {
                             "kubernetes.io/metadata.name": s.monitoring_namespace}}}],
                          "ports": [{"protocol": "TCP", "port": TRITON_METRICS}]}]}}


def adapter_rules(s: DeploySettings) -> dict:
    """prometheus-adapter's rules for both HPAs: in-flight requests per gateway pod, and Triton's queue time
    over compute time per pod (the rates of nv_inference_queue_duration_us and
    nv_inference_compute_infer_duration_us over a minute)."""
    pods = {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}}
    rules = {"rules": [
        {"seriesQuery": f'{IN_FLIGHT_METRIC}{{namespace!="",pod!=""}}', "resources": pods,
         "name": {"matches": f"^{IN_FLIGHT_METRIC}$", "as": IN_FLIGHT_METRIC},
         "metricsQuery": "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)"},
        {"seriesQuery": 'nv_inference_queue_duration_us{namespace!="",pod!=""}', "resources": pods,
         "name": {"matches": "^nv_inference_queue_duration_us$", "as": QUEUE_COMPUTE_METRIC},
         "metricsQuery": "sum(rate(nv_inference_queue_duration_us{<<.LabelMatchers>>}[1m])) by (<<.GroupBy>>)"
                         " / clamp_min(sum(rate(nv_inference_compute_infer_duration_us{<<.LabelMatchers>>}[1m]))"
                         " by (<<.GroupBy>>), 1)"}]}
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "adapter-config", "namespace": s.monitoring_namespace,
                         "labels": {LABEL_PART: "zooter"}},
            "data": {"config.yaml": dump(rules)}}


# --- container build files ---------------------------------------------------------------------------
# The folders pyproject.toml installs (its package-dir); the tests hold the two lists together.
PACKAGE_FOLDERS = ("zooter", "runtime", "serving", "convert", "training", "export", "servers", "bench", "triton_models")
SOURCE = "WORKDIR /src\nCOPY pyproject.toml README.md ./\n" + "".join(f"COPY {d} {d}\n" for d in PACKAGE_FOLDERS)
GATEWAY_DOCKERFILE = """\
# The gateway image: zooter with the `gateway` extra and the Triton gRPC client, no bundle (that comes from
# the bundle image through a volume). Build from a zooter checkout:
#   docker build -f {out}/build/gateway.Dockerfile -t {image} .
FROM python:3.12-slim
{source}RUN pip install --no-cache-dir '.[gateway]' 'tritonclient[grpc]>=2.40' \\
    && rm -rf /src \\
    && useradd --uid {uid} --user-group --no-create-home --shell /usr/sbin/nologin zooter
WORKDIR /
USER {uid}:{uid}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
EXPOSE {port}
HEALTHCHECK --interval=10s --timeout=3s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/health?probe=live', timeout=2)"]
ENTRYPOINT ["zooter"]
CMD ["gateway", "--help"]
"""

BUNDLE_DOCKERFILE = """\
# The bundle image: only the router bundle, copied by the gateway pod's init container into the volume the
# gateway reads (a ConfigMap holds 1 MiB; a bundle is tens of MB). Build from the bundle folder:
#   docker build -f {out}/build/bundle.Dockerfile -t {image} BUNDLE
FROM busybox:1.36.1
COPY --chown={uid}:{uid} . /bundle
USER {uid}:{uid}
# Nothing runs in it but `cp`: there is no service whose health to check.
HEALTHCHECK NONE
"""

TRITON_ROUTER_DOCKERFILE = """\
# syntax=docker/dockerfile:1
# The router inside Triton (the one-server shape, docs/triton.md): NVIDIA's TensorRT-LLM Triton image with
# zooter's runtime (numpy, onnxruntime, tokenizers) installed into the python backend's interpreter, and the
# repository from `zooter triton build` baked in. Build from a zooter checkout:
#   zooter triton build BUNDLE --candidates c.yaml --out REPO
#   docker build -f {out}/build/triton-router.Dockerfile --build-context repo=REPO -t zooter-triton:TAG .
# Run it with ZOOTER_CONTROL_KEY set (a Secret): the repository, logging and trace APIs need it.
ARG TRITON_VERSION={version}
FROM nvcr.io/nvidia/tritonserver:${{TRITON_VERSION}}-trtllm-python-py3
{source}# The python backend's stub runs the image's python3; newer images mark it externally managed.
ENV PIP_BREAK_SYSTEM_PACKAGES=1
RUN python3 -m pip install --no-cache-dir . && rm -rf /src
COPY --from=repo --chown=1000:1000 . /models
WORKDIR /
USER 1000:1000
EXPOSE {http} {grpc} {metrics}
HEALTHCHECK --interval=30s --timeout=3s CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{http}/v2/health/ready', timeout=2)"]
CMD ["sh", "-c", "exec tritonserver --model-repository=/models --model-control-mode=none --http-restricted-api={apis}:{header}=${{ZOOTER_CONTROL_KEY:?set ZOOTER_CONTROL_KEY}} --grpc-restricted-protocol={apis}:{header}=${{ZOOTER_CONTROL_KEY}}"]
"""


def build_files(s: DeploySettings, out: Path, bundle_image: str) -> dict[str, str]:
    return {"gateway.Dockerfile": GATEWAY_DOCKERFILE.format(source=SOURCE, out=out, image=s.gateway_image, uid=UID, port=GATEWAY_PORT),
            "bundle.Dockerfile": BUNDLE_DOCKERFILE.format(out=out, image=bundle_image, uid=UID),
            "triton-router.Dockerfile": TRITON_ROUTER_DOCKERFILE.format(
                source=SOURCE, out=out, version=s.triton_version, http=TRITON_HTTP, grpc=TRITON_GRPC, metrics=TRITON_METRICS,
                apis=RESTRICTED_APIS, header=CONTROL_HEADER)}


# --- the folder ----------------------------------------------------------------------------------------
MARKER = ".zooter-deploy"


def dump(doc) -> str:
    """YAML without anchors and aliases (the manifests share label dicts; some tools refuse aliases)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):
            return True

    return yaml.dump(doc, Dumper=Dumper, sort_keys=False)


def write_kubernetes(bundle: str | Path, candidates_file: str | Path, out: str | Path,
                     settings: DeploySettings | None = None) -> dict:
    """Write the Kustomize folder; returns {"out", "files", "groups": {service: [candidates]}}. A folder that
    exists is replaced only when this command wrote it."""
    s = settings or DeploySettings()
    s.check()
    out = Path(out)
    manifest = Manifest.read(bundle)
    candidates = load_candidates(candidates_file)
    groups, rewritten = plan(candidates, list(manifest.labels), str(candidates_file))
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise UserError(f"--out {out}: exists and was not written by zooter deploy; choose an empty or new folder")
    bundle_image = s.bundle_image or f"zooter-bundle:{manifest.router_id}"
    size_mib = max(64, 2 * manifest.size // (1 << 20) + 16)
    candidates_text = dump([c.to_json() for c in rewritten])
    upstream_envs = sorted({str(c.serve["api_key_env"]) for c in rewritten if c.serve.get("api_key_env")})
    docs = {"namespace.yaml": {"apiVersion": "v1", "kind": "Namespace",
                               "metadata": {"name": s.namespace, "labels": {LABEL_PART: "zooter"}}}}
    docs.update(gateway_manifests(s, candidates_text, upstream_envs, bundle_image, size_mib,
                                  _external_ports(rewritten), groups))
    for group in groups:
        docs.update(triton_manifests(s, group))
    if groups:
        docs["candidates-networkpolicy.yaml"] = candidates_policy(s)
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "namespace": s.namespace, "resources": list(docs)}

    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "build").mkdir(parents=True)
        (tmp / "prometheus-adapter").mkdir()
        for name, doc in docs.items():
            (tmp / name).write_text(dump(doc), encoding="utf-8")
        (tmp / "kustomization.yaml").write_text(
            "# Written by `zooter deploy kubernetes` (docs/deploy.md); apply with: kubectl apply -k .\n"
            + dump(kustomization), encoding="utf-8")
        (tmp / "candidates.yaml").write_text(candidates_text, encoding="utf-8")
        (tmp / "prometheus-adapter" / "config.yaml").write_text(
            "# prometheus-adapter's rules for the zooter HPAs: merge into your adapter's configuration.\n"
            + dump(adapter_rules(s)), encoding="utf-8")
        for name, text in build_files(s, out, bundle_image).items():
            (tmp / "build" / name).write_text(text, encoding="utf-8")
        (tmp / MARKER).write_text(f"zooter {__version__}\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MARKER)
    return {"out": str(out), "files": files, "groups": {g.name: g.candidates for g in groups},
            "bundle_image": bundle_image, "gateway_image": s.gateway_image}
