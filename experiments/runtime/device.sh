#!/usr/bin/env bash
# End-to-end runtime on one H200 (ep=1): the small real model and a random-init model with
# GPT-OSS-120B layer sizes (fewer layers). Writes JSON summaries, torch.profiler tables and a
# log and a manifest.json under $OUT (default ./out_runtime).
# Usage: OUT=dir bash experiments/runtime/device.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date -u +%FT%TZ)
OUT=${OUT:-out_runtime}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
LOG="$OUT/log.txt"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee "$LOG"

# 1. Small real model (models/smallmodel, Qwen3-MoE, 8 layers x 64 experts, top-4), launched
#    through torchrun with one rank so that the NCCL process-group path runs too.
if [ -f models/smallmodel/config.json ] && ls models/smallmodel/*.safetensors >/dev/null 2>&1; then
  echo "== small model, torchrun --nproc-per-node 1 (NCCL)" | tee -a "$LOG"
  python3 -m torch.distributed.run --nproc-per-node 1 -m probe.runtime \
    --model models/smallmodel --dtype bf16 --requests 64 --prompt-len 256 \
    --max-new-tokens 64 --stagger 0 --max-batch-tokens 8192 --prefill-chunk 1024 \
    --warmup-steps 4 --profile "$OUT/small_profile.txt" --out "$OUT/small.json" 2>&1 | tee -a "$LOG"
else
  echo "== small model not present under models/smallmodel: skipped" | tee -a "$LOG"
fi

# 2. GPT-OSS-like random-init model: hidden 2880, 128 experts, top-4, expert FFN 2880, 4 layers.
echo "== gpt-oss-like random init, 4 layers, one process" | tee -a "$LOG"
python3 -m probe.runtime --random-config gpt-oss-like --layers 4 --device cuda --dtype bf16 \
  --requests 64 --prompt-len 512 --max-new-tokens 32 --stagger 0 --max-batch-tokens 8192 \
  --prefill-chunk 1024 --warmup-steps 4 --profile "$OUT/gptoss_profile.txt" \
  --out "$OUT/gptoss.json" 2>&1 | tee -a "$LOG"
date -u | tee -a "$LOG"
python3 -m experiments.manifest "$OUT" --command "bash experiments/runtime/device.sh" \
  --started "$START" --fold
