#!/usr/bin/env bash
# Builds the binaries and copies what scripts/gpu-check.sh needs into .gpu-carry/ (ignored, carried to the
# GPU machine): stripped binaries, the train-step benchmark and 640x480 synthetic JPEGs for the data benchmark. The
# GPU machine has no Rust toolchain; fixtures and configs travel with the working tree.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
scripts/setup.sh >/dev/null
# shellcheck disable=SC1091
source .env.build
cargo build --workspace --bins
bench=$(cargo bench -p xvlm-model --bench train_step --profile dev --no-run --message-format=json 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*train_step[^"]*\)".*/\1/p' | tail -1)
rm -rf .gpu-carry && mkdir -p .gpu-carry/bin .gpu-carry/jpegs
# xvlm-coord does not link libtorch and is not needed there; the carry limit is 64 MiB in all.
for b in xvlm xvlm-worker; do
  strip -o ".gpu-carry/bin/$b" "target/debug/$b"
done
[ -n "$bench" ] && strip -o .gpu-carry/bin/train_step "$bench"
# Synthetic shapes compress better than photos, so absolute rates are optimistic; the comparison with the
# torchvision pipeline on the same files is what counts.
target/debug/xvlm synth-data --out .gpu-carry/synth --images 24 --width 640 --height 480 >/dev/null
mv .gpu-carry/synth/images/*.jpg .gpu-carry/jpegs/ && rm -rf .gpu-carry/synth
du -sh .gpu-carry
