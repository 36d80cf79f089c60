#!/usr/bin/env bash
# Outside-client check: agentic-bench (PyPI `agentic-bench`, module `abench`, Apache-2.0) replays a
# locally generated multi-turn agent workload (`--dataset-name random`: no download) closed-loop at a
# fixed concurrency against an OpenAI-compatible server (streaming POST /v1/chat/completions).
#
#   scripts/agentic_bench.sh BASE_URL OUT_DIR [CONCURRENCY]
#   e.g. scripts/agentic_bench.sh http://127.0.0.1:30000/v1 bench_out/abench-plain 4
#
# Installs the bench into its own venv (never .venv). Offline: AGENTIC_BENCH_WHEELS=DIR holding the
# agentic-bench wheel and its deps (aiohttp ...). The workload is sized for the 2-core CPU demo
# (SmolLM2-135M, 8192-token KV pool): 2 x C sessions x AB_TURNS turns, pinned output lengths.
# It needs no tokenizer: without transformers in its venv it sizes prompts at chars/4 and takes
# token counts from the server's usage. It contacts nothing but BASE_URL.
set -euo pipefail

BASE_URL=${1:?usage: $0 BASE_URL OUT_DIR [CONCURRENCY]}
OUT_DIR=${2:?usage: $0 BASE_URL OUT_DIR [CONCURRENCY]}
CONC=${3:-4}
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${AGENTIC_BENCH_VENV:-$REPO/.cache/abench-venv}   # .cache/ is git-ignored

# 1. the bench in its own venv, once
if [[ ! -x "$VENV/bin/abench" ]]; then
  python3 -m venv "$VENV"
  if [[ -n "${AGENTIC_BENCH_WHEELS:-}" ]]; then
    "$VENV/bin/pip" install -q --no-index --find-links "$AGENTIC_BENCH_WHEELS" agentic-bench
  else
    "$VENV/bin/pip" install -q "agentic-bench==0.2.0"
  fi
fi

# 2. abench wants the server root: it appends /v1/chat/completions, /v1/models, /model_info,
#    /server_info and /metrics itself (a trailing /v1 would break its /v1/models context probe)
ROOT=${BASE_URL%/}; ROOT=${ROOT%/v1}

# Optional agent identity: one x-agent-id for every request (abench has no per-session header).
HDR=(); [[ -n "${AB_AGENT_ID:-}" ]] && HDR=(--header "x-agent-id=$AB_AGENT_ID")

mkdir -p "$OUT_DIR"
OUT_FILE="$OUT_DIR/abench_c${CONC}.jsonl"   # one JSON line per run: config, metrics, per-turn records
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # never reach for a model hub

# 3. the small workload; every knob can be overridden from the environment
"$VENV/bin/python" -m abench run \
  --base-url "$ROOT" --model "${AB_MODEL:-default}" \
  --dataset-name random \
  --max-concurrency "$CONC" --num-sessions "${AB_SESSIONS:-$((2 * CONC))}" \
  --turns "${AB_TURNS:-3}" --output-len "${AB_OUTPUT_LEN:-48}" \
  --input-increment "${AB_INPUT_INC:-192}" --system-prompt-len "${AB_SYS_LEN:-256}" \
  --gap-policy "${AB_GAP:-fixed:500}" \
  --warmup-requests 1 --ready-check-timeout-sec 120 \
  --turn-timeout 180 --max-duration "${AB_MAX_S:-420}" \
  --progress-interval 15 --disable-tqdm \
  --tag "${AB_TAG:-c$CONC}" "${HDR[@]}" \
  --output-file "$OUT_FILE" 2>&1 | tee "$OUT_DIR/abench_c${CONC}.log"

echo "results: $OUT_FILE (log: $OUT_DIR/abench_c${CONC}.log)"
