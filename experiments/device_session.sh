#!/usr/bin/env bash
# One device call for the planner kernels' latency and the MoE layer's tuning, on one GPU:
#   1. experiments.planner.gpu_latency (greedy, assigner, parallel greedy: one layer's latency,
#      ep=8 and ep=64, with the greedy's breakdowns),
#   2. experiments.runtime.moe_layer --tune,
#   3. experiments.planner.gpu_assign,
#   4. on an H200: Nsight Compute on each planner kernel's one-layer launch
#      (experiments.planner.gpu_profile); on any other card instead, when BASELINE names a
#      folder holding an older checkout's probe/ and experiments/, gpu_latency at ep=8 from it
#      (so that old and new are timed on the same card).
# Each step is time-boxed; the outputs are packed into $OUT/gpu_results.tar.gz after every step (a
# run cut short keeps the steps it finished), the console is
# $OUT/log.txt. Usage (on the GPU machine, from the repository root):
#   OUT=dir [BASELINE=dir] bash experiments/device_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out_session}
R=${RESULTS_DIR:-/tmp/device_session}  # outside $OUT: only the tarball and the log come back
mkdir -p "$R"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
LOG="$OUT/log.txt"
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
{ date -u; nvidia-smi --query-gpu=name,clocks.sm,driver_version --format=csv,noheader; } 2>&1 | tee "$LOG"
step() {  # step NAME SECONDS command...
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date -u +%T))" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tail -n 40 | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$LOG"
  pack
}
pack() {  # after every step: a run cut short by the device's limit keeps what it finished
  tar -czf "$OUT/gpu_results.tar.gz.part" -C "$R" . && mv "$OUT/gpu_results.tar.gz.part" "$OUT/gpu_results.tar.gz"
}
PP=.${PYTHONPATH:+:$PYTHONPATH}
step gpu_latency 200 env PYTHONPATH="$PP" python3 -m experiments.planner.gpu_latency \
  --device cuda --time-limit 185 --out "$R/gpu_latency"
step moe_layer 180 env PYTHONPATH="$PP" python3 -m experiments.runtime.moe_layer --device cuda \
  --tune --out "$R/moe_layer"
step gpu_assign 60 env PYTHONPATH="$PP" python3 -m experiments.planner.gpu_assign --device cuda \
  --out "$R/gpu_assign"
if [[ "$CARD" == *H200* || -z "${BASELINE:-}" ]]; then
  echo "== ncu ($(date -u +%T))" | tee -a "$LOG"
  PYTHONPATH="$PP" timeout 80 ncu --clock-control none --section SpeedOfLight \
    --section WarpStateStats --section SchedulerStats --section LaunchStats \
    --section InstructionStats -k regex:'_greedy_kernel|_assign_kernel|_parallel_kernel' -c 8 \
    python3 -m experiments.planner.gpu_profile --launches 2 --repeats 0 > "$R/ncu.txt" 2>&1
  echo "== ncu: exit $?" | tee -a "$LOG"
  pack
else
  step baseline 80 env PYTHONPATH="$BASELINE" python3 -m experiments.planner.gpu_latency \
    --device cuda --configs ep8 --time-limit 70 --out "$R/gpu_latency_baseline"
fi
date -u | tee -a "$LOG"
