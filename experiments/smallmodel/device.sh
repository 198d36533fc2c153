#!/usr/bin/env bash
# Train the small MoE test-bench model on one GPU and pack what comes back into $OUT.
#
# One device call (about 7 minutes on one H200, machine start included):
#   run(command="bash experiments/smallmodel/device.sh", carry=["data/smallmodel"], timeout_s=600)
# Recording traces from the trained checkpoint (a second call, about 4 minutes):
#   run(command="STAGE=record bash experiments/smallmodel/device.sh",
#       carry=["models/smallmodel", "data/smallmodel/heldout.jsonl"], timeout_s=300)
# Needs data/smallmodel/corpus.jsonl (python -m experiments.smallmodel.build_corpus) in the
# working tree. The recording's files (and its manifest.json) then go to data/recorded/smallmodel/.
# Environment knobs: MINUTES (training budget, default 4.5), RECORD=1 to also record traces on
# the GPU (off by default: experiments/smallmodel/record.py runs on CPU afterwards); DEVICE and
# TRAIN_ARGS (extra train.py arguments) for a CPU smoke test of this script.
#
# $OUT receives at most 8 files, each under 16 MiB: the safetensors shards (15 MB each) and
# meta.tar (config, index, loss.csv, train_summary.json, manifest.json, train.log, env.txt).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/smallmodel_out}
mkdir -p "$OUT"

if [ "${STAGE:-train}" = "record" ]; then
  # Second call: record traces from the trained checkpoint on the GPU (the CPU of the
  # development machine was too slow). Carry ["models/smallmodel", "data/smallmodel/heldout.jsonl"].
  python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))' \
    2>&1 | tee "$OUT/record.log"
  python3 -m experiments.smallmodel.record --ckpt models/smallmodel \
    --corpus data/smallmodel/heldout.jsonl --out "$OUT" --device "${DEVICE:-cuda}" \
    --max-seconds "${MAX_SECONDS:-170}" ${RECORD_ARGS:-} 2>&1 | tee -a "$OUT/record.log"
  status=${PIPESTATUS[0]}
  ls -la "$OUT"
  exit "$status"
fi

MINUTES=${MINUTES:-4.5}
CKPT=/tmp/smallmodel_ckpt
mkdir -p "$OUT" "$CKPT"
LOG="$OUT/train.log"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import sys, torch, transformers, safetensors; print(sys.version.split()[0], \
torch.__version__, transformers.__version__, safetensors.__version__, torch.cuda.is_available())'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

python3 -m experiments.smallmodel.train --corpus data/smallmodel/corpus.jsonl --out "$CKPT" \
  --minutes "$MINUTES" --device "${DEVICE:-cuda}" ${TRAIN_ARGS:-} 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
echo "train.py exit status $status" | tee -a "$LOG"

if [ "$status" -eq 0 ] && [ "${RECORD:-0}" = "1" ]; then
  python3 -m experiments.smallmodel.record --ckpt "$CKPT" --out "$CKPT/traces" --device cuda \
    2>&1 | tee -a "$LOG" || echo "record.py failed (non-fatal)" | tee -a "$LOG"
fi

# Shards travel as they are; everything small goes into one tar.
for f in "$CKPT"/*.safetensors; do
  [ -e "$f" ] && cp "$f" "$OUT/"
done
cp "$LOG" "$CKPT/train.log"
cp "$OUT/env.txt" "$CKPT/env.txt"
(cd "$CKPT" && tar cf "$OUT/meta.tar" --exclude='./model*.safetensors' .)
rm -f "$OUT/train.log" "$OUT/env.txt"
ls -la "$OUT"
exit "$status"
