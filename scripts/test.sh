#!/usr/bin/env bash
# The whole test suite: setup if needed, formatting and lints, then every test of the workspace.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
scripts/setup.sh
# shellcheck disable=SC1091
source .env.build
started=$(date +%s)
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# hdfs:// has no server to test against here; at least it must keep compiling.
cargo check -p xvlm-proto --features hdfs
# The end-to-end tests run the daemons' binaries; building them here keeps that build out of the
# tests' timings (their own `cargo build` is then a no-op).
cargo build --workspace --bins
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
echo "test.sh: build + tests took $(( $(date +%s) - started )) s"
