"""zooter route, zooter bench: choose candidates with a bundle (or through Triton) and time it."""

from __future__ import annotations

import sys

from zooter.runtime.errors import UserError

# The plain output's columns, named by its first line. Through Triton there is no per-query latency:
# one request carries many queries. --json uses the same keys (with `line` in place of the query).
COLUMNS = ("candidate", "expected_reward", "confidence", "latency_ms", "query")
TRITON_COLUMNS = tuple(c for c in COLUMNS if c != "latency_ms")


def register(sub) -> None:
    p = sub.add_parser(
        "route",
        help="choose a candidate LLM for queries with a bundle (or a Triton server)",
        # argparse would show the one positional list as "[BUNDLE [TEXT ...] ...]"
        usage="%(prog)s [-h] [--json] [--tolerance X] [--lambda X] [--threads N] BUNDLE [TEXT ...]\n"
              "       %(prog)s [-h] [--json] --triton URL [TEXT ...]",
        description="Route queries with BUNDLE (from `zooter export`). Queries come from the arguments, or one a "
        "line from stdin (bytes that are not UTF-8 are replaced, and the query is answered). With --triton URL, "
        "the queries go to a running `zooter serve` instead and no BUNDLE is given. Prints a header line, then "
        "one tab-separated line a query, in input order: candidate (the choice), expected_reward (its expected "
        "reward, in the training rewards' units), confidence (0-1), latency_ms (not through Triton) and query "
        "(its first 60 characters, quoted). A blank or bad query gets the line 'error<TAB>MESSAGE<TAB>(line N)' "
        "in its place and exit status 2 at the end.",
    )
    p.add_argument("args", nargs="*", metavar="BUNDLE [TEXT ...]",
                   help="the bundle folder, then queries (none: read one a line from stdin)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object a line: line, candidate, confidence, probabilities, ranking, latency_ms "
                        "(or line and error)")
    p.add_argument("--tolerance", type=float, default=None, metavar="X",
                   help="cost knob in reward units: the cheapest candidate expected within X of the router's choice "
                        "(default: the bundle's, usually 0)")
    p.add_argument("--lambda", dest="lam", type=float, default=None, metavar="X",
                   help="older cost knob: argmax p - X * cost / max(cost), >= 0 (default: the bundle's)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="onnxruntime intra-op threads")
    p.add_argument("--triton", metavar="URL", help="route through a Triton server at URL instead of a local bundle")
    p.set_defaults(func=cmd_route, trailing="args")

    b = sub.add_parser(
        "bench",
        help="latency of a bundle vs PyTorch: cold start, p50/p95/p99, throughput by length and batch",
        description="Measure, side by side in one run, PyTorch eager (when the bundle's run is present), ONNX fp32 "
        "and the bundle's model: cold start; p50, p95, p99 and throughput for queries of about 16, 64, 256 and 512 "
        "tokens, for batches of 1, 8 and 32 (at 64 tokens; a batch as route_batch runs it, each query alone, beside "
        "the same model on one padded batch, whose decisions depend on the batch), and for the given queries at their own lengths. "
        "Prints ratios against PyTorch. With --budget-ms, exits 1 when the bundle model's p99 on the queries "
        "exceeds the budget. With --triton URL: routing latency through Triton against in-process instead; with "
        "--gateway: `zooter gateway` in front of a local stub against calling the stub directly; with "
        "--triton-floor: what a request through Triton's python backend costs before any routing.",
    )
    b.add_argument("bundle", nargs="?", metavar="BUNDLE", help="bundle folder")
    b.add_argument("--bundle", dest="bundle_opt", metavar="BUNDLE", help="same as the positional BUNDLE")
    b.add_argument("--queries", metavar="FILE", help="queries: one a line, or JSON lines with a query (default: a built-in mix)")
    b.add_argument("--run", metavar="RUN", help="run folder for the PyTorch baseline (default: the one router.json names)")
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    b.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256, 512], metavar="T", help="query lengths in tokens")
    b.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], metavar="B", help="batch sizes (batches > 1 at 64 tokens)")
    b.add_argument("--iters", type=int, default=20, metavar="N", help="timed calls per engine and cell (default 20)")
    b.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed calls first (default 3)")
    b.add_argument("--threads", type=int, default=None, metavar="N", help="threads for onnxruntime and torch")
    b.add_argument("--provider", action="append", metavar="NAME",
                   help="onnxruntime execution provider for the bundle's model, repeatable, in order of preference "
                        "(default: TensorRT, CUDA, CPU, whichever this onnxruntime has)")
    b.add_argument("--budget-ms", type=float, default=None, metavar="X", help="fail when p99 latency exceeds X ms")
    b.add_argument("--json", dest="json_out", metavar="OUT", help="write the full report as JSON")
    b.add_argument("--plot", metavar="FILE", help="plot latency against tokens (PNG)")
    b.add_argument("--triton", metavar="URL", help="benchmark a Triton server at URL instead (needs --bundle)")
    b.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], metavar="C",
                   help="with --triton or --gateway: concurrent clients per cell (default 1 8 32)")
    b.add_argument("--ttft", metavar="MODEL",
                   help="with --triton: time to first token through the zooter model against asking the candidate "
                        "model MODEL directly (streaming, gRPC), beside the in-process routing; the target is read "
                        "at the lowest --concurrency (docs/triton.md)")
    b.add_argument("--gateway", action="store_true",
                   help="benchmark `zooter gateway` in front of a local stub upstream against calling the upstream "
                        "directly (needs --bundle; docs/gateway.md)")
    b.add_argument("--triton-floor", action="store_true",
                   help="no bundle: start a private Triton with two probe models of zooter_route's interface (one "
                        "answers at once, one after --work-ms of CPU) and print what a request costs through the "
                        "python backend on this machine, before any routing (docs/triton.md)")
    b.add_argument("--work-ms", type=float, default=None, metavar="MS",
                   help="with --triton-floor: the busy probe's CPU time per request, more than 0 and at most 100 "
                        "(default 4, about one routing)")
    b.set_defaults(func=cmd_bench)


def _queries(texts: list[str]) -> list[tuple[int, str]]:
    """(line number, text): the arguments, else stdin one a line. Bytes that are not UTF-8 are replaced."""
    if texts:
        return list(enumerate(texts, start=1))
    if sys.stdin.isatty():
        raise UserError("no query given: pass TEXT or pipe queries, one a line, on stdin")
    return [(n, raw.decode("utf-8", errors="replace").rstrip("\r\n")) for n, raw in enumerate(sys.stdin.buffer, start=1)]


def _emit(args, line: int, text: str, answer: dict | None, error: str | None) -> None:
    import json

    if not args.json and not getattr(args, "header_printed", False):   # above the first line, if any
        print("\t".join(TRITON_COLUMNS if args.triton else COLUMNS), flush=True)
        args.header_printed = True
    if error is not None:
        print(json.dumps({"line": line, "error": error}) if args.json else f"error\t{error}\t(line {line})", flush=True)
        print(f"zooter route: line {line}: {error}", file=sys.stderr)
    elif args.json:
        print(json.dumps({"line": line, **answer}), flush=True)
    else:
        fields = [f"{answer[k]:.3f}" for k in ("expected_reward", "confidence") if k in answer]
        if "latency_ms" in answer:
            fields.append(f"{answer['latency_ms']:.1f}")
        print("\t".join([answer["candidate"], *fields, repr(text[:60])]), flush=True)


def cmd_route(args) -> int:
    from zooter.runtime.decision import check_weight

    if args.lam is not None:
        check_weight(args.lam, "--lambda")
    if args.tolerance is not None:
        check_weight(args.tolerance, "--tolerance")
    if args.triton:
        return _route_triton(args)
    if not args.args:
        raise UserError("give the BUNDLE folder first (or --triton URL)")
    from zooter.runtime.router import Router

    router = Router.load(args.args[0], threads=args.threads, lam=args.lam, tolerance=args.tolerance)
    status = 0
    for line, text in _queries(args.args[1:]):
        try:
            answer, error = router.route(text).to_json(), None
        except (TypeError, ValueError) as err:   # EmptyQueryError is a ValueError
            answer, error, status = None, str(err), 2
        _emit(args, line, text, answer, error)
    return status


def _route_triton(args) -> int:
    from zooter.serving.triton_client import TritonRequestError, check_text, route_via_triton

    if args.lam is not None or args.tolerance is not None:
        raise UserError("--lambda and --tolerance apply to a local bundle; a Triton repository has its rule built in "
                        "(zooter triton build --lambda/--tolerance)")
    queries, good, status = _queries(args.args), [], 0
    for line, text in queries:
        try:
            check_text(text)
            good.append((line, text))
        except (UserError, TypeError) as err:
            _emit(args, line, text, None, str(err).replace("query 0: ", ""))
            status = 2
    try:
        answers = route_via_triton(args.triton, [text for _, text in good]) if good else []
    except TritonRequestError as err:
        raise UserError(f"Triton: {err}") from None
    for (line, text), answer in zip(good, answers):
        _emit(args, line, text, answer, None)
    return status


def cmd_bench(args) -> int:
    """Check the flags of the mode asked for and hand it to zooter.bench, which prints the table."""
    if args.triton_floor:
        others = [flag for flag, given in (("BUNDLE", args.bundle or args.bundle_opt), ("--triton", args.triton),
                                           ("--gateway", args.gateway)) if given]
        if others:
            raise UserError(f"--triton-floor starts its own server and takes no {' or '.join(others)}")
        from zooter.bench.triton_floor import measure_floor

        measure_floor(4.0 if args.work_ms is None else args.work_ms, json_out=args.json_out)
        return 0
    if args.work_ms is not None:
        raise UserError("--work-ms goes with --triton-floor")
    bundle = args.bundle or args.bundle_opt
    if args.bundle and args.bundle_opt and args.bundle != args.bundle_opt:
        raise UserError("give BUNDLE once (positional or --bundle)")
    if bundle is None:
        raise UserError("give the BUNDLE folder")
    from zooter.bench.latency import BUILTIN_QUERIES, bench_bundle
    from zooter.runtime.queries import read_query_texts

    queries = read_query_texts(args.queries) if args.queries else None
    if any(c < 1 for c in args.concurrency):
        raise UserError("--concurrency takes positive numbers")
    if args.ttft and not args.triton:
        raise UserError("--ttft goes with --triton URL (the server whose zooter model and MODEL it times)")
    if args.ttft:
        from zooter.bench.triton import bench_ttft

        bench_ttft(args.triton, bundle, queries or BUILTIN_QUERIES, args.ttft, args.json_out, threads=args.threads,
                   concurrency=sorted(set(args.concurrency)))
        return 0
    if args.triton:
        from zooter.bench.triton import bench_triton

        bench_triton(args.triton, bundle, queries or BUILTIN_QUERIES, args.json_out, threads=args.threads,
                     concurrency=sorted(set(args.concurrency)), providers=args.provider)
        return 0
    if args.gateway:
        from zooter.bench.gateway import bench_gateway

        bench_gateway(bundle, queries or BUILTIN_QUERIES, args.json_out, concurrency=sorted(set(args.concurrency)))
        return 0
    if args.iters < 1 or args.warmup < 0:
        raise UserError("--iters must be >= 1 and --warmup >= 0")
    if any(t < 3 for t in args.lengths) or any(b < 1 for b in args.batches):
        raise UserError("--lengths must be >= 3 tokens and --batches >= 1")
    return bench_bundle(bundle, queries, run=args.run, torch=not args.no_torch, budget_ms=args.budget_ms,
                        json_out=args.json_out, plot=args.plot,
                        make_progress=lambda: _progress_bar(args.iters * (len(args.lengths) + len(args.batches))),
                        lengths=args.lengths, batches=args.batches, iters=args.iters, warmup=args.warmup,
                        threads=args.threads, providers=args.provider)


def _progress_bar(total: int):
    """A tqdm bar's update, when tqdm is installed (an app venv may not have it)."""
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return None
    return tqdm(total=total, desc="bench", unit="round", leave=False).update
