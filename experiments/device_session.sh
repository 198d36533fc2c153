#!/usr/bin/env bash
# One-GPU device calls for the planner kernels' latency, the expert kernels' tuning and a profile.
# STEPS names the steps to run, in order (default: all of them, which takes longer than one
# 600 s device call; split them over two calls on the same warm machine):
#   gpu_latency  experiments.planner.gpu_latency (greedy, assigner, parallel greedy: one layer's
#                latency at ep=8 and ep=64, with the greedy's breakdowns), 190 s
#   baseline     when BASELINE names a folder holding an older checkout's probe/ and
#                experiments/: gpu_latency at ep=8 from it, so that old and new are timed on the
#                same card, 80 s (BASELINE_CONFIGS, BASELINE_LIMIT: its --configs and
#                --time-limit; BASELINE_COMMIT: its revision, for its manifests; it runs from
#                inside BASELINE, which must not be under $OUT)
#   quant_layer  experiments.runtime.quant_layer (bf16, MXFP4 and FP8 expert kernels, every config
#                tried), 150 s
#   moe_layer    experiments.runtime.moe_layer --tune, 120 s
#   gpu_assign   experiments.planner.gpu_assign (assignment kernel against the host kernel on the
#                decode layers, batched time), 100 s (ASSIGN_LIMIT)
#   ncu          Nsight Compute on each planner kernel's one-layer launch
#                (experiments.planner.gpu_profile), 80 s (NCU_LIMIT)
#   gpu_lite     experiments.planner.gpu_lite --profile (the lite planner: plans against the
#                CPU kernel, one layer's latency ep=8 to 256, where a round's time goes), 240 s
# Each step is time-boxed; the outputs are packed into $OUT/gpu_results.tar.gz after every step (a
# run cut short keeps the steps it finished), the console is $OUT/log.txt. Usage (on the GPU
# machine, from the repository root):
#   OUT=dir PROBE_GIT_COMMIT=<git rev-parse --short HEAD here> [BASELINE=dir] \
#     [STEPS="gpu_latency baseline"] bash experiments/device_session.sh
# (PROBE_GIT_COMMIT: the manifests' revision; without it they take the device copy's git metadata,
# which can be stale)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out_session}
R=${RESULTS_DIR:-/tmp/device_session}  # outside $OUT: only the tarball and the log come back
STEPS=${STEPS:-gpu_latency baseline quant_layer moe_layer gpu_assign ncu}
BASELINE_LIMIT=${BASELINE_LIMIT:-70}  # its --time-limit; BASELINE_CONFIGS: its --configs (ep8)
mkdir -p "$R" "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
LOG="$OUT/log.txt"
{ date -u; nvidia-smi --query-gpu=name,clocks.sm,driver_version --format=csv,noheader; } 2>&1 | tee -a "$LOG"
pack() {  # after every step: a run cut short by the device's limit keeps what it finished
  tar -czf "$OUT/gpu_results.tar.gz.part" -C "$R" . && mv "$OUT/gpu_results.tar.gz.part" "$OUT/gpu_results.tar.gz"
}
step() {  # step NAME SECONDS command...
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date -u +%T))" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tail -n 40 | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$LOG"
  pack
}
PP=.${PYTHONPATH:+:$PYTHONPATH}
for s in $STEPS; do
  case $s in
    gpu_latency) step gpu_latency 190 env PYTHONPATH="$PP" python3 -m experiments.planner.gpu_latency \
      --device cuda --time-limit 180 --out "$R/gpu_latency" ;;
    baseline)
      if [[ -z "${BASELINE:-}" ]]; then echo "== baseline: no BASELINE, skipped" | tee -a "$LOG"; continue; fi
      # run from inside BASELINE: `python -m` puts the working directory first on sys.path,
      # so from the repository root PYTHONPATH=$BASELINE would import the current code
      # its manifests name BASELINE_COMMIT (the older checkout's revision), not this one's
      step baseline "$((BASELINE_LIMIT + 10))" env PROBE_GIT_COMMIT="${BASELINE_COMMIT:-unknown}" \
        bash -c "cd '$BASELINE' && PYTHONPATH=. python3 \
        -m experiments.planner.gpu_latency --device cuda --configs ${BASELINE_CONFIGS:-ep8} \
        --time-limit $BASELINE_LIMIT --out '$R/gpu_latency_baseline'" ;;
    quant_layer) step quant_layer 150 env PYTHONPATH="$PP" python3 -m experiments.runtime.quant_layer \
      --device cuda --out "$R/quant_layer" ;;
    moe_layer) step moe_layer 120 env PYTHONPATH="$PP" python3 -m experiments.runtime.moe_layer \
      --device cuda --tune --out "$R/moe_layer" ;;
    gpu_assign) step gpu_assign "${ASSIGN_LIMIT:-100}" env PYTHONPATH="$PP" python3 -m experiments.planner.gpu_assign \
      --device cuda --out "$R/gpu_assign" ;;
    ncu)
      echo "== ncu ($(date -u +%T))" | tee -a "$LOG"
      PYTHONPATH="$PP" timeout "${NCU_LIMIT:-80}" ncu --clock-control none --section SpeedOfLight \
        --section WarpStateStats --section SchedulerStats --section LaunchStats \
        --section InstructionStats -k regex:'_greedy_kernel|_assign_kernel|_parallel_kernel' -c 8 \
        python3 -m experiments.planner.gpu_profile --launches 2 --repeats 0 > "$R/ncu.txt" 2>&1
      echo "== ncu: exit $?" | tee -a "$LOG"
      pack ;;
    gpu_lite) step gpu_lite 240 env PYTHONPATH="$PP" python3 -m experiments.planner.gpu_lite \
      --device cuda --profile --time-limit 230 --out "$R/gpu_lite" ;;
    *) echo "== $s: unknown step" | tee -a "$LOG" ;;
  esac
done
date -u | tee -a "$LOG"
