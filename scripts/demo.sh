#!/usr/bin/env bash
# The main job, end to end on this machine: set up, build, check the runtime, write a synthetic
# multi-grained corpus, pre-train the tiny X-VLM on it data-parallel over 2 local workers through the
# coordinator (live progress), then evaluate zero-shot image-text retrieval on held-out pairs, fine-tune
# for retrieval and evaluate again.
# Everything it writes goes under demo-out/ (removed at the start).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
scripts/setup.sh
# shellcheck disable=SC1091
source .env.build
cargo build --workspace --bins
BIN=$ROOT/target/debug
OUT=$ROOT/demo-out
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== xvlm doctor"
"$BIN/xvlm" doctor

echo "== synthetic corpus (shapes at known boxes, captions from the content; train/val/test splits)"
# Large shapes on one plain background colour: the captions name the shapes, so they should fill the
# picture (model/tests/demo_learns.rs trains on the same settings).
"$BIN/xvlm" synth-data --out "$OUT/data" --shape-min 0.6 --shape-max 0.95 \
  --background-min 225 --background-max 225

echo "== pre-training: configs/jobs/demo-pretrain.yaml on 2 local workers (logs: demo-out/coord.log)"
start=$(date +%s)
"$BIN/xvlm-coord" run configs/jobs/demo-pretrain.yaml --local-workers 2 \
  --listen 127.0.0.1:0 --state-dir "$OUT/state" --storage "file://$OUT/runs" \
  2>"$OUT/coord.log" | tee "$OUT/progress.txt"
echo "training took $(( $(date +%s) - start )) s"
JOB=$(grep -m1 -o '^job-[0-9]*' "$OUT/progress.txt")
CKPT=$OUT/runs/$JOB/final/model.safetensors
[ -f "$CKPT" ] || { echo "no checkpoint at $CKPT" >&2; exit 1; }

# Both retrieval stages run the same job through the coordinator: `evaluate=true` is the official
# `--evaluate` (score init_checkpoint, train nothing), then the fine-tune itself.
retrieval_job() { # $1: label, then --set arguments
  local label=$1
  shift
  "$BIN/xvlm-coord" run configs/jobs/demo-retrieval.yaml --local-workers 2 \
    --listen 127.0.0.1:0 --state-dir "$OUT/state-$label" --storage "file://$OUT/runs/$label" \
    --set "init_checkpoint=file://$CKPT" "$@" 2>"$OUT/coord-$label.log" | tee "$OUT/progress-$label.txt"
  local job
  job=$(grep -m1 -o '^job-[0-9]*' "$OUT/progress-$label.txt")
  [ -f "$OUT/runs/$label/$job/eval/final.json" ] || { echo "no evaluation in $OUT/runs/$label/$job" >&2; exit 1; }
  echo "$OUT/runs/$label/$job/eval/final.json" >"$OUT/$label.result"
}

echo "== zero-shot retrieval of the pre-trained weights on the held-out test split (never seen in training)"
retrieval_job zero-shot --set evaluate=true

echo "== retrieval fine-tune: configs/jobs/demo-retrieval.yaml on 2 local workers (val picks the best epoch)"
start=$(date +%s)
retrieval_job finetuned
echo "fine-tuning took $(( $(date +%s) - start )) s"

echo "== held-out test split: zero-shot against fine-tuned (ITM re-ranked, as Retrieval.py reports)"
python3 - "$(cat "$OUT/zero-shot.result")" "$(cat "$OUT/finetuned.result")" <<'PY'
import json, sys
zero, tuned = (json.load(open(p))[0] for p in sys.argv[1:3])
# One entry per test image; a random ranking finds a match in the top K with chance about K / images
# in both directions (each image has as many captions as every other).
images = len(json.load(open("demo-out/data/finetune/retrieval_test.json")))
print(f"{'':>8} {'zero-shot':>10} {'fine-tuned':>11} {'chance':>8}")
for key, k in [("txt_r1", 1), ("txt_r5", 5), ("txt_r10", 10), ("img_r1", 1), ("img_r5", 5), ("img_r10", 10)]:
    chance = 100.0 * min(1.0, k / images)
    print(f"{key:>8} {zero['metrics'][key]:>9.1f}% {tuned['metrics'][key]:>10.1f}% {chance:>7.1f}%")
print(f"{'r_mean':>8} {zero['metrics']['r_mean']:>9.1f}  {tuned['metrics']['r_mean']:>10.1f}")
PY
echo "pre-trained weights (official pre-training keys): $CKPT"
echo "fine-tuned: best weights in $(dirname "$(dirname "$(cat "$OUT/finetuned.result")")")/best/"
