#!/usr/bin/env bash
# The evidence studies, in order, each resumable: stop at any time, rerun to continue.
# Finished runs keep their small files in docs/results/<study>/<run>/ (config, result, analysis,
# metrics; checkpoints are not committed), so a later sitting on a fresh clone skips them.
#   bash scripts/sweeps.sh                 # all studies, lowest CPU priority
#   THREADS=1 bash scripts/sweeps.sh       # leave a core free
set -euo pipefail
cd "$(dirname "$0")/.."
for study in ${STUDIES:-batch-size paper depth}; do
  nice -n 19 .venv/bin/l2bn compare --preset "$study" --out "docs/results/$study" --no-progress \
    ${THREADS:+--threads "$THREADS"}
done
