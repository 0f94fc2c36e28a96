#!/usr/bin/env bash
# Run on a lent GPU machine (torch 2.11.0+cu130 in its python, no Rust, no network) from the repository
# root, with .gpu-carry/ made by scripts/gpu-carry.sh. The carried binaries were linked against the
# CPU-only venv; they find this machine's libtorch through LD_LIBRARY_PATH and load libtorch_cuda at
# start-up (xvlm_model::runtime::load_cuda_backend).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/.gpu-carry/bin
PY=${PYTHON:-python3}
TORCH_DIR=$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
SITE=$(dirname "$TORCH_DIR")
mkdir -p "$ROOT/.gpu-carry/libs"
[ -e "$SITE/nvidia/nccl/lib/libnccl.so.2" ] && ln -sf "$SITE/nvidia/nccl/lib/libnccl.so.2" "$ROOT/.gpu-carry/libs/libnccl.so"
export LD_LIBRARY_PATH=$TORCH_DIR/lib:$SITE/nvidia/nccl/lib:$ROOT/.gpu-carry/libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
status=0
step() { echo; echo "== $*"; }
run() { "$@" || { echo "FAILED ($?): $*"; status=1; }; }
step "python torch"; "$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))'
step "xvlm doctor"; run "$BIN/xvlm" doctor
step "MLP training, CUDA vs CPU, TF32 off"; run "$BIN/xvlm" smoke-train --steps 100 --compare-cuda --tolerance 1e-4
for extra in "$ROOT"/scripts/gpu-check.d/*.sh; do
  [ -e "$extra" ] || continue
  step "$(basename "$extra")"; run bash "$extra" "$BIN"
done
echo; [ $status = 0 ] && echo "gpu-check: all passed" || echo "gpu-check: FAILURES"
exit $status
