#!/usr/bin/env bash
# Issue 6 depth test on one GPU: train the 20-layer model, distil predictors, score held out.
#   run(command="MINUTES=4 bash scripts/deepmodel/device.sh", carry=["data/smallmodel"],
#       timeout_s=600)                 # made results/deepmodel/run1 and run2 (~480-550 s)
# Knobs: MINUTES (training budget, default 4.5; 4 leaves room in a 600 s call), RUN_ARGS (extra
# run.py arguments, e.g. RUN_ARGS='--hidden 1024,256' to score two residual widths, ~+60 s).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/deepmodel_out}
mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.total --format=csv
  python3 -c 'import torch; print(torch.__version__, torch.cuda.is_available())'; } \
  > "$OUT/env.txt" 2>&1
python3 scripts/deepmodel/run.py --minutes "${MINUTES:-4.5}" --out "$OUT" ${RUN_ARGS:-} \
  2>&1 | tee "$OUT/run.log"
status=${PIPESTATUS[0]}
ls -la "$OUT"
exit "$status"
