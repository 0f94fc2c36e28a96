#!/usr/bin/env bash
# The main job, end to end on this machine. Grows with the project: today it checks the runtime
# (`xvlm doctor`) and trains for real with libtorch.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
scripts/setup.sh
# shellcheck disable=SC1091
source .env.build
cargo build --workspace --bins
BIN=$ROOT/target/debug
echo "== xvlm doctor"
"$BIN/xvlm" doctor
echo "== a few real libtorch training steps"
"$BIN/xvlm" smoke-train --steps 200
