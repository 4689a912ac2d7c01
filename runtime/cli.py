"""Subcommands of `zooter` that belong to zooter.runtime: `route` and `bench` here, `serve` and `ask` in cli_serve.py."""

from __future__ import annotations

import sys


def register(sub) -> None:
    from zooter.runtime import cli_serve

    register_route_bench(sub)
    cli_serve.register(sub)


def register_route_bench(sub) -> None:
    p = sub.add_parser(
        "route",
        help="choose a candidate LLM for queries with a bundle (or a Triton server)",
        description="Route queries with BUNDLE (from `zooter export`): prints the chosen candidate, its "
        "probability and the latency per query. Queries come from the arguments, or one a line from stdin. "
        "With --triton URL, the queries go to a running `zooter serve` instead and no BUNDLE is given.",
    )
    p.add_argument("args", nargs="*", metavar="BUNDLE [TEXT ...]",
                   help="the bundle folder, then queries (none: read one a line from stdin)")
    p.add_argument("--json", action="store_true", help="one JSON object a line: candidate, confidence, probabilities, ranking, latency_ms")
    p.add_argument("--lambda", dest="lam", type=float, default=None, metavar="X",
                   help="cost weight of the decision (default: the bundle's; 0 = best predicted candidate)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="onnxruntime intra-op threads")
    p.add_argument("--triton", metavar="URL", help="route through a Triton server at URL instead of a local bundle")
    p.set_defaults(func=run_route)

    b = sub.add_parser(
        "bench",
        help="latency of a bundle vs PyTorch: cold start, p50/p95/p99, throughput by length and batch",
        description="Measure, side by side in one run, PyTorch eager (when the bundle's run is present), ONNX fp32 "
        "and the bundle's model: cold start; p50, p95, p99 and throughput for queries of about 16, 64, 256 and 512 "
        "tokens, for batches of 1, 8 and 32 (at 64 tokens), and for the given queries at their own lengths. "
        "Prints ratios against PyTorch. With --budget-ms, exits 1 when the bundle model's p99 on the queries "
        "exceeds the budget.",
    )
    b.add_argument("bundle", nargs="?", metavar="BUNDLE", help="bundle folder")
    b.add_argument("--bundle", dest="bundle_opt", metavar="BUNDLE", help="same as the positional BUNDLE")
    b.add_argument("--queries", metavar="FILE", help="queries: one a line, or routing JSONL (default: a built-in mix)")
    b.add_argument("--run", metavar="RUN", help="run folder for the PyTorch baseline (default: the one router.json names)")
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    b.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256, 512], metavar="T", help="query lengths in tokens")
    b.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], metavar="B", help="batch sizes (batches > 1 at 64 tokens)")
    b.add_argument("--iters", type=int, default=20, metavar="N", help="timed calls per engine and cell (default 20)")
    b.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed calls first (default 3)")
    b.add_argument("--threads", type=int, default=None, metavar="N", help="threads for onnxruntime and torch")
    b.add_argument("--budget-ms", type=float, default=None, metavar="X", help="fail when p99 latency exceeds X ms")
    b.add_argument("--json", dest="json_out", metavar="OUT", help="write the full report as JSON")
    b.add_argument("--plot", metavar="FILE", help="plot latency against tokens (PNG)")
    b.add_argument("--triton", metavar="URL", help="benchmark a Triton server at URL instead (needs --bundle)")
    b.set_defaults(func=run_bench_cmd)


def _lazy(module: str, name: str):
    import importlib

    from zooter.errors import UserError

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"--triton needs {module}.{name}, which is not available: {err}") from None


def _queries_from(args_texts: list[str]) -> list[str]:
    if args_texts:
        return args_texts
    if sys.stdin.isatty():
        from zooter.errors import UserError

        raise UserError("no query given: pass TEXT or pipe queries, one a line, on stdin")
    return [line.rstrip("\n") for line in sys.stdin if line.strip()]


def run_route(args) -> int:
    import json

    from zooter.errors import UserError

    if args.triton:
        route_via_triton = _lazy("zooter.runtime.triton_client", "route_via_triton")
        texts = _queries_from(args.args)
        for text, answer in zip(texts, route_via_triton(args.triton, texts)):
            print(json.dumps(answer) if args.json else f"{answer['candidate']}\t{text[:60]!r}")
        return 0
    if not args.args:
        raise UserError("give the BUNDLE folder first (or --triton URL)")
    from zooter.runtime.router import Router
    from zooter.runtime.tokenize import EmptyQueryError

    router = Router.load(args.args[0], threads=args.threads, lam=args.lam)
    status = 0
    for text in _queries_from(args.args[1:]):
        try:
            d = router.route(text)
        except EmptyQueryError as err:
            print(f"zooter route: error: {err}", file=sys.stderr)
            status = 2
            continue
        if args.json:
            print(json.dumps(d.to_json()))
        else:
            print(f"{d.candidate}\t{d.confidence:.3f}\t{d.latency_ms:.1f} ms\t{text[:60]!r}")
    return status


def run_bench_cmd(args) -> int:
    import json
    from pathlib import Path

    from zooter.errors import UserError

    bundle = args.bundle or args.bundle_opt
    if args.bundle and args.bundle_opt and args.bundle != args.bundle_opt:
        raise UserError("give BUNDLE once (positional or --bundle)")
    if bundle is None:
        raise UserError("give the BUNDLE folder")
    from zooter.runtime import bench

    queries = bench.read_queries(args.queries) if args.queries else None
    if args.triton:
        bench_triton = _lazy("zooter.runtime.triton_bench", "bench_triton")
        # bench_triton prints its own table; the full report goes to --json.
        bench_triton(args.triton, bundle, queries or bench.BUILTIN_QUERIES, args.json_out, threads=args.threads)
        return 0
    if args.iters < 1 or args.warmup < 0:
        raise UserError("--iters must be >= 1 and --warmup >= 0")
    if any(t < 3 for t in args.lengths) or any(b < 1 for b in args.batches):
        raise UserError("--lengths must be >= 3 tokens and --batches >= 1")
    report = bench.run_bench(bundle, queries, run=args.run, lengths=args.lengths, batches=args.batches,
                             iters=args.iters, warmup=args.warmup, threads=args.threads, with_torch=not args.no_torch)
    status = 0
    if args.budget_ms is not None:
        budget = bench.check_budget(report, args.budget_ms)
        status = 0 if budget["passed"] else 1
    print(bench.format_table(report))
    if args.budget_ms is not None:
        b = report["budget"]
        verdict = "within" if b["passed"] else "OVER"
        print(f"budget: {b['engine']} p99 {b['p99_ms']:.2f} ms on the given queries is {verdict} {b['ms']:g} ms")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        bench.plot(report, args.plot)
    return status
