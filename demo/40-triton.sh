#!/usr/bin/env bash
# Stage 40: serve the router on a real tritonserver (CPU, from the nvidia-pytriton wheel).
# Build the model repository from stage 30's bundle with CPU stand-ins for every candidate, start Triton,
# route the 80 MT-Bench first turns through zooter_route (and one through `zooter route --triton`), stream one
# answer from the chosen candidate through the `zooter` model (`zooter ask --stream`), measure routing latency
# through Triton against in-process, unload the chosen candidate mid-run to show the fallback, stop.
# The repository stays in $OUT/triton-repo (stage 50 reuses its stand-ins).
set -euo pipefail
: "${ZOOTER_DATA:?}" "${OUT:?}"
export HF_HUB_OFFLINE=1
QUESTIONS="$ZOOTER_DATA/mt_bench/question.jsonl"
REPO="$OUT/triton-repo"

zooter triton build "$OUT/bundle" --candidates "$OUT/candidates.yaml" --out "$REPO" --stand-ins --max-tokens 48

# Three consecutive free ports: `zooter bench --triton` finds gRPC at HTTP + 1 and metrics at HTTP + 2.
PORT=$(python demo/free_ports.py 3 18000)
URL="127.0.0.1:$PORT"
LOG="$OUT/triton-serve.log"
# Model control is off by default; the fallback drill below unloads a candidate, so it is on here. The
# repository API then needs the control key, which the launcher writes to a file readable by us alone.
zooter serve "$REPO" --model-control --control-key-file "$OUT/control.key" --http-port "$PORT" \
    --grpc-port $((PORT + 1)) --metrics-port $((PORT + 2)) --log-file "$OUT/tritonserver.log" > "$LOG" 2>&1 &
SERVER=$!
trap 'kill -TERM "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    grep -q '^ready:' "$LOG" && break
    kill -0 "$SERVER" 2>/dev/null || { cat "$LOG"; exit 1; }
    sleep 0.5
done
cat "$LOG"

echo
echo "== the 80 MT-Bench first turns, routed through Triton (zooter_route) =="
python - "$URL" "$QUESTIONS" "$OUT/triton-routes.jsonl" <<'PY'
import collections, json, sys
from zooter.serving.triton_client import route_via_triton
url, questions, out = sys.argv[1:]
rows = [json.loads(line) for line in open(questions) if line.strip()]
answers = route_via_triton(url, [r["turns"][0] for r in rows])
with open(out, "w") as f:
    for r, a in zip(rows, answers):
        f.write(json.dumps({"question_id": r["question_id"], "category": r["category"], **a}) + "\n")
by_category = collections.defaultdict(collections.Counter)
for r, a in zip(rows, answers):
    by_category[r["category"]][a["candidate"]] += 1
for category, counts in by_category.items():
    print(f"  {category:11s} " + ", ".join(f"{name} x{n}" for name, n in counts.most_common()))
print(f"  (all decisions: {out})")
PY

echo
echo "== zooter route --triton (one query) =="
zooter route --triton "$URL" "Compose an engaging travel blog post about a recent trip to Hawaii."

echo
echo "== zooter ask --stream: routed, then answered by the chosen candidate's stand-in =="
zooter ask --triton "$URL" --stream --max-tokens 48 "$(python -c "import json,sys; print(json.loads(open(sys.argv[1]).readline())['turns'][0])" "$QUESTIONS")"

echo
echo "== routing latency: Triton (HTTP, gRPC) vs in-process, concurrency 1, 8, 32 =="
zooter bench --triton "$URL" --bundle "$OUT/bundle" --queries "$QUESTIONS" --json "$OUT/triton-bench.json" > "$OUT/triton-bench.out"
# The table; the full report is in $OUT/triton-bench.json.
awk '/^routing latency/ {show = 1} /^[{]/ {show = 0} show' "$OUT/triton-bench.out"

echo
echo "== fallback: 8 answers sent over 4 s, the chosen candidate's model unloaded halfway =="
python - "$URL" "$REPO" "$OUT/control.key" <<'PY'
import json, sys
from pathlib import Path
from zooter.bench.triton import fallback_drill
from zooter.serving.triton_client import route_via_triton
url, repo, key_file = sys.argv[1:]
query = "Explain the difference between a list and a tuple in Python."
chosen = route_via_triton(url, [query])[0]["candidate"]
model = json.loads((Path(repo) / "zooter" / "1" / "routing.json").read_text())["candidates"][chosen]["model"]
drill = fallback_drill(url, query, model, requests=8, max_tokens=8, spread_s=4.0, key=Path(key_file).read_text().strip())
print(f"  routed to {chosen} ({model}); answered {drill['answered']}/{drill['requests']}, lost {drill['lost']}, "
      f"by fallback {drill['fallbacks']}")
print(f"  answered by: {drill['by_candidate']}")
print(f"  note: {drill['fallback_note']}")
PY

echo
echo "== stopping tritonserver (SIGTERM) =="
kill -TERM "$SERVER"
wait "$SERVER"
trap - EXIT
tail -1 "$LOG"
