#!/usr/bin/env bash
# Re-run mutants of a finished scripts/mutation.sh run, each in a fresh Python process.
#
# mutmut's runner forks its children from one process, so code that runs once per process (the
# native kernel's build, load and operator registration; backend registration at import) is not
# re-run per mutant and its mutants are misreported. This re-checks such mutants honestly:
#
#   MUT_DIR=/tmp/mut-native scripts/mutation_recheck.sh l2bn.kernels.native.x__cflags__mutmut_10 ...
#   # all "killed" mutants of some functions:
#   scripts/mutation_recheck.sh $(grep killed /tmp/mut-native/results.txt | grep -E "x_build|x__cflags" | cut -d: -f1)
#
# Environment: MUT_DIR (the run's scratch copy, default /tmp/l2bn-mutation), MUT_TESTS (pytest
# arguments, default: the native backend's tests), MUT_K (a -k expression).
# Prints one line per mutant: name, killed/survived, seconds, the first failing test.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(pwd)/.venv/bin/python}
DIR=${MUT_DIR:-/tmp/l2bn-mutation}
read -r -a TESTS <<< "${MUT_TESTS:-tests/test_native.py tests/test_backends.py}"
K=${MUT_K:-native and not compile}
cd "$DIR/mutants"
export PYTHONPATH=src OMP_NUM_THREADS=1 L2BN_HYPOTHESIS_EXAMPLES=${MUT_EXAMPLES:-20}
export TORCH_EXTENSIONS_DIR="$DIR/recheck_extensions"   # mutants of build flags rebuild here
for m in "$@"; do
  t0=$(date +%s)
  log="$DIR/recheck-$m.log"
  if timeout 600 env MUTANT_UNDER_TEST="$m" "$PY" -m pytest -x -q -p no:cacheprovider "${TESTS[@]}" -k "$K" > "$log" 2>&1; then
    r=survived
  else
    r=killed
  fi
  echo "$m $r $(( $(date +%s) - t0 ))s $(grep -E '^(FAILED|ERROR)' "$log" | head -1 | cut -c1-150 || true)"
done
