#!/usr/bin/env bash
# After deploying on a CUDA node (project installed with CUDA vLLM: `make setup` there):
# 1. the end-to-end exactness tests of the engine on this GPU,
# 2. throughput of vLLM plain AR, vLLM speculative (rule base) and the hook (kad_dual 0.4)
#    at gamma 5, 1 and 32 concurrent requests, printed as ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
command -v nvidia-smi >/dev/null || { echo "gpu-check: no NVIDIA driver (nvidia-smi) here"; exit 1; }
$BIN/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch sees no CUDA device')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== exactness on CUDA (engine hook, tiny pair)"
$BIN/python -m pytest -q tests/test_engine.py tests/test_speculative_exactness.py
echo "== kernels on CUDA"
$BIN/kad-bench kernels --device cuda --batch 1 8 64 --json results/gpu-check/kernels.json
echo "== engine throughput (tiny pair; pass --models/--target/--draft for a real pair)"
$BIN/kad-bench engine --gamma 5 --concurrency 1 32 --dtype bfloat16 \
    --systems vllm-ar vllm-spec-base kad:kad_dual:0.4 "$@" --json results/gpu-check/engine.json
