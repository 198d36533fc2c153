#!/usr/bin/env bash
# On the 16 CPU cores of a lent device machine, in one call: experiments.planner.planner_speed
# (alone, first), then the solver benchmark with one worker per core, results under $OUT/bench,
# and $OUT/manifest.json (planner_speed's own manifest folded in). The report (with plots) is
# then rebuilt here from the fetched results:
#     python -m solvers_bench --report-only --out results/solvers_bench
#
# The device's python3 (3.12) lacks ortools, highspy, typer and rich: they travel as one xz
# archive of Python 3.12 wheels unpacked (the tracked tree plus the plain wheels would pass the
# 64 MiB a call may carry). Build it once here, in the repository root:
#     echo /.whl/ >> .git/info/exclude; echo /.site312/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       --platform any -d .whl ortools==9.15.6755 highspy==1.16.0 absl-py immutabledict \
#       protobuf==6.33.6 typing-extensions typer rich safetensors click shellingham \
#       markdown-it-py mdurl pygments annotated-doc pydantic pydantic-core annotated-types \
#       typing-inspection
#     mkdir -p /tmp/site312 .site312 && for w in .whl/*.whl; do unzip -q -o "$w" -d /tmp/site312; done
#     tar -C /tmp/site312 -cJf .site312/site.tar.xz .
# Then: run(command="PROBE_GIT_COMMIT=<git rev-parse --short HEAD here> bash
#          experiments/solvers_bench/device.sh", carry=[".site312"], timeout_s=600)
# (the copy's .git on the device can be stale, so the commit is named by the caller).
# BENCH_ARGS overrides the benchmark's arguments; SPEED=0 skips planner_speed (run
# first, alone); SITE=none skips the unpacking (local test).
set -uo pipefail
START=$(date -u +%FT%TZ)
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/solvers_bench_out}
mkdir -p "$OUT/bench"
if [ "${SITE:-}" != "none" ]; then
  mkdir -p /tmp/site && tar -C /tmp/site -xJf .site312/site.tar.xz || exit 1
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
python3 -c 'import sys, os, numba, numpy, ortools, highspy; print(sys.version.split()[0], "numba",
numba.__version__, "numpy", numpy.__version__, "ortools", ortools.__version__, "cpus",
os.cpu_count())' 2>&1 | tee "$OUT/bench/env.txt"
if [ "${SPEED:-1}" = "1" ]; then
  # The planner speed benchmark first, alone on the idle machine (about a minute).
  COLUMNS=160 python3 -m experiments.planner.planner_speed --out "$OUT/planner_speed.json" \
    > "$OUT/planner_speed.txt" 2>&1 || echo "planner_speed failed" >> "$OUT/bench/env.txt"
fi
WORKERS=${WORKERS:-$(nproc)}
# shellcheck disable=SC2086
python3 -m solvers_bench --full --workers "$WORKERS" --no-plots --out "$OUT/bench" \
  ${BENCH_ARGS:---proof 720 --proof-sizes 4x64,4x64,4x64,8x64,8x64,4x128,8x128 --max-minutes 7} \
  2>&1 | tail -60 | tee "$OUT/bench/console.txt"
status=${PIPESTATUS[0]}
# At most 8 files come back: the report's files are rebuilt here from results.jsonl.
rm -f "$OUT/bench/report.md" "$OUT/bench/results.csv" "$OUT/bench/summary.json"
python3 -m experiments.manifest "$OUT" --started "$START" --fold \
  --command "bash experiments/solvers_bench/device.sh${BENCH_ARGS:+ (BENCH_ARGS=$BENCH_ARGS)}"
exit "$status"
