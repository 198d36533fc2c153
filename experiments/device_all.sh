#!/usr/bin/env bash
# Every GPU benchmark in one call on the lent H200 (one GPU): the planner's CUDA kernels, the
# runtime's MoE layer and decode step. Each writes <name>.json, <name>.md and a manifest under
# $OUT/<name>/; everything is then packed into $OUT/gpu_results.tar.gz (the device tool brings
# back few files), with the console in $OUT/log.txt.
# Usage (on the GPU machine, from the repository root): OUT=dir bash experiments/device_all.sh [name ...]
# Unpack here with: tar -xzf gpu_results.tar.gz -C results/gpu
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out_gpu}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
LOG="$OUT/log.txt"
ALL="planner.gpu_greedy planner.gpu_parallel planner.gpu_assign runtime.moe_layer runtime.quant_layer runtime.decode_graphs runtime.paged_kv"
WANT=${*:-$ALL}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,driver_version --format=csv,noheader || true
  python3 -c 'import torch, numpy, numba; print("torch", torch.__version__, "numpy", numpy.__version__, "numba", numba.__version__)'
} 2>&1 | tee "$LOG"
for mod in $WANT; do
  name=${mod#*.}
  echo "== $mod" | tee -a "$LOG"
  start=$(date +%s)
  extra=""
  [ "$mod" = runtime.moe_layer ] && extra="--tune"  # picks each GEMM's Triton config on the GPU
  timeout ${STEP_TIMEOUT:-280} python3 -m "experiments.$mod" --device cuda --out "$OUT/$name" $extra 2>&1 | tee -a "$LOG"
  echo "== $mod: exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s" | tee -a "$LOG"
done
date -u | tee -a "$LOG"
tar -czf "$OUT/gpu_results.tar.gz" -C "$OUT" --exclude gpu_results.tar.gz --exclude log.txt . 2>&1 | tee -a "$LOG"
