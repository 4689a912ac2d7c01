#!/usr/bin/env bash
# `make demo`: every stage of the product, end to end, on ../shared/data (override with ZOOTER_DATA).
# Stages run in order; each reads what the previous ones left in demo-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
export ZOOTER_DATA="${ZOOTER_DATA:-$(cd .. && pwd)/shared/data}"
export OUT="${OUT:-demo-out}"
mkdir -p "$OUT"
for stage in demo/[0-9][0-9]-*.sh; do
    echo
    echo "=================== ${stage#demo/} ==================="
    bash "$stage"
done
