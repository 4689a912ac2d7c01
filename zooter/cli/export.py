"""zooter export: a trained run becomes a bundle (ONNX, INT8 or fp16, behind the parity gate)."""

from __future__ import annotations

from zooter.runtime.errors import UserError


def register(sub) -> None:
    register_export(sub)
    register_gpu_check(sub)


def register_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained run to an ONNX bundle (fused, INT8 or fp16) behind a parity gate",
        description="Export RUN (a training run folder) to BUNDLE: ONNX through optimum, ONNX Runtime transformer "
        "fusions, then dynamic INT8 (CPU) or fp16 (GPU) or neither. The exported model is checked against the "
        "PyTorch model on the run's dev rows (or --parity-data), both deciding by the rule the bundle ships (guard "
        "and tolerance included): the export fails (exit 2) when fewer than 99% of the clear decisions agree or "
        "the routed reward moves by more than 0.003, unless --allow-drift (docs/export-runtime.md). The bundle holds the model, tokenizer.json and router.json (labels, max_length, "
        "checksums, quantization, costs, provenance, parity, evaluation).",
    )
    p.add_argument("run", metavar="RUN", help="training run folder (encoder/, head.safetensors, run.json)")
    p.add_argument("--out", required=True, metavar="BUNDLE", help="bundle folder to write")
    p.add_argument("--quantize", choices=("int8", "fp16", "none"), default="int8",
                   help="int8: dynamic INT8 for CPUs (default); fp16: half-precision weights for GPU targets; none: fp32")
    p.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (default: optimum's for the backbone)")
    p.add_argument("--parity-data", metavar="FILE",
                   help="validation queries for the parity check: one a line, or routing JSONL (default: the run's dev rows)")
    p.add_argument("--parity-n", type=int, default=1000, metavar="N", help="check at most N queries (default 1000)")
    p.add_argument("--allow-drift", action="store_true", help="write the bundle even when the parity gate fails")
    p.add_argument("--candidates", metavar="YAML", help="candidates file whose costs go into the bundle (default: the one the run recorded)")
    p.add_argument("--tolerance", type=float, default=0.0, metavar="X",
                   help="default cost knob, in reward units: choose the cheapest candidate expected within X of the "
                        "router's choice (default 0: the choice itself; needs costs)")
    p.add_argument("--lambda", dest="lam", type=float, default=0.0, metavar="X",
                   help="older cost knob kept for compatibility: argmax p - X * cost / max(cost), >= 0 (default 0)")
    p.add_argument("--arch", default="auto", choices=("auto", "avx512_vnni", "avx512", "avx2", "arm64"),
                   help="INT8 kernel config for the target CPU (default: this machine's)")
    p.add_argument("--keep-fp32", action="store_true", help="also ship the fused fp32 model.onnx (bench and GPU use it)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--json", action="store_true", help="print router.json instead of the summary")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    import json

    from zooter.export.bundle import export_bundle

    if args.parity_n < 1:
        raise UserError("--parity-n must be at least 1")
    manifest = export_bundle(args.run, args.out, quantize=args.quantize, opset=args.opset, parity_data=args.parity_data,
                             allow_drift=args.allow_drift, candidates=args.candidates, lam=args.lam,
                             tolerance=args.tolerance, parity_n=args.parity_n, arch=args.arch, keep_fp32=args.keep_fp32, force=args.force,
                             log=(lambda *a: None) if args.json else print)
    if args.json:
        print(json.dumps(manifest.to_json(), indent=2))
        return 0
    parity = manifest.parity
    print(f"parity vs PyTorch on {parity['n']} queries ({parity['data']}), deciding by the shipped rule:")
    for name, p in ((parity["model"], parity), ("fp32", parity["fp32"])):
        line = (f"  {name:>5}: clear decisions agree {p['clear_agreement']:.2%} ({p['clear_share']:.0%} are clear), "
                f"all decisions {p['decision_agreement']:.2%}, expected regret {p['expected_regret']:+.4f}")
        if "routed_reward" in p:
            r = p["routed_reward"]
            line += f", routed reward {r['exported']:.4f} vs {r['pytorch']:.4f} ({r['difference']:+.4f})"
        print(line)
    if not parity["passed"]:
        print("WARNING: the parity gate failed; written anyway (--allow-drift)")
    print("files: " + ", ".join(f"{n} ({e['bytes'] / 1e6:.1f} MB)" for n, e in manifest.files.items())
          + f"; total {manifest.size / 1e6:.1f} MB")
    return 0


def register_gpu_check(sub) -> None:
    p = sub.add_parser(
        "gpu-check", help="the GPU path in one go: fp16 bundle, CUDA/TensorRT providers, a GPU Triton repository",
        description="On a machine with an NVIDIA GPU: export RUN to an fp16 bundle, route with the CUDA and TensorRT "
        "execution providers (decisions against the CPU, latency tables), build a GPU Triton repository (onnxruntime "
        "backend, KIND_GPU, TensorRT accelerator), serve it and time routing through it. Without a GPU, or with "
        "--dry-run, it builds and checks everything that needs no GPU (the fp16 bundle, every config.pbtxt) and "
        "lists the commands the GPU steps would run. Writes OUT/gpu-check.json.")
    p.add_argument("--run", required=True, metavar="RUN", help="training run folder to export")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the fp16 bundle, the repository and the report")
    p.add_argument("--queries", metavar="FILE", help="queries to route (default: a built-in mix)")
    p.add_argument("--iters", type=int, default=20, metavar="N", help="timed calls per latency cell (default 20)")
    p.add_argument("--dry-run", action="store_true", help="check configs and list the GPU steps without running them")
    p.set_defaults(func=cmd_gpu_check)


def cmd_gpu_check(args) -> int:
    from zooter.bench.gpu_check import run_gpu_check
    from zooter.runtime.queries import read_query_texts

    if args.iters < 1:
        raise UserError("--iters must be at least 1")
    check = run_gpu_check(args.run, args.out, read_query_texts(args.queries) if args.queries else None,
                          dry_run=True if args.dry_run else None, iters=args.iters)
    print("\n".join(check.lines()))
    print(f"report: {check.out / 'gpu-check.json'}")
    return 1 if any(s.status == "failed" for s in check.steps) else 0
