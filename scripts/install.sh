#!/usr/bin/env bash
# Set up a fresh machine (Python 3.11 + pip + apt) for l2bn: system packages, a venv in .venv,
# PyTorch and the package with its dev extra. Idempotent: a second run is quick.
# Under CI (CI=true) every failure is fatal: a missing dependency must not turn into skipped tests.
set -euo pipefail
cd "$(dirname "$0")/.."
STRICT=0
case "${CI:-}" in 1|true|TRUE|yes) STRICT=1 ;; esac

fail_or_warn() {
  if [ "$STRICT" = 1 ]; then echo "install.sh: $1 (fatal under CI)" >&2; exit 1; fi
  echo "install.sh: $1; continuing" >&2
}

# System packages: Fashion-MNIST (the main job's data), espeak-ng/sox (audio demo), chromium
# (the report-rendering test), g++ (the native L2BN CPU kernel).
need_apt() {
  [ ! -d /usr/share/datasets/fashion-mnist ] || ! command -v espeak-ng >/dev/null 2>&1 \
    || ! command -v sox >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1 \
    || ! command -v g++ >/dev/null 2>&1
}
if need_apt; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    apt-get update -qq >/dev/null 2>&1 || echo "install.sh: apt-get update failed; trying the cached lists" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist espeak-ng sox chromium g++ >/dev/null 2>&1 \
      || fail_or_warn "apt-get install dataset-fashion-mnist espeak-ng sox chromium g++ failed"
  else
    fail_or_warn "not root or no apt-get: cannot install dataset-fashion-mnist espeak-ng sox chromium g++"
  fi
fi
if [ "$STRICT" = 1 ]; then
  for tool in espeak-ng sox chromium g++; do
    command -v "$tool" >/dev/null 2>&1 || { echo "install.sh: $tool is missing (fatal under CI)" >&2; exit 1; }
  done
  [ -d /usr/share/datasets/fashion-mnist ] || { echo "install.sh: /usr/share/datasets/fashion-mnist is missing (fatal under CI)" >&2; exit 1; }
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import l2bn, torch, torchvision, pytest, xdist, hypothesis, timm, sklearn, markdown, librosa, soundfile, matplotlib, yaml, keras, onnx, onnxruntime, onnxscript, jax, ninja, sphinx, furo, myst_parser" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | { grep -v "^WARNING: Location" || true; }
  .venv/bin/python -m pip install -q -e '.[dev]' 2>&1 | { grep -v "^WARNING: Location" || true; }
fi
.venv/bin/python -c "import l2bn, torch; print('l2bn', l2bn.__version__, 'torch', torch.__version__)"
# The native CPU kernel (C++, built once per machine into torch's extension cache, ~1 min).
.venv/bin/python -m l2bn.kernels || fail_or_warn "the native L2BN kernel could not be built (the fused ATen path will be used)"
