#!/bin/bash
# One server, four prompts one at a time (code, math, chat, code; 160 greedy tokens), with the
# worker's step trace on: end-to-end seconds per request, and the trace for reading the steps.
#   scripts/step_trace_check.sh profiles/cpu-demo.yaml  /tmp/plain.jsonl  31003
#   scripts/step_trace_check.sh profiles/cpu-dspark.yaml /tmp/spark.jsonl 31004
# Run one at a time on a quiet machine (a second busy process distorts every timing).
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=$1 TRACE=$2 PORT=$3
rm -f "$TRACE"
AGENTSERVE_STEP_TRACE=$TRACE AGENTSERVE_CACHE=$(mktemp -d) .venv/bin/agentserve launch --profile "$PROFILE" --port "$PORT" \
  > "${TRACE%.jsonl}.server.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 1; done
.venv/bin/python - "$PORT" <<'PY'
import sys, time, requests
port = sys.argv[1]
prompts = ["Write a Python function that returns the sum of the squares of a list of integers, with a docstring and a test.",
           "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May? Think step by step.",
           "Explain in three paragraphs why the sky is blue.",
           "Write a Python class for a stack with push, pop and peek, and type hints."]
for p in prompts:
    t = time.time()
    r = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=600, json={
        "model": "default", "messages": [{"role": "user", "content": p}], "max_tokens": 160, "temperature": 0}).json()
    print(f"{time.time() - t:.2f} s  {r['usage']['completion_tokens']} tokens  {p[:40]}")
PY
