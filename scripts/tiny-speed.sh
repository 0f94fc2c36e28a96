#!/usr/bin/env bash
# Tiny pre-training speed, side by side (issue 15): iterations/s of the official X-VLM Pretrain.py loop
# (scripts/official-pretrain-loop.py, PyTorch) and of xvlm's pre-training (`xvlm-coord run`, world 1) on
# the same synthetic corpus and the same bench/tiny-pretrain/task.yaml, run alternately in one sitting:
# official, xvlm, official, xvlm. Absolute numbers drift with the machine's load; compare the ratio.
#
#   XVLM_OFFICIAL=/work/official/X-VLM OFFICIAL_PY=/work/official/venv/bin/python scripts/tiny-speed.sh
#
# XVLM_OFFICIAL: the official checkout (cb4fff1), OFFICIAL_PY: its venv python (shared/bench/OFFICIAL-ENV.md).
# ITERS (300), WARMUP (10: iterations left out of it/s), OUT (/tmp/tiny-speed), BIN (target/debug),
# WAIT_IDLE (600: at most this many s of waiting for an idle machine before each run).
# Threads: the official runner sets torch.set_num_threads(2); an xvlm trainer takes the machine's cores
# divided by its worker's slots as libtorch threads (2 on the 2-core machine this is written for).
# it/s: both from the clock at the end of each iteration (its image-text optimizer step) after WARMUP
# iterations: the official runner's own, xvlm's trainer log (one timestamped line per optimizer step).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
: "${XVLM_OFFICIAL:?set XVLM_OFFICIAL to the official X-VLM checkout}"
: "${OFFICIAL_PY:?set OFFICIAL_PY to the python of its venv}"
ITERS=${ITERS:-300}
WARMUP=${WARMUP:-10}
OUT=${OUT:-/tmp/tiny-speed}
BIN=${BIN:-$ROOT/target/debug}
BENCH=$ROOT/bench/tiny-pretrain
CORPUS=/tmp/tinycorpus # the paths task.yaml names
[ -f "$CORPUS/vocab.txt" ] || "$BIN/xvlm" synth-data --out "$CORPUS" --images 1000 --seed 0 >/dev/null
rm -rf "$OUT"
mkdir -p "$OUT"

official() { # $1: run number
  "$OFFICIAL_PY" "$ROOT/scripts/official-pretrain-loop.py" --official "$XVLM_OFFICIAL" \
    --config "$BENCH/task.yaml" --iters "$ITERS" --warmup "$WARMUP" --threads 2 --seed 42 \
    --out "$OUT/official-$1.jsonl" --workdir "$OUT/official-$1" 2>"$OUT/official-$1.log" |
    tee "$OUT/official-$1.txt" | grep -o 'it/s=[0-9.]*' | cut -d= -f2
}

xvlm() { # $1: run number; its own folder (the run's workers write under its state dir: state/work/)
  local dir=$OUT/xvlm-$1 t0 t1
  mkdir -p "$dir"
  t0=$EPOCHREALTIME
  (cd "$dir" && "$BIN/xvlm-coord" run "$BENCH/job.yaml" --local-workers 1 --set "steps=$ITERS" \
    --listen 127.0.0.1:0 --state-dir "$dir/state" --storage "file://$dir/runs" >"$dir/progress.txt" \
    2>"$dir/coord.log")
  t1=$EPOCHREALTIME
  # The trainer's log has one timestamped line per optimizer step; an iteration ends with its
  # image-text (General) step, as in the official loop.
  python3 - "$dir"/state/work/*/g1/rank0.log "$WARMUP" "$t0" "$t1" "$dir/summary.txt" <<'PY'
import sys
from datetime import datetime
log, w, t0, t1, summary = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
ends = [datetime.fromisoformat(line.split()[0]).timestamp() for line in open(log)
        if "optimizer step" in line and "kind=General" in line]
rate = (len(ends) - w) / (ends[-1] - ends[w - 1])
with open(summary, "w") as f:
    f.write(f"xvlm: it/s={rate:.3f} over iterations {w + 1}-{len(ends)} ({ends[-1] - ends[w - 1]:.1f} s); "
            f"run start to the end of iteration 1 {ends[0] - t0:.1f} s, all {len(ends)} iterations "
            f"{ends[-1] - t0:.1f} s, after the last one {t1 - ends[-1]:.1f} s; per-step losses in {log}\n")
print(f"{rate:.3f}")
PY
}

# CPU seconds: the whole machine's busy time, and this script's reaped descendants' (bash `times`); their
# difference over a run is what other processes took from it.
busy() { awk -v hz="$(getconf CLK_TCK)" '/^cpu / { print ($2 + $3 + $4 + $7 + $8 + $9) / hz }' /proc/stat; }
own() { # in this shell, not in $(...): a subshell's `times` starts from zero
  times >"$OUT/times.txt"
  awk 'NR == 2 { split($1, u, /[ms]/); split($2, s, /[ms]/); print u[1] * 60 + u[2] + s[1] * 60 + s[2] }' \
    "$OUT/times.txt" >"$OUT/own.txt"
}
# Before each run, wait (at most WAIT_IDLE s, default 600) until three 2 s windows in a row see under
# 0.2 CPU-s busy: the machine is shared, and a compile beside a 2-thread run slows it several times.
wait_idle() {
  local waited=0 quiet=0 a
  while [ "$quiet" -lt 3 ] && [ "$waited" -lt "${WAIT_IDLE:-600}" ]; do
    a=$(busy)
    sleep 2
    waited=$((waited + 2))
    if awk -v a="$a" -v b="$(busy)" 'BEGIN { exit !(b - a < 0.2) }'; then quiet=$((quiet + 1)); else quiet=0; fi
  done
  echo "$waited"
}

declare -A rate
for run in 1 2 3 4; do
  waited=$(wait_idle)
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  own
  start=$(date +%s) busy0=$(busy) own0=$(cat "$OUT/own.txt")
  if [ $((run % 2)) -eq 1 ]; then prog=official; else prog=xvlm; fi
  rate[$run]=$($prog $run)
  own
  own1=$(cat "$OUT/own.txt") busy1=$(busy)
  printf 'run %d %-8s it/s %6s  wall %4d s  (idle wait %d s, load before %s)  CPU-s: own %s, others %s\n' \
    "$run" "$prog" "${rate[$run]}" $(($(date +%s) - start)) "$waited" "$load" \
    "$(awk -v a="$own0" -v b="$own1" 'BEGIN { printf "%.0f", b - a }')" \
    "$(awk -v a="$busy0" -v b="$busy1" -v c="$own0" -v d="$own1" 'BEGIN { printf "%.0f", (b - a) - (d - c) }')"
done
echo "load after $(cut -d' ' -f1-3 /proc/loadavg); logs and losses in $OUT"
cat "$OUT"/official-1.txt "$OUT"/xvlm-2/summary.txt "$OUT"/official-3.txt "$OUT"/xvlm-4/summary.txt
awk -v o1="${rate[1]}" -v x2="${rate[2]}" -v o3="${rate[3]}" -v x4="${rate[4]}" 'BEGIN {
  printf "xvlm/official: %.2f (mean it/s of the two xvlm runs over the two official runs)\n", (x2 + x4) / (o1 + o3) }'
