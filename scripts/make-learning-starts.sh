#!/usr/bin/env bash
# Makes the starting checkpoints of the fine-tuning learning tests (issue 11) in
# tests/fixtures/learning/: the tiny model of configs/Pretrain_XVLM_demo.yaml pre-trained on the
# learning corpus, then that checkpoint after the NLVR2 domain pre-training (`task: nlvr_pretrain`).
# Pre-training long enough for the fine-tunes to learn takes about 13 minutes here, too long to repeat
# inside every test run, so the results are committed; the tests regenerate the corpus itself (it is
# deterministic) and check it against corpus.sha256.
#
#   scripts/make-learning-starts.sh   (BIN: target/debug, WORK: /tmp/learning-starts, OUT: the fixture
#                                      folder; another OUT leaves the committed files as they are)
#
# The learning corpus: `xvlm synth-data --images 4000` (3,200 training images) with the demo fine-tunes'
# shapes (--shape-min 0.6 --shape-max 0.95 --background-min 225 --background-max 225), seed 0. On the
# demo's 320 training images pre-training memorises (ITM 0.18 after 20,000 iterations) and no NLVR2
# fine-tune passed 62 %; on 3,200 the same 6,000 iterations generalise (ITM 0.36) and it learns.
# worker/tests/task_common/learning.rs generates the same corpus: change both together.
#
# Stages, one worker at one libtorch thread (deterministic), each an `xvlm-coord run`:
#  1. pretrained.safetensors: Pretrain_XVLM_demo.yaml, train_dataset_size 3200, 15 epochs = 6,000
#     iterations (lr 1e-3, the config's).
#  2. nlvr_pretrained.safetensors: NLVR_pretrain_demo.yaml from stage 1, train_dataset_size 3200,
#     5 epochs = 2,000 steps at lr 3e-4 (its 1e-4 learns the alignment too slowly: CE 0.66 against
#     0.49 over the last 400 steps).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/debug}
WORK=${WORK:-/tmp/learning-starts}
OUT=${OUT:-$ROOT/tests/fixtures/learning}
DATA=$WORK/data

rm -rf "$WORK"
mkdir -p "$WORK" "$OUT"
"$BIN/xvlm" synth-data --out "$DATA" --images 4000 --seed 0 --shape-min 0.6 --shape-max 0.95 \
  --background-min 225 --background-max 225

# config NAME PATCH...: configs/NAME with the corpus and model files named absolutely and each sed
# expression of PATCH applied (the substitution the tests' demo_config makes, plus the stage's own).
config() {
  local name=$1
  shift
  local args=(-e "s#demo-out/data#$DATA#g" -e "s#'configs/#'$ROOT/configs/#g")
  for p in "$@"; do args+=(-e "$p"); done
  sed "${args[@]}" "$ROOT/configs/$name" >"$WORK/$name"
  for p in "$@"; do # every patch must have matched
    grep -q "$(sed -E 's#^s/([^/]*)/([^/]*)/.*#\2#' <<<"$p")" "$WORK/$name" ||
      { echo "patch $p did not apply to $name" >&2; exit 1; }
  done
}

# stage NAME TASK CONFIG STEPS [INIT]: one world-1 job; prints its final checkpoint's path.
stage() {
  local name=$1 task=$2 cfg=$3 steps=$4 init=${5:-} dir=$WORK/$1
  mkdir -p "$dir"
  cat >"$dir/job.yaml" <<JOB
name: $name
task: $task
config: $WORK/$cfg
steps: $steps
seed: 42
workers: {min: 1, max: 1, devices_per_worker: 1}
backend: auto
JOB
  local set=()
  [ -n "$init" ] && set=(--set "init_checkpoint=file://$init")
  XVLM_CPU_THREADS=1 "$BIN/xvlm-coord" run "$dir/job.yaml" --local-workers 1 --listen 127.0.0.1:0 \
    --state-dir "$dir/state" --storage "file://$dir/runs" "${set[@]}" >"$dir/progress.txt" 2>"$dir/coord.log"
  tail -n 1 "$dir/progress.txt" >&2
  grep -q SUCCEEDED "$dir/progress.txt" || { echo "$name did not succeed: $dir/coord.log" >&2; exit 1; }
  ls "$dir"/runs/job-*/final/model.safetensors
}

config Pretrain_XVLM_demo.yaml 's/train_dataset_size: 320/train_dataset_size: 3200/' \
  's/epochs: 30,/epochs: 15,/'
pretrained=$(stage pretrain pretrain Pretrain_XVLM_demo.yaml 6000)
config NLVR_pretrain_demo.yaml 's/train_dataset_size: 320 /train_dataset_size: 3200 /' \
  's/epochs: 4,/epochs: 5,/' 's/lr: 1e-4,/lr: 3e-4,/g'
nlvr_pretrained=$(stage nlvr-pretrain nlvr_pretrain NLVR_pretrain_demo.yaml 2000 "$pretrained")

cp "$pretrained" "$OUT/pretrained.safetensors"
cp "$nlvr_pretrained" "$OUT/nlvr_pretrained.safetensors"
(cd "$DATA" && sha256sum pretrain/image_text/*.jsonl finetune/nlvr_*.json) >"$OUT/corpus.sha256"
(cd "$OUT" && sha256sum pretrained.safetensors nlvr_pretrained.safetensors >SHA256SUMS)
echo "wrote $OUT (stage logs under $WORK)"
