#!/usr/bin/env bash
# Stage 30: export stage 20's trained run to an INT8 ONNX bundle behind the parity gate, route the
# MT-Bench first turns with the torch-free Router (choices per category), then the latency table.
set -euo pipefail
: "${ZOOTER_DATA:?}" "${OUT:?}"
export HF_HUB_OFFLINE=1
RUN="${RUN:-$OUT/run}"

# Parity is checked on the run's dev rows (the file training used), one query per call as Router.route
# runs it. The gate wants >= 99% of decisions unchanged; stage 20 trained the head quantization-aware,
# so no --allow-drift here. A second check on the held-out test rows prints the same figures.
zooter export "$RUN" --out "$OUT/bundle" --quantize int8 --candidates "$OUT/candidates.yaml" --force
echo
echo "--- parity on the held-out test rows (never used for training or checkpoint choice) ---"
zooter export "$RUN" --out "$OUT/bundle-heldout-check" --quantize int8 --candidates "$OUT/candidates.yaml" --force \
    --parity-data "$OUT/dcrouter.test.jsonl" --allow-drift | grep -A3 "parity vs"
rm -rf "$OUT/bundle-heldout-check"

echo
echo "--- MT-Bench first turns through zooter.runtime.Router (no torch) ---"
python - "$OUT/bundle" "$ZOOTER_DATA/mt_bench/question.jsonl" <<'PY'
import collections, json, sys
from zooter.runtime import Router

router = Router.load(sys.argv[1])
rows = [json.loads(line) for line in open(sys.argv[2], encoding="utf-8") if line.strip()]
decisions = router.route_batch([r["turns"][0] for r in rows])
by_category = collections.defaultdict(list)
for row, d in zip(rows, decisions):
    by_category[row["category"]].append(d)
print(f"{'category':<11} {'n':>3}  {'mean conf':>9}  choices")
for category, ds in by_category.items():
    counts = collections.Counter(d.candidate for d in ds).most_common()
    conf = sum(d.confidence for d in ds) / len(ds)
    print(f"{category:<11} {len(ds):>3}  {conf:>9.3f}  " + ", ".join(f"{name} x{n}" for name, n in counts))
overall = collections.Counter(d.candidate for d in decisions).most_common()
print("all          " + ", ".join(f"{name} x{n}" for name, n in overall))
if router.costs is not None:  # the cost-aware rule: argmax p_i - lambda * c_i / max(c)
    for lam in (0.01, 0.05):
        frugal = router.route_batch([r["turns"][0] for r in rows], lam=lam)
        price = sum(router.costs[router.labels.index(d.candidate)] for d in frugal) / len(frugal)
        counts = collections.Counter(d.candidate for d in frugal).most_common(3)
        print(f"lambda={lam}: mean price {price:.2f} $/Mtok; " + ", ".join(f"{name} x{n}" for name, n in counts))
single = router.route(rows[0]["turns"][0])
print(f"one query, route(): {single.candidate} (p={single.confidence:.3f}) in {single.latency_ms:.1f} ms")
PY

echo
echo "--- latency: PyTorch eager vs ONNX fp32 vs INT8, side by side (short run) ---"
# One thread per engine: the numbers of an app that routes one query per worker, steady on a shared box.
zooter bench "$OUT/bundle" --queries "$ZOOTER_DATA/mt_bench/question.jsonl" --iters 10 --warmup 2 --threads 1 \
    --json "$OUT/bench.json" --plot "$OUT/bench.png"
