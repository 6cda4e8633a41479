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
# The shipped loop, not only gamma 1 (which takes the proposer's early exit): gamma 5 with
# mixed rules, top-k/top-p, logprobs and scored prompts joining running batches, a seeded
# request under chunked prefill, and TP 2 where the node has two GPUs. vLLM's sync checker
# reports every blocking host/device sync outside warm-up; the count is summarised.
mkdir -p results/gpu-check
GPUS=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
TESTS=(tests/test_engine.py tests/test_speculative_exactness.py tests/test_engine_production.py
       tests/test_logprobs.py)
if [ "$GPUS" -ge 2 ]; then TESTS+=(tests/test_engine_tp.py); fi
VLLM_GPU_SYNC_CHECK=warn $BIN/python -m pytest -q -p no:cacheprovider "${TESTS[@]}" \
    2>&1 | tee results/gpu-check/exactness.log
echo "== host/device syncs reported by VLLM_GPU_SYNC_CHECK=warn (by source line)"
grep -i "sync" results/gpu-check/exactness.log | grep -oE '[A-Za-z_/]+\.py:[0-9]+' \
    | sort | uniq -c | sort -rn | head -20 || echo "none reported"
echo "== kernels on CUDA"
$BIN/kad-bench kernels --device cuda --batch 1 8 64 --json results/gpu-check/kernels.json
echo "== engine throughput (tiny pair; pass --models/--target/--draft for a real pair)"
$BIN/kad-bench engine --gamma 5 --concurrency 1 32 --dtype bfloat16 \
    --systems vllm-ar vllm-spec-base kad:kad_dual:0.4 "$@" --json results/gpu-check/engine.json
