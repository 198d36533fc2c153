#!/usr/bin/env bash
# The lite planner's kernel at this checkout against a base revision's, on one card in one
# device call: experiments.planner.gpu_lite --quick up to 64 ranks at both (plans against the
# CPU kernel, one layer's graph-replayed latency at 32-1024 threads, the 8-layer launch), the
# checkout's first with --stamps (the full kernel's cycles per step; PROFILE=--profile adds
# the profiling variants).
# The base tree is a `git archive` of the base revision's probe/ and experiments/ made on the
# CPU machine and carried (an ignored path):
#   rm -rf .gl/base && mkdir -p .gl/base && git archive BASE probe experiments | tar -x -C .gl/base
# The base checks no random layers (its own runs did); RANDOM_LAYERS (default 1000) are checked
# at this checkout; RANKS="--ranks 8" (say) replaces the default --max-ranks 64 for both.
# Usage (on the GPU machine, from the repository root):
#   OUT=dir PROBE_GIT_COMMIT=<rev> BASE_COMMIT=<base rev> bash experiments/planner/lite_compare.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out_lite_compare}
mkdir -p "$OUT/new" "$OUT/base"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LOG="$OUT/console.txt"
{ date -u; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv,noheader; } 2>&1 | tee "$LOG"
echo "== ${PROBE_GIT_COMMIT:-checkout} (--stamps ${PROFILE:-})" | tee -a "$LOG"
timeout "${NEW_LIMIT:-330}" python3 -m experiments.planner.gpu_lite --device cuda --quick --stamps ${PROFILE:-} \
    ${RANKS:---max-ranks 64} --random "${RANDOM_LAYERS:-1000}" --time-limit $(( ${NEW_LIMIT:-330} - 15 )) --out "$OUT/new" 2>&1 | tail -n 40 | tee -a "$LOG"
echo "== exit ${PIPESTATUS[0]}" | tee -a "$LOG"
echo "== base ${BASE_COMMIT:-?}" | tee -a "$LOG"
(cd .gl/base && PROBE_GIT_COMMIT=${BASE_COMMIT:-base} PYTHONPATH=. timeout "${BASE_LIMIT:-200}" \
    python3 -m experiments.planner.gpu_lite --device cuda --quick ${RANKS:---max-ranks 64} \
    --random 0 --time-limit $(( ${BASE_LIMIT:-200} - 15 )) --out "$OUT/base" 2>&1 | tail -n 20) | tee -a "$LOG"
rm -f "$OUT/base/gpu_lite.manifest.json"  # the files that come back are few: the base's table and JSON
date -u | tee -a "$LOG"
