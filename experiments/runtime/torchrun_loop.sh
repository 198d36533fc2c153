#!/usr/bin/env bash
# Runs the two-rank CPU/gloo torchrun job of tests/test_engine.py::test_torchrun_two_cpu_ranks
# N times (default 50) and counts the runs that did not exit 0 (e.g. a rank aborting at exit).
# Usage (from the repository root): experiments/runtime/torchrun_loop.sh [N] [RESULT_FILE]
# Prints one line per failure (exit code, last stderr lines; PYTHONFAULTHANDLER=1 adds the
# Python stacks of an aborting rank) and a summary line; with
# RESULT_FILE also writes the summary (N, failures, date, machine) there.
set -u
N=${1:-50}
RESULT=${2:-}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cat >"$WORK/config.json" <<'JSON'
{"model_type": "qwen3_moe", "vocab_size": 80, "hidden_size": 32, "num_hidden_layers": 2,
 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 8,
 "num_experts_per_tok": 2, "moe_intermediate_size": 16, "intermediate_size": 32,
 "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "norm_topk_prob": true,
 "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 256,
 "tie_word_embeddings": false}
JSON
fail=0
t0=$(date +%s)
for i in $(seq 1 "$N"); do
    PYTHONFAULTHANDLER=1 PYTHONPATH="$ROOT" OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc-per-node 2 \
        -m probe.runtime --random-config "$WORK/config.json" --device cpu --requests 2 \
        --prompt-len 10 --max-new-tokens 4 --method greedy_ref --timeout 30 --quiet \
        --out "$WORK/ep.json" >"$WORK/stdout" 2>"$WORK/stderr"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        fail=$((fail + 1))
        echo "run $i: exit code $rc"
        grep -v '^\s*$' "$WORK/stderr" | tail -n 5 | sed 's/^/    /'
    fi
done
t1=$(date +%s)
line="runs: $N  failures: $fail  seconds: $((t1 - t0))  date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  machine: $(uname -srm), $(nproc) CPUs, $(python -c 'import torch; print("torch", torch.__version__)')"
echo "$line"
if [ -n "$RESULT" ]; then
    mkdir -p "$(dirname "$RESULT")"
    {
        echo "# experiments/runtime/torchrun_loop.sh $N $RESULT"
        echo "# commit $(git -C "$ROOT" rev-parse --short HEAD)"
        echo "$line"
    } >"$RESULT"
fi
[ "$fail" -eq 0 ]
