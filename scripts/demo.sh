#!/usr/bin/env bash
# The main job, end to end on this machine: set up, build, check the runtime, write a synthetic
# multi-grained corpus, pre-train the tiny X-VLM on it data-parallel over 2 local workers through the
# coordinator (live progress), then evaluate zero-shot image-text retrieval on held-out pairs.
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

echo "== zero-shot retrieval on the held-out test split (never seen in training)"
"$BIN/xvlm" eval-retrieval --checkpoint "$CKPT" --config configs/Pretrain_XVLM_demo.yaml --data "$OUT/data"
echo "final checkpoint (official pre-training keys): $CKPT"
