#!/usr/bin/env bash
# Stage 10: import both public data sets into the routing-data contract, split, and print their stats.
set -euo pipefail
: "${ZOOTER_DATA:?}" "${OUT:?}"
zooter data import scores "$ZOOTER_DATA/dcrouter/train.json" --out "$OUT/dcrouter.jsonl"
echo
zooter data import alpaca-eval "$ZOOTER_DATA/alpaca_eval" --out "$OUT/alpaca.jsonl"
echo
zooter data candidates "$ZOOTER_DATA/dcrouter/llm_candidates.json" --only "$OUT/dcrouter.jsonl" --out "$OUT/candidates.yaml"
zooter data split "$OUT/dcrouter.jsonl" --dev 0.1 --test 0.1 --seed 0 --out-prefix "$OUT/dcrouter"
