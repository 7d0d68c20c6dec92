#!/usr/bin/env bash
# Mutation testing of the L2BN core with mutmut (3.x): a surviving mutant that changes a result
# is a missing test.
#
#   scripts/mutation.sh                       # kernels/, functional.py, modules.py, sync.py
#   scripts/mutation.sh src/l2bn/kernels/autograd.py src/l2bn/functional.py
#   # the statistics of the report and the feature metrics, against their own fast tests:
#   MUT_TESTS="tests/test_stats.py tests/test_metrics.py" scripts/mutation.sh src/l2bn/report/stats.py src/l2bn/analysis/metrics.py
#
# It works on a scratch copy (MUT_DIR, default /tmp/l2bn-mutation): the working tree is never
# modified. The copy gets its own setup.cfg [mutmut] section; mutmut mutates the copy's src/ and
# runs the fast unit tests below against each mutant (only the tests that reach the mutated
# function). Results: `cd $MUT_DIR && mutmut results` / `mutmut show <name>`.
#
# Environment:
#   MUT_JOBS    parallel test processes (default 2)
#   MUT_TESTS   pytest arguments selecting the tests (default: the fast float64 unit tests of
#               the reference and fused backends; the compiled backend's tests compile graphs
#               and the torchrun tests start processes, both too slow to run per mutant)
#   MUT_K       a pytest -k expression added to MUT_TESTS (it may contain spaces)
#   MUT_EXAMPLES  hypothesis examples per property test (default 20)
#   MUT_NAMES   space-separated mutant names: run only these (e.g. the survivors of a previous run)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
MUTMUT=$(dirname "$PY")/mutmut
if [ ! -x "$MUTMUT" ]; then
  "$PY" -m pip install -q mutmut
fi
DIR=${MUT_DIR:-/tmp/l2bn-mutation}
JOBS=${MUT_JOBS:-2}
if [ "$#" -gt 0 ]; then
  TARGETS=("$@")
else
  TARGETS=(src/l2bn/kernels/*.py src/l2bn/functional.py src/l2bn/modules.py src/l2bn/sync.py)
fi
DEFAULT_TESTS=(
  "tests/test_functional.py"
  "tests/test_backends.py::test_backend_matches_reference_float64"
  "tests/test_backends.py::test_backend_zero_sample"
  "tests/test_backends.py::test_empty_batch_like_batchnorm"
  "tests/test_backends.py::test_tiny_norm_float64_small_l2_eps"
  "tests/test_backends.py::test_extreme_scale_float32_finite_and_accurate"
  "tests/test_backends.py::test_output_keeps_memory_format"
  "tests/test_backends.py::test_backend_low_precision"
  "tests/test_backends.py::test_fused_l2_batch_norm_returns_the_statistics_used"
  "tests/test_backends.py::test_zero_sample_with_l2_eps_below_float32_range"
  "tests/test_backends.py::test_pow2_scale_of_subnormal_samples_is_finite"
  "tests/test_backends.py::test_empty_spatial_dims_with_tiny_l2_eps"
  "tests/test_backends.py::test_running_stats_must_be_given_together"
  "tests/test_backends.py::test_single_trainable_affine_parameter"
  "tests/test_backends.py::test_parameters_are_used_in_the_accumulation_dtype"
  "tests/test_backends.py::test_far_outside_float32_range_forward_and_backward"
  "tests/test_backends.py::test_float64_at_1e200_equals_the_unscaled_input"
  "tests/test_backends.py::test_fused_l2_batch_norm_count_is_a_tensor_of_the_statistics_dtype"
  "tests/test_backends.py::test_needs_rescale_boundaries"
  "tests/test_backends.py::test_forward_ad_tangent_subsets"
  "tests/test_backends.py::test_half_precision_statistics_are_float32"
  "tests/test_backends.py::test_channels_last_values_float64"
  "tests/test_backends.py::test_forward_ad_half_precision"
  "tests/test_backends.py::test_double_backward_parameter_variants"
  "tests/test_autograd.py"
  "tests/test_modules.py"
  "tests/test_sync.py::test_eval_without_running_stats_never_communicates"
  "tests/test_sync.py::test_sync_without_process_group_is_plain_l2bn"
  "tests/test_sync.py::test_sync_training_equals_the_union_batch"
  "tests/test_sync.py::test_forward_ad_and_double_backward_through_sync_are_refused"
  "tests/test_sync.py::test_sync_rescales_extreme_inputs_before_the_collective"
  "tests/test_dropin.py::test_gradient_penalty_step_matches_composite"
  "tests/test_dropin.py::test_forward_ad_matches_composite"
  "tests/test_dropin.py::test_double_backward_through_sync_is_refused"
  "tests/test_dropin.py::test_double_backward_with_non_default_options"
  "tests/test_dropin.py::test_double_backward_parameters_only"
  "tests/test_dropin.py::test_forward_ad_parameter_tangents_only_and_stats_not_differentiable"
  "tests/test_dropin.py::test_func_grad_jvp_jacrev"
  "tests/test_dropin.py::test_vmap_model_ensemble"
  "-k" "not compiled and not compile and not many_layer_shapes"
)
if [ -n "${MUT_TESTS:-}" ]; then
  read -r -a TESTS <<< "$MUT_TESTS"
  [ -z "${MUT_K:-}" ] || TESTS+=("-k" "$MUT_K")
else
  TESTS=("${DEFAULT_TESTS[@]}")
fi

rm -rf "$DIR"
mkdir -p "$DIR"
cp -r src tests "$DIR"/
find "$DIR" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$DIR"/src/*.egg-info
{
  echo "[mutmut]"
  echo "source_paths = src/"
  printf 'only_mutate =\n'
  for t in "${TARGETS[@]}"; do printf '    %s\n' "$t"; done
  printf 'pytest_add_cli_args =\n    -p\n    no:cacheprovider\n    -p\n    no:logging\n    -q\n    --hypothesis-seed=0\n'
  printf 'pytest_add_cli_args_test_selection =\n'
  for t in "${TESTS[@]}"; do printf '    %s\n' "$t"; done
} > "$DIR/setup.cfg"
cd "$DIR"
export L2BN_HYPOTHESIS_EXAMPLES=${MUT_EXAMPLES:-20} OMP_NUM_THREADS=1
# the native kernel is built into the scratch copy's own cache: mutants of its build flags rebuild
# it, which must neither touch the user's cache nor race the other mutants' builds of one library
export TORCH_EXTENSIONS_DIR="$DIR/torch_extensions"
# the progress spinner is redrawn with carriage returns: drop its lines (summary below)
# shellcheck disable=SC2086
nice "$MUTMUT" run --max-children "$JOBS" ${MUT_NAMES:-} 2>&1 | tr '\r' '\n' | grep -v "^⠋\|^⠙\|^⠹\|^⠸\|^⠼\|^⠴\|^⠦\|^⠧\|^⠇\|^⠏" || true
"$MUTMUT" results --all true > results.txt 2>&1 || "$MUTMUT" results > results.txt 2>&1 || true
echo "== per file: killed / total (survived, timeout, no tests)"
"$PY" - <<'EOF'
import collections, re
counts = collections.defaultdict(collections.Counter)
for line in open("results.txt"):
    m = re.match(r"\s*([\w.]+)__mutmut_\d+: (.+)", line.strip())
    if not m:
        continue
    name, status = m.groups()
    if status.strip() == "not checked":  # not run (MUT_NAMES selected others)
        continue
    counts[name.split(".x")[0].split("ǁ")[0]][status.strip()] += 1
total = collections.Counter()
for mod, c in sorted(counts.items()):
    n = sum(c.values())
    total.update(c)
    print(f"{mod:40s} killed {c['killed']:4d} / {n:4d}  survived {c['survived']:3d}  timeout {c['timeout']:3d}  no tests {c['no tests']:3d}")
n = sum(total.values())
if n:
    print(f"{'all':40s} killed {total['killed']:4d} / {n:4d} ({100 * total['killed'] / n:.0f}%)")
EOF
echo "survivors: grep survived $DIR/results.txt; mutmut show <name> (in $DIR)"
