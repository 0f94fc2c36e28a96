#!/usr/bin/env bash
# Builds the binaries and copies what scripts/gpu-check.sh needs into .gpu-carry/ (ignored, carried to the
# GPU machine): stripped binaries and the parity fixtures. The GPU machine has no Rust toolchain.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
scripts/setup.sh >/dev/null
# shellcheck disable=SC1091
source .env.build
cargo build --workspace --bins
rm -rf .gpu-carry && mkdir -p .gpu-carry/bin
for b in xvlm xvlm-worker xvlm-coord; do
  [ -x "target/debug/$b" ] && strip -o ".gpu-carry/bin/$b" "target/debug/$b"
done
du -sh .gpu-carry
