#!/usr/bin/env bash
# One call on a lent multi-GPU kind (any G >= 2): link times, predictor cost variants, and the
# runtime at ep = G under every balancing policy at equal extra slots (static, eplb, eplb-lp,
# probe, probe-on-eplb; their JSONs and step logs packed in rt_policies.tar.gz: compare the
# sample tokens, no policy may change the output), then, in the time left, static and probe
# again with --dispatch fixed (fixed-capacity all-to-alls, no host sync per MoE layer; same
# tarball, *-fixed.json; the same tokens again), probe also with --plan-on device, the
# expert-parallel decode step captured in CUDA graphs against the same step eager
# (experiments/runtime/ep_graphs.py; its files in the same tarball, rt/ep_graphs/), then the
# simulator's error against the runs (experiments/runtime/sim_error.py, CPU only; rerun it anywhere on the folder that comes back).
# Writes everything under $OUT (8 files at most, the device's limit, manifest.json included: the
# producers' own manifests are folded into it):
#   run(command="bash experiments/runtime/device_multigpu.sh", kind="nvidia-h200-x2",
#       timeout_s=590)
# Steps are independent; each is time-boxed so a slow one does not cost the others.
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date -u +%FT%TZ)
OUT=${OUT:-out_multigpu}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
G=$(nvidia-smi -L | wc -l)
LOG="$OUT/log.txt"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nvidia-smi topo -m
  python3 -c 'import torch; print("torch", torch.__version__, "nccl", torch.cuda.nccl.version())'
} 2>&1 | tee "$LOG"
step() { echo "== $1 ($(date -u +%T))" | tee -a "$LOG"; }

step "1. all-to-all and p2p times, G=$G"
timeout 90 python3 -m torch.distributed.run --nproc-per-node "$G" -m experiments.comm.a2a_bench \
  --out "$OUT" 2>&1 | tee -a "$LOG"

step "2. predictor cost: plain vs the Triton forms, CUDA graphs, one GPU"
timeout 120 python3 -m experiments.predictor.predictor_cost --device cuda \
  --variants plain,triton,triton_cublas --iters 100 --out "$OUT" 2>&1 | tee -a "$LOG"

RT="--random-config gpt-oss-like --layers 4 --dtype bf16 --requests 32 --prompt-len 512
    --max-new-tokens 32 --stagger 0 --max-batch-tokens 8192 --prefill-chunk 1024
    --warmup-steps 2 --timeout 60"
# Every policy at the same extra slots per rank (K=2), on the same requests; eplb-lp needs
# highspy (carry it as a wheel, see the device notes in README) and is skipped without it.
mkdir -p "$OUT/rt"
for policy in static eplb eplb-lp probe probe-on-eplb; do
  if [ "$policy" = eplb-lp ] && ! python3 -c 'import highspy' 2>/dev/null; then
    step "3. runtime ep=$G, --policy $policy: skipped (highspy is not installed)"; continue
  fi
  step "3. runtime ep=$G, --policy $policy --extra-slots 2"
  timeout 75 python3 -m torch.distributed.run --nproc-per-node "$G" -m probe.runtime $RT \
    --policy "$policy" --extra-slots 2 --out "$OUT/rt/$policy.json" \
    --step-log "$OUT/rt/$policy.steps.npz" 2>&1 | tee -a "$LOG"
done
step "3b. EP decode step in CUDA graphs (NCCL inside): logits graph on == off, times"
timeout 90 python3 -m torch.distributed.run --nproc-per-node "$G" -m experiments.runtime.ep_graphs \
  --device cuda --out "$OUT/rt/ep_graphs" 2>&1 | tee -a "$LOG"
# Fixed-capacity dispatch, only in what is left of the call's time (the steps above keep
# theirs): each run gets min(75 s, what remains before 570 s) and is skipped below 40 s.
# probe-device: PROBE planning on the device (--plan-on device: the router-prior predictor and
# the GPU greedy on a side stream, the GPU assignment kernel on the true counts; no host read
# per MoE layer); its tokens must equal the other runs' too.
for variant in probe probe-device static; do
  left=$((570 - SECONDS)); box=$(( left < 75 ? left : 75 ))
  if [ "$box" -lt 40 ]; then
    step "4. runtime ep=$G, $variant --dispatch fixed: skipped (${left} s left)"; continue
  fi
  extra="--policy $variant"
  [ "$variant" = probe-device ] && extra="--policy probe --plan-on device --predictor router"
  step "4. runtime ep=$G, $extra --dispatch fixed --capacity-factor 2 (${box} s box)"
  timeout "$box" python3 -m torch.distributed.run --nproc-per-node "$G" -m probe.runtime $RT \
    $extra --extra-slots 2 --dispatch fixed --capacity-factor 2 \
    --out "$OUT/rt/$variant-fixed.json" 2>&1 | tee -a "$LOG"
done
tar -czf "$OUT/rt_policies.tar.gz" -C "$OUT" rt && rm -rf "$OUT/rt"

step "4. simulator vs runtime: link fit, replay of every run, error table (CPU)"
timeout 60 python3 -m experiments.runtime.sim_error --measured "$OUT" --out "$OUT" 2>&1 \
  | tee -a "$LOG"

step "done"
ls -la "$OUT" 2>&1 | tee -a "$LOG"
python3 -m experiments.manifest "$OUT" --command "bash experiments/runtime/device_multigpu.sh" \
  --started "$START" --fold
