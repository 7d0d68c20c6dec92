#!/usr/bin/env bash
# The evidence studies, in order, each resumable: stop at any time, rerun to continue.
# Finished runs keep their small files in docs/results/<study>/<run>/ (config, result, analysis,
# metrics; checkpoints are not committed), so a later call on a fresh clone skips them.
#   bash scripts/sweeps.sh                 # all studies, lowest CPU priority
#   THREADS=1 bash scripts/sweeps.sh       # leave a core free
#   setsid bash scripts/sweeps.sh > sweeps.log 2>&1 &   # in the background, its own session
#   STUDIES=depth SEEDS="3 4" bash scripts/sweeps.sh     # some studies, some seeds (default: the presets')
# Started twice (e.g. THREADS=1, one per core), the two share the runs: a run another process is
# training is skipped (its directory's .lock), so none is trained twice.
# With the kernel's autogroup scheduling (most desktop/server kernels), `nice` only ranks
# processes within one session: a sweep started with setsid gets its own session, so the script
# lowers that whole session's priority (/proc/self/autogroup) — otherwise it takes a full share of
# the CPU from interactive work and benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(ps -o sid= -p $$ | tr -d ' ')" = "$$" ] && [ -w /proc/self/autogroup ]; then
  echo 19 > /proc/self/autogroup 2>/dev/null || true
fi
for study in ${STUDIES:-batch-size paper depth lr stability}; do
  nice -n 19 .venv/bin/l2bn compare --preset "$study" --out "docs/results/$study" --no-progress \
    ${THREADS:+--threads "$THREADS"} ${SEEDS:+--seeds $SEEDS}
done
