#!/usr/bin/env bash
# Set up a fresh machine (Python 3.11 + pip + apt) for l2bn: system packages, a venv in .venv,
# PyTorch and the package with its dev extra. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: Fashion-MNIST (the main job's data), espeak-ng/sox (audio demo), chromium
# (the report-rendering test).
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  if [ ! -d /usr/share/datasets/fashion-mnist ] || ! command -v espeak-ng >/dev/null 2>&1 \
     || ! command -v sox >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || echo "install.sh: apt-get update failed; continuing" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist espeak-ng sox chromium \
      >/dev/null 2>&1 || echo "install.sh: some apt packages could not be installed; continuing" >&2
  fi
else
  echo "install.sh: not root or no apt-get; skipping system packages (Fashion-MNIST from Debian)" >&2
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import l2bn, torch, torchvision, pytest, hypothesis, timm, sklearn, markdown, librosa, soundfile, matplotlib, yaml" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/python -c "import l2bn, torch; print('l2bn', l2bn.__version__, 'torch', torch.__version__)"
