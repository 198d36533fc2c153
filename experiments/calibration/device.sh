#!/usr/bin/env bash
# Calibrate the simulator on one H200 (the device machine): writes $OUT/calibration.json, its
# $OUT/manifest.json and $OUT/calibrate.log. Then, on the development machine, copy
# calibration.json to results/calibration/h200.json (probe.sim.calibration reads it).
set -euo pipefail
OUT="${OUT:-/tmp/calibration}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv \
  | tee "$OUT/calibrate.log"
PYTHONUNBUFFERED=1 python3 -m experiments.calibration.calibrate_h200 --device cuda --out "$OUT" \
  2>&1 | tee -a "$OUT/calibrate.log"
