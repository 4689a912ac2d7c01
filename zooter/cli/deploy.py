"""zooter deploy kubernetes: the cluster shape as a Kustomize folder (docs/deploy.md)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    deploy = sub.add_parser("deploy", help="deployment files for a cluster (Kubernetes)")
    dsub = deploy.add_subparsers(dest="target", metavar="TARGET")
    dsub.required = True
    p = dsub.add_parser(
        "kubernetes", help="a Kustomize folder: gateway replicas routing in process, one Triton per candidate group",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write DIR from the bundle and the candidates file: the gateway (Deployment, Service, "
                    "PodDisruptionBudget, HPA on in-flight requests, PodMonitor, the candidates file rewritten to "
                    "the in-cluster Services), one TensorRT-LLM Triton Deployment + Service + HPA + PodMonitor per "
                    "candidate group (the candidates sharing a triton_url host), NetworkPolicies, the "
                    "prometheus-adapter rules and the container build files. Every candidate needs a serve entry.",
        epilog="Then: build the images (DIR/build), create the Secrets, kubectl apply -k DIR. See docs/deploy.md.")
    p.add_argument("--bundle", required=True, metavar="B", help="bundle folder (from `zooter export`)")
    p.add_argument("--candidates", required=True, metavar="FILE",
                   help="candidates YAML, each with serve.triton_model (+ triton_url) or serve.openai_base_url")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (replaced if zooter deploy wrote it)")
    p.add_argument("--namespace", default="zooter", metavar="NS", help="Kubernetes namespace (default zooter)")
    p.add_argument("--gateway-image", default=None, metavar="IMAGE",
                   help="gateway image with a fixed tag (default zooter-gateway:<zooter version>)")
    p.add_argument("--bundle-image", default=None, metavar="IMAGE",
                   help="bundle image (default zooter-bundle:<first 12 of the bundle's manifest_sha256>)")
    p.add_argument("--triton-version", default="25.01", metavar="YY.MM",
                   help="NGC release of nvcr.io/nvidia/tritonserver:<YY.MM>-trtllm-python-py3 (default 25.01)")
    p.add_argument("--gateway-replicas", type=int, metavar="N", default=2, help="gateway replicas, and the HPA's minimum (>= 2)")
    p.add_argument("--gateway-max-replicas", type=int, metavar="N", default=10, help="the gateway HPA's maximum (default 10)")
    p.add_argument("--in-flight-target", type=int, metavar="N", default=64,
                   help="average in-flight requests per gateway pod the HPA aims at (default 64; docs/deploy.md derives it)")
    p.add_argument("--gpus", type=int, metavar="N", default=1, help="nvidia.com/gpu per Triton pod (default 1)")
    p.add_argument("--candidate-max-replicas", type=int, metavar="N", default=4, help="each Triton HPA's maximum (default 4)")
    p.set_defaults(func=cmd_deploy_kubernetes)


def cmd_deploy_kubernetes(args) -> int:
    from zooter.export.deploy import DeploySettings, write_kubernetes

    settings = DeploySettings(namespace=args.namespace, bundle_image=args.bundle_image,
                              triton_version=args.triton_version, gateway_replicas=args.gateway_replicas,
                              gateway_max_replicas=args.gateway_max_replicas, in_flight_target=args.in_flight_target,
                              gpus=args.gpus, candidate_max_replicas=args.candidate_max_replicas)
    if args.gateway_image:
        settings.gateway_image = args.gateway_image
    result = write_kubernetes(args.bundle, args.candidates, args.out, settings)
    print(f"wrote {len(result['files'])} files to {result['out']}")
    for service, names in result["groups"].items():
        print(f"  {service}: {', '.join(names)}")
    print(f"images: {result['gateway_image']}, {result['bundle_image']} (build files in {result['out']}/build)")
    return 0
