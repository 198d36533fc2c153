#!/usr/bin/env bash
# Depth test on one GPU: train the 20-layer model, distil predictors, score held out.
#   run(command="MINUTES=4 bash experiments/deepmodel/device.sh", carry=["data/smallmodel"],
#       timeout_s=600)                 # made results/deepmodel/run1 and run2 (~480-550 s)
# Knobs: MINUTES (training budget, default 4.5; 4 leaves room in a 600 s call), RUN_ARGS (extra
# experiments.deepmodel.run arguments, e.g. RUN_ARGS='--hidden 1024,256' to score two residual
# widths, ~+100 s: too much with training in one call; see below). $OUT gets env.txt, run.log and
# the run's files with its manifest.json (7 files).
# Carry limit: the tracked tree plus data/smallmodel (27 MB) can exceed run's 64 MiB. Then carry
# the corpus gzipped (7 MB), made here with
#   mkdir -p data/smallmodel_gz && for f in corpus.jsonl heldout.jsonl stats.json; do
#     gzip -c data/smallmodel/$f > data/smallmodel_gz/$f.gz; done
# and carry=["data/smallmodel_gz"]; this script unpacks it.
# Training saves the checkpoint to /tmp/deepmodel_ckpt on the device; if a call runs out of time
# after training, the next call on the still-warm machine can go on from it with
#   RUN_ARGS='--no-train --ckpt /tmp/deepmodel_ckpt ...'   (made results/deepmodel/run3)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/deepmodel_out}
mkdir -p "$OUT"
if [ -d data/smallmodel_gz ] && [ ! -f data/smallmodel/corpus.jsonl ]; then
  mkdir -p data/smallmodel
  for gz in data/smallmodel_gz/*.gz; do
    gunzip -c "$gz" > "data/smallmodel/$(basename "$gz" .gz)"
  done
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total --format=csv
  python3 -c 'import torch; print(torch.__version__, torch.cuda.is_available())'; } \
  > "$OUT/env.txt" 2>&1
python3 -m experiments.deepmodel.run --minutes "${MINUTES:-4.5}" --out "$OUT" ${RUN_ARGS:-} \
  2>&1 | tee "$OUT/run.log"
status=${PIPESTATUS[0]}
ls -la "$OUT"
exit "$status"
