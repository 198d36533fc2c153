#!/usr/bin/env bash
# Where the lite planner's kernel spends a layer's time, line by line, in one device call:
# experiments.planner.gpu_lite --quick (plans against the CPU kernel, one layer's latency), then
# Nsight Compute with source counters (warp-state sampling per SASS instruction, mapped to the
# source lines of probe/planner/lite*.py where the kernel compiles with line information,
# PROBE_CUDA_LINEINFO=1) on the kernel's one-layer launches at ep=8 and ep=64
# (experiments.planner.gpu_profile --lite). NVVM refused line information for a branch between
# two loads in the pair moves' pool layout; compiled with line information the kernel reads
# both and selects (lite_cuda's LINES). Should NVVM refuse it again, the run is repeated
# without it (LINEINFO=0 skips the attempt), per SASS instruction. With numba-cuda 0.30.4's
# NVVM the generic kernel at ep=64 compiled with line information fails in ptxas ("Unknown
# symbol '$L__BB0_155'": a loop exit's label left out of the PTX) after the ep=8 launch was
# profiled, so that report holds the small-layer kernel alone; LINEINFO=0 profiles both.
# Saves the details, the raw metrics (the warp-state stall reasons) and the source pages. On
# an H200 it first runs the H200 steps of experiments/device_session.sh (H200_STEPS, default
# "quant_layer moe_layer"; SKIP_H200=1 skips them). At ep=8 CudaLite takes the small-layer kernel (lite_small), so the
# two launches profiled are that kernel at ep=8 and the generic one at ep=64.
# SAMPLING sets Nsight's warp-sampling interval (0: every 32 cycles, the densest; default
# auto, which took 62 samples of the ep=8 launch); LAUNCHES=1 profiles the ep=8 launch alone.
# Usage (on the GPU machine, from the repository root):
#   OUT=dir PROBE_GIT_COMMIT=<rev> bash experiments/planner/lite_ncu.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out_lite_ncu}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
{ date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv,noheader; ncu --version | tail -1; } 2>&1 | tee "$LOG"
if [ "${SKIP_H200:-0}" != 1 ] && nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  OUT="$OUT/h200" STEPS="${H200_STEPS:-quant_layer moe_layer}" bash experiments/device_session.sh 2>&1 | tail -n 20 | tee -a "$LOG"
fi
if [ "${SKIP_TIMING:-0}" != 1 ]; then
  timeout "${LITE_LIMIT:-200}" python3 -m experiments.planner.gpu_lite --device cuda --quick --max-ranks 64 \
      --time-limit $(( ${LITE_LIMIT:-200} - 15 )) --out "$OUT/gpu_lite" 2>&1 | tail -n 30 | tee -a "$LOG"
  echo "== gpu_lite exit ${PIPESTATUS[0]}" | tee -a "$LOG"
fi
profile() {  # $1: 1 with line information, 0 without
  PROBE_CUDA_LINEINFO=$1 timeout "${NCU_LIMIT:-200}" ncu --clock-control none --import-source yes \
      --section SourceCounters --section WarpStateStats --section LaunchStats \
      --section SpeedOfLight --section InstructionStats \
      --warp-sampling-interval "${SAMPLING:-auto}" \
      -k regex:'_lite_kernel|_small_kernel' -c "${LAUNCHES:-2}" -o "$OUT/lite" -f \
      python3 -m experiments.planner.gpu_profile --lite --launches 1 --repeats 0 > "$OUT/ncu_run.txt" 2>&1
  echo "== ncu exit $?" | tee -a "$LOG"
}
[ "${LINEINFO:-1}" = 1 ] && profile 1
if [ ! -s "$OUT/lite.ncu-rep" ]; then  # NVVM has refused the kernel with line information
  # (or LINEINFO=0): the source counters per SASS instruction, without source lines
  echo "== no report with line information: again without it" | tee -a "$LOG"
  [ -f "$OUT/ncu_run.txt" ] && mv "$OUT/ncu_run.txt" "$OUT/ncu_run_lineinfo.txt"
  profile 0
fi
# Every metric collected (the warp-state stall reasons among them), then the pages.
ncu -i "$OUT/lite.ncu-rep" --page raw --csv 2>&1 | gzip > "$OUT/ncu_raw.csv.gz"
ncu -i "$OUT/lite.ncu-rep" --page details > "$OUT/ncu_details.txt" 2>&1
# The source page per SASS instruction, and CUDA lines with their SASS (compressed: ~10 MB raw)
for src in sass cuda,sass; do
  name=ncu_source_${src/,/_}
  ncu -i "$OUT/lite.ncu-rep" --page source --csv --print-source "$src" 2> "$OUT/$name.err" | gzip > "$OUT/$name.csv.gz"
  echo "== source page ($src): $(stat -c %s "$OUT/$name.csv.gz") bytes compressed" | tee -a "$LOG"
done
date -u | tee -a "$LOG"
# The files that come back from a device call are few: keep the text pages, not the report.
find "$OUT" -name '*.err' -empty -delete
mv "$OUT/lite.ncu-rep" /tmp/ 2>/dev/null
