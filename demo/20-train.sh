#!/usr/bin/env bash
# Stage 20: train the shipped router on the dcrouter train split, evaluate it on the held-out test split
# (table with the bootstrap interval, calibration, plots), then the paper's Table 2 beside the shipped
# configuration (the `default` row) by 5-fold cross-validation on dcrouter and on the AlpacaEval pool.
set -euo pipefail
: "${ZOOTER_DATA:?}" "${OUT:?}"
export HF_HUB_OFFLINE=1

# --frozen: on 2 shared CPU cores full fine-tuning takes 25-40 minutes and measured no better than the
# head-only router on dev (docs/training.md); the run folder is the same format, so export is unchanged.
# --layers 2: MiniLM's first two layers route as well as all six (docs/training.md) at a third of the
# latency. --frozen trains quantization-aware by default (the head also sees the INT8 encoder's
# embeddings), and fits the decision layer (expected rewards, guard, confidence) on out-of-fold rows.
# Embeddings are cached per query (and per encoder depth) in $OUT/embeddings: the reproduction below,
# same configuration, reuses them.
zooter train --data "$OUT/dcrouter.train.jsonl" --dev "$OUT/dcrouter.dev.jsonl" \
    --candidates "$OUT/candidates.yaml" --out "$OUT/run" --frozen --layers 2 --cache "$OUT/embeddings" --force

echo
echo "--- the router on the held-out test split (queries never seen in training) ---"
zooter eval "$OUT/run" --data "$OUT/dcrouter.test.jsonl" --candidates "$OUT/candidates.yaml" \
    --json "$OUT/eval.json" --plots "$OUT/plots"

echo
echo "--- dcrouter, 5-fold cross-validation: what train ships (default) beside the paper's Table 2 ---"
echo "    (all 5,608 rows each held out once: far less noise than one 543-row test split)"
zooter reproduce --data "$OUT/dcrouter.jsonl" --folds 5 --betas "" --frozen --layers 2 --cache "$OUT/embeddings" \
    --candidates "$OUT/candidates.yaml" --out "$OUT/reproduce-dcrouter"

echo
echo "--- AlpacaEval pool: 805 queries, 5-fold cross-validation, same configuration ---"
zooter reproduce --data "$OUT/alpaca.jsonl" --folds 5 --betas "" --frozen --layers 2 --cache "$OUT/embeddings" \
    --out "$OUT/reproduce-alpaca"
