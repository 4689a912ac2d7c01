#!/usr/bin/env bash
# Stage 30: export stage 20's trained run to an INT8 ONNX bundle behind the parity gate (and check parity on
# the held-out test rows), route the MT-Bench first turns with the torch-free Router (choices per category,
# the tolerance knob at three settings), then the latency table.
set -euo pipefail
: "${ZOOTER_DATA:?}" "${OUT:?}"
export HF_HUB_OFFLINE=1
RUN="${RUN:-$OUT/run}"

# Parity is checked on the run's dev rows (the file training used), one query per call as Router.route
# runs it, both models deciding by the shipped rule: the gate wants >= 99% of the clear decisions
# unchanged and the routed reward within 0.003 (docs/export-runtime.md). No --allow-drift here. A
# second check on the held-out test rows prints the same figures.
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
texts = [r["turns"][0] for r in rows]
decisions = router.route_batch(texts)
by_category = collections.defaultdict(list)
for row, d in zip(rows, decisions):
    by_category[row["category"]].append(d)
# expected reward: what the chosen candidate is expected to score (reward units of the training data);
# confidence: the calibrated probability that it is a best answer for the query.
print(f"{'category':<11} {'n':>3}  {'E[reward]':>9}  {'conf':>5}  choices")
for category, ds in by_category.items():
    counts = collections.Counter(d.candidate for d in ds).most_common()
    print(f"{category:<11} {len(ds):>3}  {sum(d.expected_reward for d in ds) / len(ds):>9.3f}  "
          f"{sum(d.confidence for d in ds) / len(ds):>5.2f}  " + ", ".join(f"{name} x{n}" for name, n in counts))
print(f"kept the best single ({router.decision['anchor']}) on {sum(d.anchored for d in decisions)} of {len(decisions)}")
d = decisions[0]
print(f"one query, expected rewards: " + ", ".join(f"{n} {v:.2f}" for n, v in sorted(d.expected_rewards.items(), key=lambda kv: -kv[1])[:4]))
if router.costs is not None:   # the cost knob, in reward units: the cheapest candidate expected within X of the choice
    price = dict(zip(router.labels, router.costs))
    for x in (0.0, 0.02, 0.05):
        frugal = router.route_batch(texts, tolerance=x)
        mean_price = sum(price[f.candidate] for f in frugal) / len(frugal)
        expected = sum(f.expected_reward for f in frugal) / len(frugal)
        counts = collections.Counter(f.candidate for f in frugal).most_common(3)
        print(f"tolerance {x:<4}: mean price {mean_price:.2f} $/Mtok, mean expected reward {expected:.3f}; "
              + ", ".join(f"{name} x{n}" for name, n in counts))
single = router.route(texts[0])
print(f"one query, route(): {single.candidate} (expected reward {single.expected_reward:.3f}, "
      f"confidence {single.confidence:.2f}) in {single.latency_ms:.1f} ms")
PY

echo
echo "--- latency: PyTorch eager vs ONNX fp32 vs INT8, side by side (short run) ---"
# One thread per engine: the numbers of an app that routes one query per worker, steady on a shared box.
zooter bench "$OUT/bundle" --queries "$ZOOTER_DATA/mt_bench/question.jsonl" --iters 10 --warmup 2 --threads 1 \
    --json "$OUT/bench.json" --plot "$OUT/bench.png"
