"""zooter tag, train, eval, reproduce: tags, the router's training, its evaluation, the paper's Table 2."""

from __future__ import annotations

import json
import os
import sys

from zooter.runtime.errors import UserError


def register(sub) -> None:
    _register_tag(sub)
    _register_train(sub)
    _register_eval(sub)
    _register_reproduce(sub)


# --- tag --------------------------------------------------------------------------------------
def _register_tag(sub) -> None:
    p = sub.add_parser(
        "tag", help="add tags to routing data (k-means over encoder embeddings, or an LLM)",
        description="Add tags to a routing-data file, for tag-based label enhancement. The default tagger runs "
        "offline: it embeds every query with the encoder (mean pooling), clusters the embeddings with k-means "
        "(cosine) and tags each query with its --per-query nearest centroids as 'kmeans:<id>'. --centroids saves "
        "the centroids on first use and reuses them after, so dev/test files get the same tags. With --llm-url "
        "an OpenAI-compatible chat endpoint names 1-3 task tags per query instead ('llm:<tag>').")
    p.add_argument("file", help="routing data (JSONL)")
    p.add_argument("--out", required=True, help="where to write the tagged JSONL")
    p.add_argument("--k", type=int, default=16, help="number of k-means clusters (default 16)")
    p.add_argument("--per-query", type=int, default=2, help="tags per query: its nearest centroids (default 2)")
    p.add_argument("--replace", action="store_true", help="drop the rows' existing tags instead of adding to them")
    p.add_argument("--backbone", help="encoder folder for the embeddings (default: all-MiniLM-L6-v2)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per query for the embedding (default 128)")
    p.add_argument("--centroids", help=".npz file: load the centroids if it exists, else fit and save them there")
    p.add_argument("--seed", type=int, default=0, help="k-means initialisation seed (default 0)")
    p.add_argument("--llm-url", help="OpenAI-compatible base URL (e.g. http://localhost:8000/v1) for the LLM tagger")
    p.add_argument("--llm-model", default="default", help="model name sent to the LLM endpoint")
    p.add_argument("--llm-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key, if any")
    p.set_defaults(func=cmd_tag)


def cmd_tag(args) -> int:
    from zooter.training import tags
    from zooter.training.dataset import RoutingDataset

    data = RoutingDataset.load(args.file)
    if args.llm_url:
        new_tags = tags.llm_tags(data.queries, args.llm_url, args.llm_model, key_env=args.llm_key_env)
        summary = f"LLM tagger at {args.llm_url}"
    else:
        if args.k < 2 or not 1 <= args.per_query <= args.k:
            raise UserError(f"--k must be >= 2 and --per-query between 1 and --k (got k={args.k}, per-query={args.per_query})")
        new_tags, info = tags.kmeans_tags(data.queries, k=args.k, per_query=args.per_query, backbone=args.backbone,
                                          max_length=args.max_length, centroids=args.centroids, seed=args.seed)
        summary = f"k-means, k={info['k']}, {args.per_query} tag(s) a query, centroids {info['source']}"
    tagged = tags.with_tags(data, new_tags, replace=args.replace)
    tagged.save(args.out)
    counts = tags.tag_counts(tagged)
    print(f"tagged {len(tagged)} rows into {args.out} ({summary}); {len(counts)} distinct tags")
    for tag, n in sorted(counts.items(), key=lambda kv: -kv[1])[:20]:
        print(f"  {tag:<24} {n}")
    return 0


# --- train ------------------------------------------------------------------------------------
def add_training_flags(p) -> None:
    p.add_argument("--backbone", help="local Hugging Face encoder folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--tau", type=_tau, default="auto", metavar="auto|T",
                   help="softmax temperature of the rewards: a positive number, or auto (default): 0.1 x the median "
                        "spread of a training row's rewards (rewards in [0, 1] at tau 1 give near-flat targets)")
    p.add_argument("--beta", type=float, default=0.3, help="tag enhancement: s* = beta*s + (1-beta)*tag mean; 1 turns it off (default 0.3)")
    p.add_argument("--loss", choices=["kl", "hard"], default="kl", help="kl: distil s*(q); hard: cross entropy on the argmax (ablation)")
    p.add_argument("--epochs", type=int, help="epochs (default 40; 3 with --fine-tune)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-3; 5e-5 with --fine-tune)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per query (default 128)")
    p.add_argument("--batch-size", type=int, default=32, help="queries per step (default 32)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    p.add_argument("--warmup", type=float, default=0.1, help="warmup share of the steps (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, dropout and batch order (default 0)")
    p.add_argument("--fine-tune", action="store_true",
                   help="fine-tune the encoder with the head (the paper's way: 3 epochs, every layer, minutes per epoch "
                        "on a CPU). The default trains the head only, quantization-aware, on a frozen encoder cut to "
                        "--layers 2: it passes export's INT8 parity gate on every data set measured and routed better "
                        "on unseen queries (docs/training.md)")
    p.add_argument("--frozen", action="store_true", help="train the head only on a frozen encoder: the default (kept for scripts)")
    p.add_argument("--layers", type=int, help="keep only the backbone's first N transformer layers: a faster router "
                   "(default 2 for a head-only run, all with --fine-tune; docs/export-runtime.md)")
    p.add_argument("--train-layers", type=int, help="fine-tune only the top N transformer layers and the head "
                   "(implies --fine-tune; default: all)")
    p.add_argument("--int8-consistency", type=float, metavar="W",
                   help="head-only runs: weight of the term that makes the head decide alike from the INT8 encoder's "
                   "embeddings, so `zooter export --quantize int8` passes its parity gate (default 200; 0 turns it off)")
    p.add_argument("--encoder", choices=["transformer", "static"], default="transformer",
                   help="transformer: the backbone's first --layers layers (default); static: the backbone distilled "
                        "offline into one vector per token (model2vec, the `static` extra; or --backbone a model2vec "
                        "folder), averaged: routes in microseconds; head only, shipped in fp32 (docs/training.md)")
    p.add_argument("--cache", help="folder caching a head-only run's embeddings between runs")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--oof-folds", type=int, default=5, metavar="K",
                   help="head-only runs: fit the decision layer (expected rewards, guard, confidence) on K-fold "
                        "out-of-fold predictions of the training rows as well as the dev rows (default 5; 0: dev only)")


# A head-only run keeps the backbone's first 2 layers unless told otherwise: on dcrouter layers 1-6 routed
# alike (5-fold CV) while each layer costs about 2.5 ms of a 64-token INT8 call (docs/training.md).
HEAD_ONLY_LAYERS = 2


def _tau(value: str):
    import argparse
    import math

    if value == "auto":
        return value
    try:
        tau = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive number, got {value!r}") from None
    if not math.isfinite(tau) or tau <= 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive number, got {value!r}")
    return tau


def config_from(args, out: str, data: str, dev: str | None):
    from zooter.training.train import TrainConfig

    if not 0.0 <= args.beta <= 1.0:
        raise UserError(f"--beta must be in [0, 1], got {args.beta}")
    if args.oof_folds == 1 or args.oof_folds < 0:
        raise UserError(f"--oof-folds must be 0 or at least 2, got {args.oof_folds}")
    for flag in ("epochs", "max_length", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    fine_tune = args.fine_tune or args.train_layers is not None
    if fine_tune and args.frozen:
        raise UserError("--frozen trains the head only and --fine-tune (or --train-layers) trains the encoder: give one of them")
    if fine_tune and args.int8_consistency:
        raise UserError("--int8-consistency is for head-only runs (the INT8 encoder is built once, from the frozen "
                        "encoder); --fine-tune trains the encoder")
    layers = args.layers if args.layers is not None or fine_tune or args.encoder == "static" else HEAD_ONLY_LAYERS
    return TrainConfig(data=data, out=out, dev=dev, backbone=args.backbone, candidates=getattr(args, "candidates", None),
                       tau=args.tau, beta=args.beta, loss=args.loss, epochs=args.epochs, lr=args.lr,
                       max_length=args.max_length, batch_size=args.batch_size, weight_decay=args.weight_decay,
                       warmup=args.warmup, seed=args.seed, frozen=not fine_tune, layers=layers,
                       int8_consistency=args.int8_consistency, train_layers=args.train_layers,
                       cache=args.cache, threads=args.threads, oof_folds=args.oof_folds, encoder=args.encoder)


def _register_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a router from rewards (ZOOTER reward distillation)",
        description="Train the router: an encoder with a linear head over the candidates, distilled with "
        "KL(s* || softmax(logits)) where s*(q) is the tag-enhanced softmax of the rewards. By default only the "
        "head trains, quantization-aware, on the encoder's first 2 layers, and the head kept is its average over "
        "the second half of the epochs; --fine-tune trains the encoder too and keeps the epoch with the best dev "
        "routing reward. Writes RUN/ (encoder/, head.safetensors, run.json, config.json, "
        "curves.json) into .RUN.partial beside it and renames it into place when done, so an interrupted run "
        "never mixes with a finished one (--resume continues it from its last saved epoch; a run refused, or "
        "stopped before its first epoch was saved, leaves nothing). Multi-GPU: `accelerate launch -m zooter.cli train ...` or `torchrun --nproc-per-node N -m "
        "zooter.cli train ...`.")
    p.add_argument("--data", help="training data (JSONL)")
    p.add_argument("--dev", help="dev data: fits the decision layer, chooses the epoch with --fine-tune, and is export's parity "
                   "rows (default: 10%% of --data held out by query hash)")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--candidates", help="candidates.yaml (recorded in the run so eval and export find the costs)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of --out from its last epoch")
    p.add_argument("--force", action="store_true", help="replace the run already in --out (or an interrupted one)")
    p.add_argument("--keep-state", action="store_true", help="keep RUN/state.pt (optimizer state) after the run ends")
    add_training_flags(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from zooter.training.evaluate import reward_text
    from zooter.training.train import RunFolder, TrainConfig, train

    if args.resume and args.force:
        raise UserError("--resume continues a run and --force replaces it: give one of them")
    if args.resume:
        config = TrainConfig(**RunFolder.saved_config(args.out))
    else:
        if not args.data:
            raise UserError("--data is required (unless --resume)")
        if args.candidates:
            from zooter.serving.candidates import load_candidates

            load_candidates(args.candidates)  # fail now, not after training
        config = config_from(args, args.out, args.data, args.dev)
    config.keep_state = args.keep_state
    main_process = int(os.environ.get("RANK", "0")) == 0   # under torchrun / accelerate launch, one summary is enough
    try:
        info = train(config, resume=args.resume, force=args.force)
    except KeyboardInterrupt:
        if main_process:
            print(_interrupted(args.out), file=sys.stderr)
        return 130
    if not main_process:
        return 0
    dev, best, decision = info["dev"], info["best_single"], info["decision"]
    chosen = (f"head averaged over epochs {dev['averaged_epochs'][0]}-{dev['averaged_epochs'][1]}" if dev.get("averaged_epochs")
              else f"best epoch {dev['epoch']}")
    print(f"run written to {args.out} in {info['train_seconds']:.0f}s: tau {info['tau']:.4g} ({info['tau_rule']}), {chosen}, "
          f"dev routed reward {reward_text(dev['mean_reward'])} vs best single ({best['candidate']}) "
          f"{reward_text(dev['best_single_from_train'])}, oracle {reward_text(dev['oracle'])} (n={dev['n']})")
    fitted = decision["fitted_on"]
    print(f"decision layer on {fitted['rows']} held-out rows ({'dev + out-of-fold' if fitted['out_of_fold'] else 'dev'}): "
          f"leave {decision['anchor']} only when the expected gain is above {reward_text(decision['margin'], signed=True)}")
    return 0


def _interrupted(out: str) -> str:
    """What an interrupted `zooter train` leaves, and the command that goes on from there."""
    from zooter.training.train import RunFolder, epochs_saved

    folder = RunFolder.resumable(out)
    if folder is None:
        return "interrupted before the first epoch was saved: nothing to resume; run the same command to start again"
    return f"interrupted: {folder} keeps the run ({epochs_saved(folder)}); `zooter train --out {out} --resume` continues it"


# --- eval -------------------------------------------------------------------------------------
def _register_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a run or bundle against single candidates, oracle and random",
        description="Route every row of --data with a run folder or an exported bundle and score the choices: "
        "mean reward and cost of the router (the shipped rule, guard on) and of the unguarded router (argmax p), "
        "each single candidate, the best single (best on the TRAINING data), the oracle and random; router minus "
        "best single with a paired bootstrap 95% interval, gap closed, win/tie/loss, mean task rank per tag, "
        "calibration of the expected rewards (ECE, reliability plot), a tolerance sweep of the cost knob, and "
        "routing accuracy by reward entropy. Prints a table and writes --json (and PNG plots with --plots).")
    p.add_argument("router", metavar="RUN_OR_BUNDLE", help="run folder (run.json) or bundle (router.json)")
    p.add_argument("--data", required=True, help="evaluation data (JSONL); use rows never seen in training (eval warns, on stderr and "
                        "in the JSON's warnings, when it is the run's training or dev data or shares more than 5%% "
                        "of their queries)")
    p.add_argument("--candidates", help="candidates.yaml with costs (default: the one recorded in the run)")
    p.add_argument("--tolerance", type=float, default=0.0, metavar="X",
                   help="cost knob in reward units: the cheapest candidate expected within X of the choice (default 0)")
    p.add_argument("--lambda", dest="lam", type=float, default=0.0, metavar="X",
                   help="older cost knob: argmax p - X * cost / max(cost) (default 0)")
    p.add_argument("--best-single", help="override the best single candidate (when a bundle does not record it)")
    p.add_argument("--json", required=True, help="where to write the report")
    p.add_argument("--plots", help="folder for PNG plots")
    p.add_argument("--rmr", metavar="FILE", help="routing data for the RMR baseline (issue 6), scored on --data")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from zooter.training.evaluate import evaluate_router, format_table, reward_text

    from zooter.runtime.decision import check_weight

    check_weight(args.lam, "--lambda")
    check_weight(args.tolerance, "--tolerance")
    report = evaluate_router(args.router, args.data, candidates=args.candidates, lam=args.lam, tolerance=args.tolerance,
                             best_single=args.best_single, plots=args.plots)
    for warning in report["warnings"]:
        print(f"zooter eval: warning: {warning}", file=sys.stderr)
    if args.rmr:
        report["baselines"]["rmr"] = _rmr(args.data, args.rmr, report)
    from zooter.runtime.files import write_text_atomic

    write_text_atomic(json.dumps(report, indent=2) + "\n", args.json)
    print(format_table(report))
    if "rmr" in report["baselines"]:
        rmr = report["baselines"]["rmr"]
        print(f"RMR baseline: mean reward {reward_text(rmr.get('mean_reward'))}")
    print(f"report: {args.json}" + (f"; plots: {args.plots}" if args.plots else ""))
    return 0


def _rmr(data_path: str, rmr_path: str, report: dict) -> dict:
    """Reward-model ranking (issue 6): run every candidate, keep the answer a second reward model ranks best."""
    from zooter.training.dataset import RoutingDataset

    try:
        from zooter.training.rmr import rmr_baseline
    except ImportError as err:
        raise UserError(f"the RMR baseline is unavailable ({err})") from None
    costs = None
    # RMR pays for every candidate; its cost is only comparable to the router's in unit prices.
    if report.get("cost_unit") == "usd_per_mtok" and report.get("candidates_file"):
        from zooter.serving.candidates import costs_for, load_candidates

        costs = costs_for(load_candidates(report["candidates_file"]), list(report["baselines"]["per_candidate"]))
    return rmr_baseline(RoutingDataset.load(data_path), RoutingDataset.load(rmr_path), costs=costs)


# --- reproduce --------------------------------------------------------------------------------
def _register_reproduce(sub) -> None:
    p = sub.add_parser(
        "reproduce", help="the paper's Table 2 on your data: hard labels vs distillation vs tag enhancement",
        description="Train what `zooter train` with the same flags ships (`default`: auto tau, beta 0.3, the "
        "decision layer and its guard) and the paper's variants on one split and evaluate each on the same "
        "held-out rows: hard labels (beta=1), distillation beta=1, tag-enhanced beta=0.3, and a beta sweep. Without --test, the data "
        "is split 80/10/10 by query hash. --folds N instead cross-validates (each fold held out once; for small "
        "data such as AlpacaEval). Prints mean reward, gap closed and MTR per variant; writes DIR/table.json and "
        "DIR/reports/ (run folders are deleted once evaluated unless --keep-runs).")
    p.add_argument("--data", required=True, help="routing data (JSONL)")
    p.add_argument("--dev", help="dev data (default: split from --data)")
    p.add_argument("--test", help="held-out data (default: split from --data)")
    p.add_argument("--out", required=True, help="folder for the runs, reports and table.json")
    p.add_argument("--betas", default="0.1,0.5,0.7", help="extra beta values for the sweep (default 0.1,0.5,0.7)")
    p.add_argument("--folds", type=int, help="k-fold cross-validation instead of one split")
    p.add_argument("--candidates", help="candidates.yaml (costs in the reports)")
    p.add_argument("--keep-runs", action="store_true", help="keep every variant's run folder (each holds an encoder copy)")
    add_training_flags(p)
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args) -> int:
    from zooter.training.reproduce import reproduce

    try:
        betas = [float(b) for b in args.betas.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--betas must be comma-separated numbers, got {args.betas!r}") from None
    if args.folds is not None and args.folds < 2:
        raise UserError(f"--folds must be at least 2, got {args.folds}")
    base = config_from(args, args.out, args.data, args.dev)
    reproduce(base, out=args.out, test=args.test, betas=betas, folds=args.folds, candidates=args.candidates,
              keep_runs=args.keep_runs)
    return 0
