#!/usr/bin/env bash
# Training-step speed against the official code, side by side (issue 15): the official X-VLM model
# (../shared/bench/official_step_bench.py, PyTorch) and xvlm's `train_step` bench (bench/train_step.rs)
# time the same phases on the same config, batch and threads: an image-text train step, a region train
# step, an eval forward (no grad) and clip + AdamW alone. They run alternately in one sitting (official,
# xvlm, official, xvlm, ...), and the ratios xvlm / official of the mean phase times and of the peak RSS
# are printed with the issue's targets. It is a benchmark, never a test: nothing in CI runs it.
#
#   XVLM_OFFICIAL=/work/official/X-VLM OFFICIAL_PY=/work/official/venv/bin/python scripts/step-speed.sh
#
# XVLM_OFFICIAL: the official checkout (cb4fff1); OFFICIAL_PY: its venv python (../shared/bench/OFFICIAL-ENV.md).
# CONFIG (base | tiny), ROUNDS (2: pairs of runs), ITERS (3 timed calls per phase after 1 warm-up),
# BATCH (2), THREADS (2), OUT (/tmp/step-speed), OFFICIAL_BENCH (../shared/bench/official_step_bench.py),
# BENCH_BIN (the train_step bench binary; default: built here with `cargo bench --no-run`).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
: "${XVLM_OFFICIAL:?set XVLM_OFFICIAL to the official X-VLM checkout}"
: "${OFFICIAL_PY:?set OFFICIAL_PY to the python of its venv}"
CONFIG=${CONFIG:-base}
ROUNDS=${ROUNDS:-2}
ITERS=${ITERS:-3}
BATCH=${BATCH:-2}
THREADS=${THREADS:-2}
OUT=${OUT:-/tmp/step-speed}
OFFICIAL_BENCH=${OFFICIAL_BENCH:-$ROOT/../shared/bench/official_step_bench.py}
case "$CONFIG" in base | tiny) ;; *) echo "CONFIG=$CONFIG: expected base or tiny" >&2; exit 2 ;; esac
for n in ROUNDS ITERS BATCH THREADS; do
  [[ ${!n} =~ ^[1-9][0-9]*$ ]] || { echo "$n=${!n}: expected a whole number >= 1" >&2; exit 2; }
done
[ -f "$OFFICIAL_BENCH" ] || { echo "OFFICIAL_BENCH=$OFFICIAL_BENCH does not exist" >&2; exit 2; }
if [ -z "${BENCH_BIN:-}" ]; then
  BENCH_BIN=$(cd "$ROOT" && cargo bench -p xvlm-model --bench train_step --profile dev --no-run \
    --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "train_step" and m.get("executable"):
        print(m["executable"])')
fi
[ -x "$BENCH_BIN" ] || { echo "no train_step bench binary (BENCH_BIN=$BENCH_BIN)" >&2; exit 2; }
rm -rf "$OUT"
mkdir -p "$OUT"

for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS: official" >&2
  XVLM_CONFIGS=$ROOT/configs "$OFFICIAL_PY" "$OFFICIAL_BENCH" --config "$CONFIG" --configs "$ROOT/configs" \
    --xvlm "$XVLM_OFFICIAL" --threads "$THREADS" --warmup 1 --iters "$ITERS" --batch "$BATCH" \
    --phases train_general,train_region,eval_forward,clip_adamw \
    --out "$OUT/official-$round.json" >/dev/null 2>"$OUT/official-$round.log"
  echo "round $round/$ROUNDS: xvlm" >&2
  "$BENCH_BIN" --bench --only "$CONFIG" --iters "$ITERS" --batch "$BATCH" --threads "$THREADS" \
    --configs "$ROOT/configs" --json "$OUT/xvlm-$round.json" >"$OUT/xvlm-$round.log" 2>&1
done

python3 - "$OUT" "$ROUNDS" "$CONFIG" <<'PY'
import json, os, sys
out, rounds, config = sys.argv[1], int(sys.argv[2]), sys.argv[3]
read = lambda side: [json.loads(open(os.path.join(out, f"{side}-{r}.json")).readline()) for r in range(1, rounds + 1)]
official, xvlm = read("official"), read("xvlm")
targets = {"train_general": 0.8, "train_region": 0.8, "eval_forward": 0.7, "clip_adamw": 0.4}
names = {"train_general": "train step, image-text batch", "train_region": "train step, region batch",
         "eval_forward": "eval forward (no grad)", "clip_adamw": "clip + AdamW alone"}
print(f"config {config}: official {official[0]['params']} parameters, xvlm {xvlm[0]['params']}; "
      f"batch {xvlm[0]['batch']}, {xvlm[0]['threads']} threads, {rounds} alternating rounds")
print("| phase | official means (s) | xvlm means (s) | xvlm / official | target | met |")
print("|---|---|---|---|---|---|")
fmt = lambda xs: " ".join(f"{x:.3f}" for x in xs)
for phase, target in targets.items():
    o = [r["phases"][phase]["mean"] for r in official]
    x = [r["phases"][phase]["mean"] for r in xvlm]
    ratio = (sum(x) / len(x)) / (sum(o) / len(o))
    print(f"| {names[phase]} | {fmt(o)} | {fmt(x)} | {ratio:.2f} | <= {target} | {'yes' if ratio <= target else 'no'} |")
o = [r["peak_rss_mib"] for r in official]
x = [r["peak_rss_mib"] for r in xvlm]
ratio = max(x) / max(o)
print(f"| peak RSS (MiB) | {fmt(o)} | {fmt(x)} | {ratio:.2f} | <= 1.0 | {'yes' if ratio <= 1.0 else 'no'} |")
PY
