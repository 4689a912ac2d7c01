#!/usr/bin/env bash
# Stage 20: train the default router on the dcrouter train split (checkpoint chosen on dev), evaluate it
# on the held-out test split (report, table, plots), then the paper's Table 2 in frozen-encoder mode on
# the same split and a 5-fold cross-validation on AlpacaEval.
set -euo pipefail
: "${ZOOTER_DATA:?}" "${OUT:?}"
export HF_HUB_OFFLINE=1

zooter train --data "$OUT/dcrouter.train.jsonl" --dev "$OUT/dcrouter.dev.jsonl" \
    --candidates "$OUT/candidates.yaml" --out "$OUT/run"

echo
echo "--- the router on the held-out test split (queries never seen in training) ---"
zooter eval "$OUT/run" --data "$OUT/dcrouter.test.jsonl" --candidates "$OUT/candidates.yaml" \
    --json "$OUT/eval.json" --plots "$OUT/plots"

echo
echo "--- paper's Table 2 on dcrouter (frozen encoder, head-only variants; same split) ---"
zooter reproduce --data "$OUT/dcrouter.train.jsonl" --dev "$OUT/dcrouter.dev.jsonl" \
    --test "$OUT/dcrouter.test.jsonl" --frozen --out "$OUT/reproduce-dcrouter"

echo
echo "--- AlpacaEval pool: 805 queries, 5-fold cross-validation (frozen encoder) ---"
zooter reproduce --data "$OUT/alpaca.jsonl" --folds 5 --frozen --betas "" --out "$OUT/reproduce-alpaca"
