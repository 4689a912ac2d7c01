"""zooter generate, zooter score: collect every candidate's answers, then score them with a reward model."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="ask every candidate to answer every query (resumable; writes an answers file to score)",
        description="Ask every candidate in the candidates file to answer every query, through each candidate's "
        "`serve` entry (an OpenAI-compatible base URL, or a Triton model with the TensorRT-LLM ensemble I/O). "
        "Each finished (query, candidate) pair is appended at once to OUT's journal (OUT with suffix "
        ".pairs.jsonl); running the same command again asks only for pairs without an answer, including "
        "pairs that failed last time. OUT is rewritten from the journal when the run ends: routing-data rows "
        "with responses filled and rewards null, ready for `zooter score`.")
    p.add_argument("--queries", required=True,
                   help="one query a line; or JSONL/JSON with 'query' (or 'prompt', 'instruction', 'text', MT-Bench "
                        "'turns'), optional 'id' (or 'question_id') and 'tags' (or 'category')")
    p.add_argument("--candidates", required=True, help="candidates YAML; each asked candidate needs a serve entry")
    p.add_argument("--out", required=True, help="answers file to write (JSONL)")
    p.add_argument("--candidate", action="append", metavar="NAME",
                   help="ask only this candidate (repeatable); default: every candidate in the file")
    p.add_argument("--limit", type=int, help="only the first N queries")
    p.add_argument("--source", help="'source' of every row (default: the queries file's name without suffix)")
    p.add_argument("--max-tokens", type=int, default=512, help="answer length limit (default 512); answers cut there are reported")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the server's)")
    p.add_argument("--top-p", type=float, help="nucleus sampling (default: the server's)")
    p.add_argument("--concurrency", type=int, default=4,
                   help="requests in flight per candidate (default 4; a serve entry's max_concurrency overrides it)")
    p.add_argument("--retries", type=int, default=3, help="extra attempts after a failed call that may succeed (default 3)")
    p.add_argument("--backoff", type=float, default=1.0, help="first wait before a retry in seconds (default 1); doubles each time, with jitter")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one call may take (default 120)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "score",
        help="score each (query, answer) pair with a local Hugging Face reward model",
        description="Score every (query, response) pair with a sequence-classification reward model loaded from "
        "a local folder (e.g. OpenAssistant/reward-model-deberta-v3-large-v2, Skywork-Reward). Uses the model's "
        "chat template when it has one, otherwise the (query, answer) text pair. Batches by length, runs on the "
        "GPU when present, and resumes from OUT's journal (OUT with suffix .scores.jsonl). Writes routing data "
        "whose rewards are this model's scores (existing rewards are replaced), each row naming the model under "
        "'reward_model', and OUT with suffix .provenance.json. Nothing is downloaded: the folder must hold the "
        "model. For the paper's RMR baseline, score the same answers with a second model and pass that file to "
        "`zooter eval --rmr`.")
    p.add_argument("--data", required=True, help="answers file from `zooter generate`, or routing data with responses")
    p.add_argument("--reward-model", required=True, metavar="DIR", help="local Hugging Face model folder")
    p.add_argument("--out", required=True, help="routing data to write (JSONL)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per forward pass (default 16)")
    p.add_argument("--max-length", type=int,
                   help="tokens per pair (default: the model's limit, at most 4096); longer answers are shortened")
    p.add_argument("--device", default="auto", help="auto (default: cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="auto (default): bfloat16 (or float16) on GPU, float32 on CPU")
    p.add_argument("--label", type=int, help="which output is the reward, for a model with several outputs")
    p.add_argument("--name", help="reward model name recorded as provenance (default: the folder's name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_score)


def cmd_generate(args) -> int:
    import sys
    from pathlib import Path

    from zooter.runtime.errors import UserError
    from zooter.serving.candidates import load_candidates
    from zooter.serving.clients import Sampling
    from zooter.runtime.queries import read_queries
    from zooter.training.generate import RetryPolicy, generate, journal_path

    for flag, value in (("--max-tokens", args.max_tokens), ("--concurrency", args.concurrency)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.retries < 0 or args.backoff < 0 or args.timeout <= 0:
        raise UserError("--retries and --backoff must be >= 0 and --timeout > 0")
    queries, repeated = read_queries(args.queries)
    if args.limit is not None:
        queries = queries[: max(0, args.limit)]
    candidates = load_candidates(args.candidates)
    if args.candidate:
        known = {c.name for c in candidates}
        unknown = [n for n in args.candidate if n not in known]
        if unknown:
            raise UserError(f"--candidate {unknown} not in {args.candidates} (it has {sorted(known)})")
        candidates = [c for c in candidates if c.name in set(args.candidate)]
    unreachable = [c.name for c in candidates if not (c.serve.get("openai_base_url") or c.serve.get("triton_model"))]
    if unreachable:
        raise UserError(f"candidates {unreachable} have no serve entry (openai_base_url or triton_model) in "
                        f"{args.candidates}; add one, or pick the others with --candidate")
    if repeated:
        print(f"skipped {repeated} repeated lines of {args.queries}")
    sampling = Sampling(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, timeout_s=args.timeout)
    try:
        summary = generate(queries, candidates, args.out, sampling=sampling, concurrency=args.concurrency,
                           policy=RetryPolicy(retries=args.retries, backoff_s=args.backoff),
                           source=args.source if args.source is not None else Path(args.queries).stem,
                           progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"stopped: finished pairs are kept in {journal_path(args.out, 'pairs')}; "
              f"run the same command again to ask only the rest", file=sys.stderr)
        raise
    for line in summary.lines():
        print(line)
    print(f"wrote {args.out} (rewards null until `zooter score`); journal {summary.journal}")
    # Failed pairs are recorded, not fatal: exit 0 with the answers we have; 1 when nothing was answered at all.
    return 0 if summary.answered_total else 1


def cmd_score(args) -> int:
    from zooter.runtime.errors import UserError
    from zooter.training.rewards import RewardModel, score_file

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    model = RewardModel(args.reward_model, device=args.device, dtype=args.dtype, max_length=args.max_length,
                        label=args.label, name=args.name)
    summary = score_file(args.data, model, args.out, batch_size=args.batch_size, progress=not args.no_progress)
    for line in summary.lines():
        print(line)
    return 0
