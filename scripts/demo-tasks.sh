#!/usr/bin/env bash
# The downstream tasks after `make demo`: each example job of configs/jobs/ for VQA, NLVR2 (after its
# domain pre-training), RefCOCO+ weakly supervised and RefCOCO+ with boxes (after the box domain
# pre-training), through `xvlm-coord run` on 2 local workers, from the demo's pre-trained weights on the
# demo's synthetic splits. Prints each task's held-out metrics and where its result files are.
#   make demo && make demo-tasks            # the jobs' own schedules (~20 min on 2 cores)
#   DEMO_TASK_STEPS=4 make demo-tasks       # a quick pass: every job stops after 4 steps
# Everything goes under demo-out/tasks/ (removed at the start).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck disable=SC1091
source .env.build
BIN=$ROOT/target/debug
OUT=$ROOT/demo-out
JOB=$(grep -m1 -o '^job-[0-9]*' "$OUT/progress.txt" 2>/dev/null || true)
PRETRAINED=$OUT/runs/$JOB/final/model.safetensors
if [ -z "$JOB" ] || [ ! -f "$PRETRAINED" ]; then
  echo "demo-tasks: no pre-trained demo weights under $OUT (run make demo first)" >&2
  exit 1
fi
[ -x "$BIN/xvlm-coord" ] || cargo build --workspace --bins
TASKS=$OUT/tasks
rm -rf "$TASKS"
mkdir -p "$TASKS"
STEPS=()
[ -n "${DEMO_TASK_STEPS:-}" ] && STEPS=(--set "steps=$DEMO_TASK_STEPS")

# task_job NAME INIT_WEIGHTS: runs configs/jobs/demo-NAME.yaml; prints its output folder on stdout.
task_job() {
  local name=$1 init=$2 out=$TASKS/$1
  "$BIN/xvlm-coord" run "configs/jobs/demo-$name.yaml" --local-workers 2 \
    --listen 127.0.0.1:0 --state-dir "$out/state" --storage "file://$out/runs" \
    --set "init_checkpoint=file://$init" "${STEPS[@]}" 2>"$out.log" | tee "$out.progress" >&2
  local job
  job=$(grep -m1 -o '^job-[0-9]*' "$out.progress")
  echo "$out/runs/$job"
}

# report LABEL OUTPUT CHANCE: the closing evaluation (and the best validation epoch, when there is one).
report() {
  python3 - "$@" <<'PY'
import glob, json, os, sys
label, out, chance = sys.argv[1:4]
final = os.path.join(out, "eval/final.json")
if not os.path.exists(final):
    sys.exit(f"{label}: no {final}")
for entry in json.load(open(final)):
    shown = {k: v for k, v in entry["metrics"].items() if k != "epoch"}
    print(f"{label}: {entry['split']} " + " ".join(f"{k}={v:.4g}" for k, v in shown.items()))
epochs = sorted(glob.glob(os.path.join(out, "eval/epoch-*.json")))
if epochs:
    print(f"{label}: validation per epoch in {os.path.dirname(epochs[0])}/epoch-*.json")
print(f"{label}: chance {chance}; results in {out}/eval/")
PY
}

echo "== VQA (configs/jobs/demo-vqa.yaml): answers ranked over the answer list"
vqa=$(task_job vqa "$PRETRAINED")
report vqa "$vqa" "the majority answer (model/tests: vqa_fine_tuning_doubles_the_majority_baseline)"

echo "== NLVR2: domain pre-training (demo-nlvr-pretrain.yaml), then the fine-tune from its weights"
nlvr_pretrain=$(task_job nlvr-pretrain "$PRETRAINED")
nlvr=$(task_job nlvr "$nlvr_pretrain/final/model.safetensors")
report nlvr "$nlvr" "50 % (balanced statements)"

echo "== RefCOCO+ weakly supervised (demo-grounding.yaml): Grad-CAM picks one of each image's proposals"
grounding=$(task_job grounding "$PRETRAINED")
report grounding "$grounding" "about 25 % (a random proposal of four)"

echo "== RefCOCO+ with boxes: box domain pre-training, then the fine-tune from its weights"
bbox_pretrain=$(task_job grounding-bbox-pretrain "$PRETRAINED")
bbox=$(task_job grounding-bbox "$bbox_pretrain/final/model.safetensors")
report grounding_bbox "$bbox" "about 25 % (a random proposal of four)"
