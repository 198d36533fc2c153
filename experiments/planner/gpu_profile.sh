#!/usr/bin/env bash
# Where one layer's planning time goes on the GPU, in one device call: gpu_latency at ep=8
# (one-layer latency, then the breakdowns: k_max 0/1/4/16, threads per block, memory), then
# Nsight Compute on each planner kernel's one-layer launch (experiments.planner.gpu_profile).
# Usage (on the GPU machine, from the repository root): OUT=dir bash experiments/planner/gpu_profile.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out_profile}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
{ date -u; nvidia-smi --query-gpu=name,clocks.sm,driver_version --format=csv,noheader; } 2>&1 | tee "$LOG"
timeout ${LATENCY_TIMEOUT:-260} python3 -m experiments.planner.gpu_latency --device cuda --configs ep8 \
    --time-limit $(( ${LATENCY_TIMEOUT:-260} - 15 )) --out "$OUT/gpu_latency" 2>&1 | tee -a "$LOG"
echo "== gpu_latency exit ${PIPESTATUS[0]}" | tee -a "$LOG"
timeout ${NCU_TIMEOUT:-240} ncu --clock-control none --section SpeedOfLight --section WarpStateStats \
    --section SchedulerStats --section LaunchStats --section InstructionStats \
    -k regex:'_greedy_kernel|_assign_kernel|_parallel_kernel' -c 8 \
    python3 -m experiments.planner.gpu_profile --launches 2 --repeats 0 > "$OUT/ncu.txt" 2>&1
echo "== ncu exit $?" | tee -a "$LOG"
date -u | tee -a "$LOG"
