"""zooter candidates add|remove|pick|list|bench: a trained router's candidate set changed on its fixed encoder
(zooter.training.lifecycle), without training it again."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("candidates", help="add, remove, pick queries for or list a trained router's candidates (no retraining)",
                       description="Change a trained router's candidates on its fixed encoder: the heads and the "
                       "decision layer are refitted, the encoder is unchanged, and the result is a complete run that "
                       "`zooter export` takes like any other.")
    group = p.add_subparsers(dest="action", metavar="ACTION")
    group.required = True

    a = group.add_parser("add", help="add a candidate from its rewards on some queries",
                         description="Add a candidate from ROWS, its rewards on any subset of queries: the run's "
                         "training or dev queries (matched by text) get the new column; new queries join the training "
                         "rows and need a reward for at least one existing candidate too. Its rewards elsewhere are "
                         "estimated from the other candidates' rewards and the embeddings; the heads and the decision "
                         "layer are refitted. Only queries not in the embedding cache are embedded.")
    a.add_argument("run", help="a trained run folder")
    a.add_argument("--name", required=True, help="the new candidate's name (as in ROWS and the candidates file)")
    a.add_argument("--data", required=True, metavar="ROWS.jsonl", help="routing rows scoring the new candidate")
    a.add_argument("--out", required=True, metavar="RUN2", help="where to write the new run")
    _common(a)
    a.set_defaults(func=cmd_add)

    r = group.add_parser("remove", help="retire a candidate",
                         description="Drop a candidate and refit the decision layer (a frozen run's heads too); the "
                         "guard's anchor moves to the next best single candidate if it was the anchor.")
    r.add_argument("run", help="a trained run folder")
    r.add_argument("--name", required=True, help="the candidate to remove")
    r.add_argument("--out", required=True, metavar="RUN2", help="where to write the new run")
    _common(r)
    r.set_defaults(func=cmd_remove)

    b = group.add_parser("bench", help="leave-one-candidate-out benchmark of `add` (docs/training.md)",
                         description="For each --names candidate and each fold: a frozen router trained on every "
                         "candidate, and one with the candidate added from its rewards on k random training rows; "
                         "both route the fold's test rows with the shipped rule. Prints the curve over k with 95% "
                         "bootstrap intervals against the retrain and the best single candidate.")
    b.add_argument("--data", required=True, help="routing data (JSONL) scoring every candidate")
    b.add_argument("--names", required=True, help="comma-separated candidates to leave out and add back")
    b.add_argument("--k", default="50,100,250,500,all", help="labelled rows of the added candidate (default 50,100,250,500,all)")
    b.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    b.add_argument("--layers", type=int, default=2, help="encoder layers kept (default 2)")
    b.add_argument("--oof-folds", type=int, default=0, help="out-of-fold heads for the decision layer (default 0: dev rows)")
    b.add_argument("--cache", help="embedding cache folder")
    b.add_argument("--backbone", help="encoder folder (default all-MiniLM-L6-v2)")
    b.add_argument("--pick", choices=["random", "anchor"], default="random",
                   help="which k rows are labelled: random, or as `zooter candidates pick --how anchor` picks them (default random)")
    b.add_argument("--json", help="also write the table as JSON here")
    b.set_defaults(func=cmd_bench)

    k = group.add_parser("pick", help="which of the run's queries to label for a new candidate, within a budget",
                         description="Write BUDGET of the run's training and dev queries as routing rows with NAME's "
                         "reward to fill in; label them, then `zooter candidates add --data` the file. The choice uses "
                         "only what the run knows before any label: at random (the default), or --how anchor: a "
                         "stratified sample, half where the router's anchor scored lowest, half among the other rows "
                         "(not better than random with the shipped rule: docs/training.md). Each row says its chance "
                         "to be picked (inclusion_probability); keep it: `add` weights the row by its inverse.")
    k.add_argument("run", help="a trained run folder")
    k.add_argument("--name", required=True, help="the new candidate's name")
    k.add_argument("--budget", required=True, type=int, help="how many queries to label")
    k.add_argument("--out", required=True, metavar="TO_LABEL.jsonl", help="where to write the queries")
    k.add_argument("--how", choices=["random", "anchor"], default="random", help="how to pick them (default random)")
    k.add_argument("--seed", type=int, default=0, help="seed of the random choice (default 0)")
    k.set_defaults(func=cmd_pick)

    ls = group.add_parser("list", help="a run's or bundle's candidates, how each entered, their dev figures")
    ls.add_argument("path", metavar="RUN_OR_BUNDLE")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_list)


def _common(p) -> None:
    p.add_argument("--candidates", help="candidates.yaml with a price for every candidate (recorded for export)")
    p.add_argument("--cache", help="embedding cache folder (default: the run's --cache)")
    p.add_argument("--force", action="store_true", help="replace RUN2 if it is a run already")


def cmd_add(args) -> int:
    from zooter.training.lifecycle import add_candidate

    info = add_candidate(args.run, args.name, args.data, args.out, candidates=args.candidates, cache=args.cache,
                         force=args.force)
    entered = info["lifecycle"]["entered"][args.name]
    print(f"added {args.name} to {args.run} on {entered['train']} training + {entered['dev']} dev rows "
          f"({entered['new_queries']} new queries) -> {args.out}: dev routed reward {info['dev']['mean_reward']:.4f}, "
          f"anchor {info['best_single']['candidate']} ({info['add_seconds']} s)")
    return 0


def cmd_pick(args) -> int:
    from zooter.training.lifecycle import pick_queries

    got = pick_queries(args.run, args.name, args.budget, args.out, seed=args.seed, how=args.how)
    how = "at random" if got["how"] == "random" else f"half where the anchor {got['anchor']} scored lowest, half among the others"
    print(f"picked {got['rows']} of {got['of']} queries of {args.run} for {args.name} ({how}) -> {args.out}; fill in "
          f"{args.name}'s rewards, then `zooter candidates add`")
    return 0


def cmd_remove(args) -> int:
    from zooter.training.lifecycle import remove_candidate

    info = remove_candidate(args.run, args.name, args.out, candidates=args.candidates, cache=args.cache,
                            force=args.force)
    print(f"removed {args.name} from {args.run} -> {args.out}: {len(info['labels'])} candidates, "
          f"anchor {info['best_single']['candidate']}, dev routed reward {info['dev']['mean_reward']:.4f}")
    return 0


def cmd_list(args) -> int:
    from zooter.training.lifecycle import describe

    rows = describe(args.path)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len("candidate"), *(len(r["name"]) + 9 * r["anchor"] for r in rows))
    print(f"{'candidate':{width}} {'entered':22} {'dev mean':>9} {'scored':>7} {'chosen':>7}")
    for r in rows:
        mean = r.get("dev_mean_reward")
        print(f"{r['name'] + (' (anchor)' if r['anchor'] else ''):{width}} {r['entered']:22} "
              f"{'-' if mean is None else f'{mean:.4f}':>9} {r.get('dev_scored', '-')!s:>7} "
              f"{'-' if 'dev_chosen' not in r else format(r['dev_chosen'], '.1%'):>7}")
    return 0



def cmd_bench(args) -> int:
    from zooter.runtime.errors import UserError
    from zooter.training.lifecycle_bench import ALL, bench, format_table

    try:
        ks = [ALL if k.strip() == "all" else int(k) for k in args.k.split(",") if k.strip()]
    except ValueError:
        raise UserError(f"--k: expected comma-separated row counts or 'all', got {args.k!r}") from None
    if not ks or any(k is not ALL and k < 2 for k in ks):
        raise UserError(f"--k: each count must be at least 2, got {args.k!r}")
    if args.folds < 2:
        raise UserError(f"--folds must be at least 2, got {args.folds}")
    table = bench(args.data, [n.strip() for n in args.names.split(",") if n.strip()], ks, folds=args.folds,
                  layers=args.layers, cache=args.cache, backbone=args.backbone, oof_folds=args.oof_folds, picked=args.pick)
    print(format_table(table))
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
    return 0
