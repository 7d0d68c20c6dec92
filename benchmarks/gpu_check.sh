#!/usr/bin/env bash
# GPU check for l2bn: CUDA correctness of every backend, then the CUDA benchmark tables.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # OUT_DIR default: ./gpu_check_out
#
# Steps (each bounded by `timeout`; the whole script stays under GPU_CHECK_BUDGET_S, default 290 s):
#   0. exit 1 at once, with a message, unless torch sees a CUDA GPU;
#   1. pytest on the CUDA-parametrised tests (files under tests/ that mention "cuda", `-k cuda`),
#      if there are any                                               -> OUT_DIR/pytest_cuda.txt
#   2. every backend in l2bn.functional.available_backends() (and automatic selection, which is
#      the Triton kernels on CUDA when their probe passes) on
#      device="cuda" against the float64 reference: training forward, input/weight/bias grads,
#      running statistics, eval forward; float32 2-D/3-D/4-D, channels_last, bf16/fp16
#                                                                     -> OUT_DIR/correctness.txt
#   3. `l2bn bench --device cuda` in float32 (GPU shape set, 5 rounds, achieved bandwidth vs
#      y.copy_(x), ResNet-56 and ResNet-8 rows)     -> OUT_DIR/bench_fp32.txt, bench_fp32.json
#   4. if time is left: the same in bfloat16, channels_last, layers only
#                                                   -> OUT_DIR/bench_bf16_cl.txt, bench_bf16_cl.json
# and OUT_DIR/summary.txt. Exit 0: all steps passed; 1: no GPU; 2: a step failed or timed out.
# Environment: PYTHON (interpreter; default .venv/bin/python if there is one, else python3),
# GPU_CHECK_BUDGET_S (default 290), GPU_CHECK_COMPILE=1 (add the torch.compile columns; slower).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-./gpu_check_out}"
BUDGET="${GPU_CHECK_BUDGET_S:-290}"
if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then
    PY="$ROOT/.venv/bin/python"
else
    PY="python3"
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# 0. a GPU, or stop here
probe="$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'none')" 2>&1)"
verdict="${probe##*$'\n'}"  # the last line (torch may warn on stderr first)
if [ "$verdict" != "cuda" ]; then
    if [ "$verdict" = "none" ]; then
        echo "gpu_check: no CUDA GPU available (torch.cuda.is_available() is False for $PY); this check needs an NVIDIA GPU" >&2
    else
        echo "gpu_check: cannot import torch with $PY: ${probe##*$'\n'}" >&2
    fi
    exit 1
fi

mkdir -p "$OUT_DIR" || { echo "gpu_check: cannot create $OUT_DIR" >&2; exit 1; }
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
FAILED=0
cd "$ROOT" || exit 1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee -a "$SUMMARY"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$SUMMARY"

left() { echo $((BUDGET - SECONDS)); }
# step NAME CAP_S LOGFILE CMD...: run CMD under min(CAP_S, time left), tee to LOGFILE, record the
# outcome; exit codes listed in $OK_RC (default 0) count as success
step() {
    local name="$1" cap="$2" log="$3"; shift 3
    local t; t=$(left); [ "$t" -gt "$cap" ] && t="$cap"
    if [ "$t" -lt 10 ]; then
        echo "== $name: SKIPPED (time budget spent)" | tee -a "$SUMMARY"; FAILED=1; return
    fi
    echo "== $name (limit ${t}s)"
    local t0=$SECONDS rc
    timeout -k 5 "$t" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    local status="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT after ${t}s"; FAILED=1
    elif [[ " ${OK_RC:-0} " != *" $rc "* ]]; then status="FAILED (exit $rc)"; FAILED=1
    elif [ "$rc" -ne 0 ]; then status="ok (exit $rc: no test selected)"; fi
    echo "== $name: $status in $((SECONDS - t0))s -> $log" | tee -a "$SUMMARY"
}

# 1. CUDA-parametrised tests, if any
mapfile -t CUDA_TESTS < <(grep -l -i "cuda" tests/test_*.py 2>/dev/null)
if [ "${#CUDA_TESTS[@]}" -gt 0 ]; then
    # exit 5: pytest selected no test (no test id contains "cuda")
    OK_RC="0 5" step "pytest -k cuda ${CUDA_TESTS[*]}" 90 "$OUT_DIR/pytest_cuda.txt" \
        "$PY" -m pytest -q -x -p no:cacheprovider -k cuda "${CUDA_TESTS[@]}"
else
    echo "== pytest: no test file under tests/ mentions cuda; nothing to run" | tee -a "$SUMMARY"
fi

# 2. every backend on CUDA vs the float64 reference
read -r -d '' CHECK <<'PYEOF'
import sys
import torch
from l2bn.functional import available_backends, l2_batch_norm
from l2bn.kernels.reference import l2_batch_norm_reference

DEV = "cuda"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # max error / max |reference|
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CASES = [  # name, shape, dtype, channels_last, parameter/buffer dtype, unit_rms
    ("4d", (8, 16, 7, 7), F32, False, F32, False),
    ("4d channels_last", (8, 16, 7, 7), F32, True, F32, False),
    ("4d channels_last large", (32, 64, 28, 28), F32, True, F32, False),
    ("3d unit_rms", (4, 32, 33), F32, False, F32, True),
    ("2d", (64, 128), F32, False, F32, False),
    ("4d channels_last bf16, fp32 params", (16, 32, 14, 14), BF16, True, F32, False),
    ("4d fp16, fp32 params", (16, 32, 14, 14), F16, False, F32, False),
    ("4d bf16, bf16 params", (16, 32, 14, 14), BF16, False, BF16, False),
]


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check(backend, shape, dtype, cl, pdtype, unit_rms):
    torch.manual_seed(0)
    c, fmt = shape[1], (torch.channels_last if cl else torch.contiguous_format)
    x = (torch.randn(shape, device=DEV) * 3 + 1).to(dtype).contiguous(memory_format=fmt)
    g = torch.randn(shape, device=DEV).to(dtype).contiguous(memory_format=fmt)
    w = (torch.rand(c, device=DEV) + 0.5).to(pdtype)
    b = (0.1 * torch.randn(c, device=DEV)).to(pdtype)
    # the batch statistics, to start the running ones at their scale (a sensitive comparison)
    m_b, v_b = torch.zeros(c, device=DEV, dtype=torch.float64), torch.zeros(c, device=DEV, dtype=torch.float64)
    l2_batch_norm_reference(x.double(), m_b, v_b, training=True, momentum=1.0, unit_rms=unit_rms)
    rm0, rv0 = (3 * m_b).to(pdtype), (2 * v_b).to(pdtype)
    # training: float64 reference, then the backend
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    rm64, rv64 = rm0.double(), rv0.double()
    y64 = l2_batch_norm_reference(x64, rm64, rv64, w64, b64, training=True, momentum=0.1, unit_rms=unit_rms)
    y64.backward(g.double())
    xb, wb, bb = (t.detach().clone().requires_grad_() for t in (x, w, b))
    rmb, rvb = rm0.clone(), rv0.clone()
    y = l2_batch_norm(xb, rmb, rvb, wb, bb, training=True, momentum=0.1, unit_rms=unit_rms, backend=backend)
    y.backward(g)
    err = {"y": rel(y, y64), "dx": rel(xb.grad, x64.grad), "dw": rel(wb.grad, w64.grad),
           "db": rel(bb.grad, b64.grad), "run_mean": rel(rmb, rm64), "run_var": rel(rvb, rv64)}
    problems = []
    if y.dtype != dtype or not y.is_contiguous(memory_format=fmt):
        problems.append(f"output {y.dtype} in the wrong memory format/dtype")
    # eval, with the batch statistics as running ones
    rme, rve = m_b.to(pdtype), v_b.to(pdtype)
    with torch.no_grad():
        ye64 = l2_batch_norm_reference(x.double(), rme.double(), rve.double(), w.double(), b.double(), unit_rms=unit_rms)
        ye = l2_batch_norm(x, rme, rve, w, b, training=False, unit_rms=unit_rms, backend=backend)
    err["eval_y"] = rel(ye, ye64)
    problems += [f"{k} {v:.1e}" for k, v in err.items() if not v <= TOL[dtype]]
    return err, problems


failed = 0
print(f"{'backend':10} {'case':38} " + " ".join(f"{k:>9}" for k in ("y", "dx", "dw", "db", "run_mean", "run_var", "eval_y")))
for backend in [None, *available_backends()]:
    for name, *case in CASES:
        label = f"{backend or 'auto':10} {name:38}"
        try:
            err, problems = check(backend, *case)
        except RuntimeError as e:
            if "not available" in str(e):
                print(f"{label} SKIP: {str(e).splitlines()[0]}")
                continue
            problems, err = [f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"], {}
        except Exception as e:  # noqa: BLE001 -- every failure is reported, then the next case runs
            problems, err = [f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"], {}
        failed += bool(problems)
        print(label + " " + " ".join(f"{v:9.1e}" for v in err.values()) + ("  FAIL: " + "; ".join(problems) if problems else "  ok"))
print(f"tolerances (max error / max |float64 reference|): {({str(k)[6:]: v for k, v in TOL.items()})}")
print("correctness: " + (f"{failed} FAILED" if failed else "all ok"))
sys.exit(1 if failed else 0)
PYEOF
step "correctness: every backend on cuda vs the float64 reference" 150 "$OUT_DIR/correctness.txt" "$PY" -c "$CHECK"

# 3./4. benchmarks
COMPILE_FLAG=(--no-compile)
[ "${GPU_CHECK_COMPILE:-0}" = "1" ] && COMPILE_FLAG=()
step "bench float32 (cuda)" 600 "$OUT_DIR/bench_fp32.txt" \
    "$PY" -m l2bn bench --device cuda --rounds 5 --reps 20 "${COMPILE_FLAG[@]}" --json "$OUT_DIR/bench_fp32.json"
if [ "$(left)" -ge 60 ]; then
    step "bench bfloat16 channels_last (cuda)" 600 "$OUT_DIR/bench_bf16_cl.txt" \
        "$PY" -m l2bn bench --device cuda --dtype bfloat16 --channels-last --rounds 5 --reps 20 --no-resnet \
        "${COMPILE_FLAG[@]}" --json "$OUT_DIR/bench_bf16_cl.json"
else
    echo "== bench bfloat16 channels_last: skipped ($(left)s of the budget left)" | tee -a "$SUMMARY"
fi

echo
echo "==== gpu_check summary ($SECONDS s) ===="
cat "$SUMMARY"
if [ "$FAILED" -ne 0 ]; then
    echo "gpu_check: FAILED (see the logs in $OUT_DIR)" >&2
    exit 2
fi
echo "gpu_check: all steps passed; tables in $OUT_DIR"
