#!/usr/bin/env bash
# Stage 50: build training data as the paper does, first half: every candidate answers a handful of MT-Bench prompts.
#
# Where stage 40 left a Triton repository with CPU stand-ins ($OUT/triton-repo), the answers come from those
# stand-ins (SmolLM2-135M-Instruct behind the TensorRT-LLM ensemble I/O) through a tritonserver started here.
# Otherwise they come from `zooter stub-llm` (zooter.bench.openai_stub), a local OpenAI-compatible server that
# answers with deterministic text (no LLM): the output says which. Scoring needs a real reward model (none can be
# downloaded here), so the stage ends by saying how to pass one.
set -euo pipefail
OUT="${OUT:-demo-out}"
ZOOTER_DATA="${ZOOTER_DATA:-../shared/data}"
DIR="$OUT/collect"
mkdir -p "$DIR"
QUERIES="$ZOOTER_DATA/mt_bench/question.jsonl"
N_PROMPTS="${N_PROMPTS:-3}"
# The stand-ins generate one answer at a time on 2 shared cores (~5-10 s each): keep answers short.
export MAX_TOKENS="${MAX_TOKENS:-32}"
# The repository builder writes routing.json (which label is served by which model, stand-ins marked) beside its models.
ROUTING=$(ls "$OUT"/triton-repo/*/1/routing.json 2>/dev/null | head -n 1 || true)

generate_args=(--queries "$QUERIES" --limit "$N_PROMPTS" --source mt_bench --out "$DIR/answers.jsonl" --no-progress)
rm -f "$DIR/answers.jsonl" "$DIR/answers.pairs.jsonl"

used_triton=0
if [ -n "$ROUTING" ] && grep -q '"stand_in": true' "$ROUTING"; then
    echo "== answers from Triton stand-ins in $OUT/triton-repo (SmolLM2-135M-Instruct, CPU) =="
    if python - "$OUT" "$ROUTING" "$DIR" "${generate_args[@]}" <<'EOF'
import json, os, sys
from pathlib import Path

from zooter.cli import main
from zooter.servers.tritonserver import TritonServer
from zooter.serving.candidates import Candidate, load_candidates, save_candidates

out, routing, folder, args = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3]), sys.argv[4:]
stand_ins = {label: s["model"] for label, s in routing["candidates"].items() if s.get("stand_in")}
chosen = list(stand_ins)[:3]
prices = {c.name: c.cost for c in load_candidates(out / "candidates.yaml")} if (out / "candidates.yaml").is_file() else {}
# Only the models this stage calls: the shared tiny LLM and three stand-ins, not the router.
with TritonServer(out / "triton-repo", model_control=True,
                  load_models=["zooter_standin_llm", *(stand_ins[c] for c in chosen)]) as server:
    candidates = [Candidate(name, prices.get(name), {"triton_model": stand_ins[name], "triton_url": server.grpc_url,
                                                      "protocol": "grpc", "max_concurrency": 2}) for name in chosen]
    save_candidates(candidates, folder / "candidates.standins.yaml")
    print(f"tritonserver up (grpc {server.grpc_url}); candidates: {', '.join(chosen)}", flush=True)
    common = ["generate", "--candidates", str(folder / "candidates.standins.yaml"), "--max-tokens", os.environ["MAX_TOKENS"], *args]
    code = main(common)
    print("\n-- the same command again: every pair is already in the journal, nothing is asked twice --", flush=True)
    code = code or main(common)
sys.exit(code)
EOF
    then
        used_triton=1
    else
        echo "(the Triton stand-ins did not answer; falling back to the deterministic OpenAI-compatible stub server)"
    fi
fi

if [ "$used_triton" = 0 ]; then
    echo "== answers from zooter.bench.openai_stub: an OpenAI-compatible server with DETERMINISTIC TEXT, no LLM =="
    echo "   (no Triton stand-ins in $OUT/triton-repo; stage 40 builds them)"
    zooter stub-llm --delay 0.05 > "$DIR/stub-server.log" 2>&1 &
    server_pid=$!
    trap 'kill "$server_pid" 2>/dev/null || true' EXIT
    for _ in $(seq 50); do grep -q listening "$DIR/stub-server.log" 2>/dev/null && break; sleep 0.1; done
    url=$(awk '/listening/ {print $3}' "$DIR/stub-server.log")
    # Three well-behaved candidates and one that answers 503 once per prompt, to show retries with backoff.
    cat > "$DIR/candidates.stub.yaml" <<EOF
- name: stub-a
  serve: {openai_base_url: $url, model: stub-a}
- name: stub-b
  serve: {openai_base_url: $url, model: stub-b-verbose, max_concurrency: 2}
- name: stub-c
  serve: {openai_base_url: $url, model: stub-c-flaky}
EOF
    zooter generate --candidates "$DIR/candidates.stub.yaml" --max-tokens "$MAX_TOKENS" --backoff 0.2 "${generate_args[@]}"
    echo
    echo "-- the same command again: every pair is already in the journal, nothing is asked twice --"
    zooter generate --candidates "$DIR/candidates.stub.yaml" --max-tokens "$MAX_TOKENS" "${generate_args[@]}"
    kill "$server_pid" 2>/dev/null || true
    trap - EXIT
fi

echo
echo "first answers row ($DIR/answers.jsonl), responses cut to 100 characters:"
python - "$DIR/answers.jsonl" <<'EOF'
import json, os, sys
row = json.loads(open(sys.argv[1]).readline())
row["responses"] = {k: (v[:100] + "...") if len(v) > 100 else v for k, v in row["responses"].items()}
print(json.dumps(row, indent=1, ensure_ascii=False))
EOF
cat <<EOF

Scoring needs a reward model, and none can be downloaded here. With one in a local folder
(for example OpenAssistant/reward-model-deberta-v3-large-v2 or Skywork/Skywork-Reward-Llama-3.1-8B-v0.2):
    zooter score --data $DIR/answers.jsonl --reward-model /path/to/reward-model --out $DIR/scored.jsonl
and, for the paper's RMR baseline, the same answers scored by a second reward model:
    zooter score --data $DIR/answers.jsonl --reward-model /path/to/other-model --out $DIR/scored.rm2.jsonl
    zooter eval ... --rmr $DIR/scored.rm2.jsonl
EOF
