#!/usr/bin/env bash
# Idempotent setup: a Python venv holding libtorch 2.11.0 from PyPI (the only libtorch source reachable here),
# the NCCL symlink cudarc's loader wants, and the S3 test server. Writes .env.build for the build.
#   XVLM_TORCH=cpu   small CPU-only libtorch (~540 MB)  [default without an NVIDIA GPU]
#   XVLM_TORCH=cuda  full CUDA wheel set (~2.7 GB)      [default with an NVIDIA GPU]
#   LIBTORCH=/path   use a cluster's own libtorch 2.11 instead (skips the venv's torch)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
TORCH_VERSION=2.11.0
if [ -z "${XVLM_TORCH:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then XVLM_TORCH=cuda; else XVLM_TORCH=cpu; fi
fi
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
installed_version() { cat "$SITE"/torch-*.dist-info/METADATA 2>/dev/null | sed -n 's/^Version: //p' | head -1; }
if [ -n "${LIBTORCH:-}" ]; then
  echo "setup: using LIBTORCH=$LIBTORCH (cluster libtorch; not installing torch)"
  TORCH_DIR=$LIBTORCH
else
  if [ "$(installed_version)" != "$TORCH_VERSION" ] || { [ "$XVLM_TORCH" = cuda ] && [ ! -e "$SITE/nvidia/cublas" ]; }; then
    echo "setup: installing torch==$TORCH_VERSION ($XVLM_TORCH) into $VENV"
    if [ "$XVLM_TORCH" = cpu ]; then
      "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps "torch==$TORCH_VERSION" \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
    else
      "$VENV/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_VERSION"
    fi
  fi
  TORCH_DIR=$SITE/torch
fi
# nasm lets mozjpeg-sys build libjpeg-turbo's SIMD decoder (the default `simd-jpeg` feature of xvlm-model);
# without it the build still works, with a slower scalar JPEG decoder.
if ! command -v nasm >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing nasm (libjpeg-turbo SIMD)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nasm >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nasm >/dev/null 2>&1; } \
      || echo "setup: WARNING: could not install nasm; JPEG decoding will be built without SIMD"
  else
    echo "setup: WARNING: nasm not found (apt-get install nasm); JPEG decoding will be built without SIMD"
  fi
fi
mkdir -p "$ROOT/.libs"
if [ -e "$SITE/nvidia/nccl/lib/libnccl.so.2" ]; then
  ln -sf "$SITE/nvidia/nccl/lib/libnccl.so.2" "$ROOT/.libs/libnccl.so"
fi
# The S3-compatible server the checkpoint tests start on loopback (moto 5; ~20 s on first run).
MOTO_VENV=$ROOT/.venv-moto
if [ ! -x "$MOTO_VENV/bin/moto_server" ]; then
  echo "setup: installing moto[server] into $MOTO_VENV"
  "$PY" -m venv "$MOTO_VENV"
  "$MOTO_VENV/bin/pip" install -q --disable-pip-version-check 'moto[server]'
fi
# The servers and tools the operations tests start (Prometheus, headless Chromium, single-node Slurm) and
# the Python readers they check against (TensorBoard's event reader, the Kubernetes schema validator).
# (iproute2: `ip netns` and `tc` for the multi-host tests; bsdutils: `script`, the pseudo-terminal of
# the progress-bar test.) Measured on the 2-core CI kind: apt 34 s, pip 17 s on the first run; no-ops after.
TEST_PACKAGES="prometheus chromium slurm-wlm munge iproute2 bsdutils"
missing_packages() { for p in $TEST_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done; }
if command -v apt-get >/dev/null 2>&1 && [ -n "$(missing_packages)" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing test servers: $(missing_packages | tr '\n' ' ')"
    # shellcheck disable=SC2046
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(missing_packages) >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(missing_packages) >/dev/null 2>&1; } \
      || echo "setup: WARNING: could not install $(missing_packages | tr '\n' ' '); the operations tests will fail"
  else
    echo "setup: WARNING: not root: apt-get install $(missing_packages | tr '\n' ' ') for the operations tests"
  fi
fi
TOOLS_VENV=$ROOT/.venv-tools
if [ ! -x "$TOOLS_VENV/bin/kubernetes-validate" ] || ! "$TOOLS_VENV/bin/python" -c 'import tensorboard' 2>/dev/null; then
  echo "setup: installing tensorboard and kubernetes-validate into $TOOLS_VENV"
  [ -x "$TOOLS_VENV/bin/python" ] || "$PY" -m venv "$TOOLS_VENV"
  "$TOOLS_VENV/bin/pip" install -q --disable-pip-version-check tensorboard kubernetes-validate
fi
cat > "$ROOT/.env.build" <<ENV
export LIBTORCH=$TORCH_DIR
export XVLM_LIBS_DIR=$ROOT/.libs
ENV
echo "setup: libtorch at $TORCH_DIR ($XVLM_TORCH); build env in .env.build"
