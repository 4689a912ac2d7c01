"""zooter data import|stats|candidates|split|dedupe: the routing-data contract and public importers."""

from __future__ import annotations


def register(sub) -> None:
    data = sub.add_parser(
        "data",
        help="import, inspect, split and de-duplicate routing data",
        description="The routing-data contract: one JSON object a line, "
        '{"id", "query", "rewards": {candidate: float|null}, "tags": [...], "responses"?: {...}, "source"}. '
        "A null reward means 'not scored' and is never read as zero.",
    )
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    dsub.required = True

    p = dsub.add_parser("import", help="convert public routing data into the contract",
                        description="Convert public routing data into a routing-data JSONL file.")
    p.add_argument("kind", choices=["alpaca-eval", "scores", "jsonl"],
                   help="alpaca-eval: an AlpacaEval checkout (SRC/results/<model>/weighted_alpaca_eval_gpt4_turbo/"
                   "annotations.json; reward = preference - 1). scores: a JSON list of {question, scores, "
                   "cluster_id?, task?, tags?} (LLMRouter/dcrouter). jsonl: the contract itself, validated.")
    p.add_argument("src", help="the source folder or file")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--models", help="alpaca-eval only: comma-separated models to keep (default: every model present)")
    p.add_argument("--candidates", help="jsonl only: candidates file (YAML); rewards for other names are an error")
    p.set_defaults(func=cmd_import)

    p = dsub.add_parser("stats", help="rows, candidates, per-candidate means, best single, oracle, tags",
                        description="Summarise a routing-data file: per-candidate mean reward and coverage, the best "
                        "single candidate, the oracle (per-query best) mean, random, and tag counts.")
    p.add_argument("file", help="routing-data JSONL file")
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.set_defaults(func=cmd_stats)

    p = dsub.add_parser("candidates", help="build a candidates file (YAML) from a price list",
                        description="Turn LLMRouter's llm_candidates.json ({model: {input_price, output_price}}, USD "
                        "per million tokens) into a candidates file. Add `serve` entries by hand to make candidates "
                        "callable (see README).")
    p.add_argument("prices", help="price list JSON")
    p.add_argument("--out", required=True, help="output candidates.yaml")
    p.add_argument("--only", help="routing-data file: keep only candidates that appear in it")
    p.set_defaults(func=cmd_candidates)

    p = dsub.add_parser("split", help="deterministic train/dev/test split by query hash",
                        description="Split by a hash of the normalised query text, so one query never lands in two "
                        "splits and the same seed always gives the same split. Writes PREFIX.train.jsonl, "
                        "PREFIX.dev.jsonl and PREFIX.test.jsonl.")
    p.add_argument("file", help="routing-data JSONL file")
    p.add_argument("--dev", type=float, default=0.1, help="dev fraction (default 0.1)")
    p.add_argument("--test", type=float, default=0.1, help="test fraction (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="hash seed (default 0)")
    p.add_argument("--out-prefix", required=True, help="output prefix, e.g. data/dcrouter")
    p.set_defaults(func=cmd_split)

    p = dsub.add_parser("dedupe", help="drop rows whose query also occurs in another file",
                        description="Remove from A every row whose normalised query occurs in B (for example a "
                        "test set that repeats training queries).")
    p.add_argument("file", metavar="A", help="routing-data JSONL file to clean")
    p.add_argument("--against", required=True, metavar="B", help="routing-data JSONL file whose queries are removed from A")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.set_defaults(func=cmd_dedupe)


def _candidate_names(path):
    if not path:
        return None
    from zooter.serving.candidates import load_candidates

    return [c.name for c in load_candidates(path)]


def cmd_import(args) -> int:
    from zooter.runtime.errors import UserError
    from zooter.training import importers, stats

    if args.models and args.kind != "alpaca-eval":
        raise UserError("--models applies to alpaca-eval only")
    if args.kind == "alpaca-eval":
        models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
        data = importers.import_alpaca_eval(args.src, models)
    elif args.kind == "scores":
        data = importers.import_scores(args.src)
    else:
        data = importers.import_jsonl(args.src, _candidate_names(args.candidates))
    data.save(args.out)
    print(f"wrote {args.out}")
    print(stats.format_stats(dict(stats.data_stats(data), path=args.out)))
    return 0


def cmd_stats(args) -> int:
    import json

    from zooter.training.dataset import RoutingDataset
    from zooter.training.stats import data_stats, format_stats

    result = data_stats(RoutingDataset.load(args.file))
    print(json.dumps(result, indent=2) if args.json else format_stats(result))
    return 0


def cmd_candidates(args) -> int:
    from zooter.serving.candidates import from_prices, save_candidates
    from zooter.training.dataset import RoutingDataset

    candidates = from_prices(args.prices)
    if args.only:
        keep = set(RoutingDataset.load(args.only).candidates)
        candidates = [c for c in candidates if c.name in keep]
    save_candidates(candidates, args.out)
    print(f"wrote {args.out}: {len(candidates)} candidates")
    return 0


def cmd_split(args) -> int:
    from zooter.runtime.errors import UserError
    from zooter.training.dataset import RoutingDataset
    from zooter.training.splits import split

    data = RoutingDataset.load(args.file)
    try:
        parts = split(data, args.dev, args.test, args.seed)
    except ValueError as err:
        raise UserError(str(err)) from None
    for name, part in parts.items():
        path = f"{args.out_prefix}.{name}.jsonl"
        if len(part):
            part.save(path)
        print(f"{name:5s} {len(part):6d} rows -> {path if len(part) else '(empty, not written)'}")
    return 0


def cmd_dedupe(args) -> int:
    from zooter.training.dataset import RoutingDataset
    from zooter.training.splits import dedupe

    data = RoutingDataset.load(args.file)
    kept, removed = dedupe(data, RoutingDataset.load(args.against))
    kept.save(args.out)
    print(f"removed {removed} of {len(data)} rows whose query occurs in {args.against}; wrote {len(kept)} to {args.out}")
    return 0
