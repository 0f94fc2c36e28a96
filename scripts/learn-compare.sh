#!/usr/bin/env bash
# Learning comparison against the official code (issue 14): the official X-VLM Pretrain.py loop
# (scripts/official-pretrain-loop.py, PyTorch) and xvlm's pre-training (`xvlm-coord run`, world 1) train the
# tiny model of bench/tiny-learn/task.yaml from scratch on the same synthetic corpus, SEEDS each; xvlm also
# runs the ablation bench/tiny-learn/task-exact-ops.yaml (exact_ops: True in images and regions, the
# intended RandAugment arithmetic instead of the official uint8 wraps) for ABLATION_SEEDS. Then
# scripts/learn-eval.py evaluates every run's final weights with the official model code on a held-out
# synthetic corpus, and scripts/learn-compare.py prints the table: loss windows and held-out metrics,
# official min / max / band against xvlm's seed mean. A benchmark-style tool, not a test.
#
#   XVLM_OFFICIAL=/work/official/X-VLM OFFICIAL_PY=/work/official/venv/bin/python scripts/learn-compare.sh
#
# XVLM_OFFICIAL: the official checkout (cb4fff1), OFFICIAL_PY: its venv python (shared/bench/OFFICIAL-ENV.md).
# SEEDS ("1 2 3"), ABLATION_SEEDS ("1 2"; "" skips the ablation), OUT (/tmp/learn-compare),
# BIN (target/debug), HELDOUT (/tmp/tinyheld: `xvlm synth-data --images 250 --seed 1`, made if missing),
# LANES (2): with 2, two lanes side by side, each pinned to one core (taskset -c 0 / -c 1) at one
# libtorch thread (an xvlm trainer takes its affinity's cores as threads), each taking the next run not
# yet claimed (an official run takes about 1.3 xvlm runs at one thread, more under load: fixed lanes leave one
# idle); with 1, everything runs one after another on 2 threads. RUNS (default: official-S and xvlm-S
# for SEEDS, exact-S for ABLATION_SEEDS, in that order): the runs the train stage makes, e.g.
# RUNS="official-2 exact-1" to redo two. STAGES ("train eval compare"): a later stage reads what an
# earlier call left in OUT. The iteration count is the config's schedule: EPOCHS (48) x 25 iterations
# (800 training images, batch 32); another EPOCHS trains copies of the two configs under OUT/configs
# with only `epochs` changed (their json paths made absolute). Loss windows end at a third, two thirds
# and all of the iterations.
# Seed S: official --seed S --rng-seed S (initial weights, and RNG_SEED for data order, augmentation and
# region coins); xvlm job seed S (replaces RNG_SEED; initial weights derive from it). The RNG streams
# differ between the two programs; the comparison is of distributions over seeds.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
: "${XVLM_OFFICIAL:?set XVLM_OFFICIAL to the official X-VLM checkout}"
: "${OFFICIAL_PY:?set OFFICIAL_PY to the python of its venv}"
SEEDS=${SEEDS:-1 2 3}
ABLATION_SEEDS=${ABLATION_SEEDS-1 2}
OUT=${OUT:-/tmp/learn-compare}
BIN=${BIN:-$ROOT/target/debug}
HELDOUT=${HELDOUT:-/tmp/tinyheld}
LANES=${LANES:-2}
STAGES=${STAGES:-train eval compare}
BENCH=$ROOT/bench/tiny-learn
EPOCHS=${EPOCHS:-48}
[[ "$EPOCHS" =~ ^[1-9][0-9]*$ ]] || { echo "EPOCHS=$EPOCHS: give a whole number of epochs (25 iterations each)" >&2; exit 2; }
ITERS=$((EPOCHS * 25))
CONF=$BENCH # where task.yaml and task-exact-ops.yaml are read
if [ "$EPOCHS" != 48 ]; then
  CONF=$OUT/configs
  mkdir -p "$CONF"
  for f in task.yaml task-exact-ops.yaml; do
    grep -q 'epochs: 48,' "$BENCH/$f" || { echo "$BENCH/$f: no 'epochs: 48,' to change" >&2; exit 2; }
    sed -e "s/epochs: 48,/epochs: $EPOCHS,/" -e "s#'\.\./tiny-pretrain/#'$ROOT/bench/tiny-pretrain/#g" \
      "$BENCH/$f" >"$CONF/$f"
  done
fi
CORPUS=/tmp/tinycorpus # the paths task.yaml names
[ -f "$CORPUS/vocab.txt" ] || "$BIN/xvlm" synth-data --out "$CORPUS" --images 1000 --seed 0 >/dev/null
[ -f "$HELDOUT/vocab.txt" ] || "$BIN/xvlm" synth-data --out "$HELDOUT" --images 250 --seed 1 >/dev/null
cmp -s "$CORPUS/vocab.txt" "$HELDOUT/vocab.txt" ||
  echo "note: the held-out corpus has its own vocab.txt; it is read with the training one" >&2
mkdir -p "$OUT"
if [ "$LANES" = 2 ]; then PIN0="taskset -c 0" PIN1="taskset -c 1" THREADS=1
else PIN0="" PIN1="" THREADS=2; fi

official() { # $1: seed, $2: taskset prefix
  local t0=$SECONDS
  $2 "$OFFICIAL_PY" "$ROOT/scripts/official-pretrain-loop.py" --official "$XVLM_OFFICIAL" \
    --config "$CONF/task.yaml" --iters "$ITERS" --threads "$THREADS" --seed "$1" --rng-seed "$1" \
    --out "$OUT/official-$1.jsonl" --save "$OUT/official-$1.pth" --workdir "$OUT/official-$1" \
    2>"$OUT/official-$1.log" >"$OUT/official-$1.txt"
  echo "official seed $1: $((SECONDS - t0)) s; $(cat "$OUT/official-$1.txt")"
}

xvlm() { # $1: run name (xvlm-S, exact-S), $2: seed, $3: task config, $4: taskset prefix; in its own
  # folder (the run's workers write under its state dir: state/work/)
  local dir=$OUT/$1 t0=$SECONDS
  rm -rf "$dir"
  mkdir -p "$dir"
  (cd "$dir" && $4 "$BIN/xvlm-coord" run "$BENCH/job.yaml" --local-workers 1 --set "seed=$2" \
    --set "config=$CONF/$3" --set "steps=$ITERS" --listen 127.0.0.1:0 --state-dir "$dir/state" --storage "file://$dir/runs" \
    >"$dir/progress.txt" 2>"$dir/coord.log")
  ln -sf "$(ls "$dir"/state/work/*/g1/rank0.log)" "$dir/rank0.log"
  ln -sf "$(ls "$dir"/runs/*/final/model.safetensors)" "$dir/model.safetensors"
  echo "$1 (seed $2): $((SECONDS - t0)) s; $(grep -c 'optimizer step.*kind=General' "$dir/rank0.log") iterations"
}

if [[ " $STAGES " == *" train "* ]]; then
  if [ -z "${RUNS:-}" ]; then
    RUNS=""
    for s in $SEEDS; do RUNS+=" official-$s"; done
    for s in $SEEDS; do RUNS+=" xvlm-$s"; done
    for s in $ABLATION_SEEDS; do RUNS+=" exact-$s"; done
  fi
  echo "train:$RUNS; $LANES lane(s), load $(cut -d' ' -f1-3 /proc/loadavg)"
  one_run() { # $1: run name, $2: taskset prefix
    local seed=${1#*-}
    case $1 in
      official-*) official "$seed" "$2" ;;
      xvlm-*) xvlm "$1" "$seed" task.yaml "$2" ;;
      exact-*) xvlm "$1" "$seed" task-exact-ops.yaml "$2" ;;
      *) echo "unknown run $1 (official-S, xvlm-S, exact-S)" >&2; return 2 ;;
    esac
  }
  CLAIMS=$(mktemp -d "$OUT/.claims.XXXXXX")
  lane() { # $1: taskset prefix; claims runs (an atomic mkdir each) until none is left
    local r
    for r in $RUNS; do
      if mkdir "$CLAIMS/$r" 2>/dev/null; then one_run "$r" "$1"; fi
    done
  }
  if [ "$LANES" = 2 ]; then
    lane "$PIN0" & pid=$!
    lane "$PIN1"
    wait "$pid"
  else
    lane ""
  fi
  rm -rf "$CLAIMS"
fi

if [[ " $STAGES " == *" eval "* ]]; then
  args=()
  for s in $SEEDS; do args+=(--weights "$OUT/official-$s.pth" --label "official-$s"); done
  for s in $SEEDS; do args+=(--weights "$OUT/xvlm-$s/model.safetensors" --label "xvlm-$s"); done
  for s in $ABLATION_SEEDS; do args+=(--weights "$OUT/exact-$s/model.safetensors" --label "exact-$s"); done
  (cd "$ROOT/scripts" && "$OFFICIAL_PY" learn-eval.py --official "$XVLM_OFFICIAL" --config "$CONF/task.yaml" \
    --heldout "$HELDOUT" "${args[@]}" --out "$OUT/metrics.jsonl" 2>"$OUT/eval.log")
fi

if [[ " $STAGES " == *" compare "* ]]; then
  python3 "$ROOT/scripts/learn-compare.py" --dir "$OUT" --seeds $SEEDS --ablation-seeds $ABLATION_SEEDS \
    --windows $((ITERS / 3)) $((2 * ITERS / 3)) "$ITERS" |
    tee "$OUT/table.md"
fi
