"""Every backend against the reference: values, gradients, running statistics, memory."""

import copy
import dataclasses
import os
import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from l2bn_checks import assert_close_per_sample
from torch import nn

import l2bn
from l2bn.functional import l2_batch_norm
from l2bn.kernels import backends
from l2bn.kernels.reference import l2_batch_norm_reference

FAST = ["fused", "compiled", "native"]
ALL = ["reference", "fused", "compiled", "native"]
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 6e-2, torch.float16: 1.5e-2}


def _run(backend, x, w, b, rm, rv, training, unit_rms=False, g=None):
    x = x.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in (w, b)]
    y = (l2_batch_norm_reference if backend == "reference" else l2_batch_norm)(
        x,
        rm,
        rv,
        *params,
        training,
        0.1,
        1e-5,
        unit_rms=unit_rms,
        **({} if backend == "reference" else {"backend": backend}),
    )
    if g is None:  # a random upstream gradient: d(sum y)/dx is exactly 0 in training
        g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y.backward(g.to(y.dtype))
    return y, x.grad, params[0].grad, params[1].grad


def _compare(backend, x, training=True, unit_rms=False, dtype=None):
    """Output and input gradient per sample (relative to the sample's own scale), parameter
    gradients, and both running statistics, against the float64 reference on the same input."""
    dtype = dtype or x.dtype
    c = x.shape[1]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.linspace(0.5, 1.5, c, dtype=pdt)
    b = torch.linspace(-0.3, 0.3, c, dtype=pdt)
    rm1, rv1 = torch.full((c,), 0.01, dtype=pdt), torch.full((c,), 0.9, dtype=pdt)
    rm2, rv2 = rm1.double().clone(), rv1.double().clone()  # .double() of float64 is no copy
    xr = x.to(dtype)
    out = _run(backend, xr, w, b, rm1, rv1, training, unit_rms)
    # reference in float64 on the same (rounded) input
    ref = _run("reference", xr.double(), w.double(), b.double(), rm2, rv2, training, unit_rms)
    tol = TOL[dtype]
    assert out[0].dtype == dtype and out[1].dtype == dtype
    assert_close_per_sample(out[0], ref[0], tol, f"{backend} y")
    assert_close_per_sample(out[1], ref[1], 5 * tol, f"{backend} dx")
    for name, a, r in zip(("dw", "db"), out[2:], ref[2:]):
        torch.testing.assert_close(
            a.double(), r, rtol=tol, atol=tol * float(r.abs().max()), msg=f"{backend} {name}"
        )
    # running statistics, both of them, for every backend (unchanged in eval)
    torch.testing.assert_close(rm1.double(), rm2, rtol=tol, atol=tol * float(rm2.abs().max()))
    torch.testing.assert_close(rv1.double(), rv2, rtol=tol, atol=tol * float(rv2.abs().max()))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", [(16, 4), (8, 4, 33), (6, 5, 7, 9), (4, 3, 3, 5, 4)])
@pytest.mark.parametrize("training", [True, False])
def test_backend_matches_reference_float64(backend, shape, training):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    x[1] *= 1e4  # unequal sample norms
    x[2] *= 1e-4
    _compare(backend, x, training)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", [(16, 4), (8, 4, 33), (6, 5, 7, 9), (4, 3, 3, 5, 4)])
@pytest.mark.parametrize("training", [True, False])
def test_backend_zero_sample(backend, shape, training):
    """An all-zero sample (norm below l2_eps: u = x / l2_eps, no radial term) next to ordinary
    ones; its gradient (about 1/l2_eps larger) is compared on its own scale."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    x[0] = 0
    _compare(backend, x, training)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backend_low_precision(backend, dtype):
    torch.manual_seed(0)
    x = torch.randn(16, 8, 12, 12) * 2 + 0.5
    _compare(backend, x, True, dtype=dtype)
    _compare(backend, x, False, unit_rms=True, dtype=dtype)


@pytest.mark.parametrize("backend", FAST)
def test_backend_half_max_values(backend):
    x = torch.full((4, 3, 8, 8), 65504.0, dtype=torch.float16)
    x[1] = -65504.0
    x[2, :, ::2] = 1.0
    x.requires_grad_()
    y = l2_batch_norm(x, None, None, training=True, backend=backend)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(g.half())
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    ref = _run(
        "reference",
        x.detach().double(),
        torch.ones(3, dtype=torch.float64),
        torch.zeros(3, dtype=torch.float64),
        None,
        None,
        True,
        g=g.double(),
    )
    assert_close_per_sample(y, ref[0], 1e-2, "y")
    assert_close_per_sample(x.grad, ref[1], 2e-2, "dx")


@pytest.mark.parametrize("backend", FAST)
def test_backend_layouts(backend):
    torch.manual_seed(0)
    base = torch.randn(6, 5, 7, 9, dtype=torch.float64)
    cl = base.contiguous(memory_format=torch.channels_last)
    _compare(backend, cl)
    y = l2_batch_norm(cl, None, None, training=True, backend=backend)
    assert y.is_contiguous(memory_format=torch.channels_last)
    _compare(backend, torch.randn(6, 9, 7, 5, dtype=torch.float64).transpose(1, 3))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize(
    "fmt,shape", [(torch.channels_last, (4, 3, 5, 6)), (torch.channels_last_3d, (3, 2, 3, 4, 5))]
)
@pytest.mark.parametrize("training", [True, False])
def test_output_keeps_memory_format(backend, fmt, shape, training):
    """l2_batch_norm promises the input's memory format, for every backend (the reference
    returned a contiguous tensor)."""
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    c = shape[1]
    y = l2_batch_norm(
        x,
        torch.zeros(c, dtype=torch.float64),
        torch.ones(c, dtype=torch.float64),
        training=training,
        backend=backend,
    )
    assert y.is_contiguous(memory_format=fmt), y.stride()
    y.backward(torch.randn_like(y))
    assert x.grad.shape == x.shape


@st.composite
def inputs(draw):
    n = draw(st.integers(2, 9))
    c = draw(st.integers(1, 6))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    scale = draw(st.sampled_from([1e-4, 1.0, 1e4]))
    offset = draw(st.sampled_from([0.0, 3.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return n, c, h, w, scale, offset, seed, draw(st.booleans()), draw(st.booleans())


@settings(max_examples=25, deadline=None)
@given(inputs())
def test_compiled_property(case):
    n, c, h, w, scale, offset, seed, training, unit_rms = case
    # one entry per sample: u = sign(x), the gradient is a pure cancellation (checked with a
    # magnitude-relative bound in test_functional); here we want well-conditioned cases
    assume(c * h * w > 1)
    torch.manual_seed(seed)
    x = (torch.randn(n, c, h, w, dtype=torch.float64) + offset) * scale
    _compare("compiled", x, training, unit_rms)


def _saved_bytes(fn, x):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return total[0]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", [(32, 16, 32, 32), (8, 64, 14, 14), (64, 128)])
def test_saved_bytes_like_batchnorm(backend, shape):
    x = torch.randn(shape, requires_grad=True)
    c = shape[1]
    bn = torch.nn.BatchNorm2d(c) if len(shape) == 4 else torch.nn.BatchNorm1d(c)
    w, b = bn.weight, bn.bias
    bn_bytes = _saved_bytes(bn, x)
    ours = _saved_bytes(lambda t: l2_batch_norm(t, None, None, w, b, True, backend=backend), x)
    naive = _saved_bytes(lambda t: l2_batch_norm(t, None, None, w, b, True, backend="reference"), x)
    assert ours <= 1.05 * bn_bytes, (ours, bn_bytes)
    assert naive >= 1.9 * bn_bytes  # the composite keeps a second full-size tensor


def _without(monkeypatch, name, reason):
    entry = dataclasses.replace(backends._REGISTRY[name], unavailable=lambda t: reason)
    monkeypatch.setitem(backends._REGISTRY, name, entry)
    monkeypatch.setattr(backends, "_warned", set())


def test_unavailable_backend(monkeypatch):
    """A backend that cannot run: an explicit request names the reason; automatic selection
    warns once and falls back to the next one (native → compiled → fused)."""
    x = torch.randn(64, 8, 16, 16)
    _without(monkeypatch, "native", "no C++ compiler (test)")
    with pytest.raises(RuntimeError, match="'native' is not available: no C\\+\\+ compiler"):
        l2_batch_norm(x, None, None, training=True, backend="native")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        l2_batch_norm(x, None, None, training=True)
        l2_batch_norm(x, None, None, training=True)
    msgs = [str(r.message) for r in rec if "falling back" in str(r.message)]
    assert len(msgs) == 1 and "no C++ compiler" in msgs[0]
    assert backends.select(None, x) == "compiled"
    _without(monkeypatch, "compiled", "no inductor (test)")
    assert backends.select(None, x) == "fused"


def test_auto_selection(monkeypatch):
    big = torch.randn(64, 8, 16, 16)
    for x in (
        big,
        big.double(),
        big.half(),
        torch.randn(4, 3),
        big.to(memory_format=torch.channels_last),
    ):
        assert backends.select(None, x) == "native", x.dtype
    _without(monkeypatch, "native", "test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert backends.select(None, big) == "compiled"
        assert backends.select(None, big.double()) == "fused"
        assert backends.select(None, torch.randn(4, 3)) == "fused"


def test_no_native_kernel_falls_back_with_one_warning(tmp_path):
    """A fresh process where the kernel is disabled (as on a machine without a compiler): the
    layer still trains, on the ATen path, and says so once."""
    import subprocess
    import sys

    code = (
        "import warnings, torch, l2bn\n"
        "warnings.simplefilter('always')\n"
        "m = l2bn.L2BatchNorm2d(4)\n"
        "with warnings.catch_warnings(record=True) as rec:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3): m(torch.randn(8, 4, 3, 3)).sum().backward()\n"
        "print(sum('native' in str(r.message) for r in rec))\n"
        "print([str(r.message) for r in rec if 'native' in str(r.message)][0])\n"
    )
    env = {**os.environ, "L2BN_NO_NATIVE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    count, message = out.stdout.strip().splitlines()[-2:]
    assert count == "1", out.stdout + out.stderr
    assert "'native' unavailable (disabled by L2BN_NO_NATIVE)" in message, message


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 9), (0, 5, 2, 2), (0, 3, 2, 2, 2), (4, 3, 0)])
def test_empty_batch_like_batchnorm(backend, shape):
    """N = 0 in training: empty output, running statistics untouched, backward works (zero
    parameter gradients), exactly as BN (fused wrote NaN into running_var, compiled raised)."""
    c = shape[1]
    bn = {
        2: torch.nn.BatchNorm1d,
        3: torch.nn.BatchNorm1d,
        4: torch.nn.BatchNorm2d,
        5: torch.nn.BatchNorm3d,
    }[len(shape)](c)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 1.5)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    w = torch.rand(c).add(0.5).requires_grad_()
    b = torch.randn(c).requires_grad_()
    for training in (True, False):
        x = torch.randn(shape, requires_grad=True)
        y = l2_batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, backend=backend)
        y_bn = bn.train(training)(x)
        assert y.shape == y_bn.shape == x.shape
        torch.testing.assert_close(rm, bn.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(rv, bn.running_var, rtol=0, atol=0)
        (y * 2).sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(w.grad, torch.zeros(c)) and torch.equal(b.grad, torch.zeros(c))
        w.grad = b.grad = None


def test_compiled_keeps_compiling_after_empty_batch():
    """An empty batch must not make the compiled backend give up on that layout for good."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "torch.compile of ... failed ...; using the eager kernels"
        for n in (0, 6, 0, 6):
            x = torch.randn(n, 4, 5, 5, requires_grad=True)
            y = l2_batch_norm(x, torch.zeros(4), torch.ones(4), training=True, backend="compiled")
            y.backward(torch.randn_like(y))


def _scale_case(backend, x, l2_eps, training=True):
    """y and dx of a backend against the reference evaluated in float64 on the same input."""
    c = x.shape[1]
    w, b = torch.linspace(0.5, 1.5, c), torch.linspace(-0.3, 0.3, c)
    xi = x.detach().clone().requires_grad_()
    rm, rv = torch.zeros(c, dtype=x.dtype), torch.ones(c, dtype=x.dtype)
    y = l2_batch_norm(
        xi, rm, rv, w.to(x.dtype), b.to(x.dtype), training, l2_eps=l2_eps, backend=backend
    )
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y.backward(g.to(y.dtype))
    xr = x.detach().double().requires_grad_()
    yr = l2_batch_norm_reference(
        xr,
        None if training else rm.double(),
        None if training else rv.double(),
        w.double(),
        b.double(),
        training,
        l2_eps=l2_eps,
    )
    yr.backward(g)
    return y, xi.grad, yr, xr.grad


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("training", [True, False])
def test_tiny_norm_float64_small_l2_eps(backend, training):
    """float64, l2_eps = 1e-20, sample norms ~1e-17: the radial term must not be clamped (the
    compiled backend clamped r^2 at 1e-30, 7% off)."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 1e-18
    y, dx, yr, dxr = _scale_case(backend, x, 1e-20, training)
    assert_close_per_sample(y, yr, 1e-9, "y")
    assert_close_per_sample(dx, dxr, 1e-8, "dx")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("scale", [1e18, 1e19, 1e-18])
@pytest.mark.parametrize("training", [True, False])
def test_extreme_scale_float32_finite_and_accurate(backend, scale, training):
    """float32 samples with |x| ~ 1e19 (squares overflow), 1e18 (the compiled one-pass sums
    overflow) and 1e-18 (squares subnormal) are normalized as accurately as ordinary ones; the
    reference composite itself is finite but wrong at 1e19 (its norm overflows)."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, 5) * scale
    x[1] *= 7  # unequal norms
    y, dx, yr, dxr = _scale_case(backend, x, 1e-30, training)
    assert_close_per_sample(y, yr, 1e-5, "y")
    assert_close_per_sample(dx, dxr, 1e-4, "dx")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (4, 6)])
@pytest.mark.parametrize("training", [True, False])
def test_zero_sample_with_l2_eps_below_float32_range(backend, shape, training):
    """An all-zero float32 sample with l2_eps = 1e-40 (s / l2_eps overflows float32): the
    reference gives finite outputs (0 / l2_eps), so must every backend (k = inf gave inf * 0 =
    NaN); the other samples are unaffected."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    x[1] = 0
    c = shape[1]
    rm, rv = torch.randn(c) * 0.1, torch.rand(c) + 0.5
    y = l2_batch_norm(x, rm.clone(), rv.clone(), training=training, l2_eps=1e-40, backend=backend)
    yr = l2_batch_norm(
        x, rm.clone(), rv.clone(), training=training, l2_eps=1e-40, backend="reference"
    )
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)


def test_fused_l2_batch_norm_returns_the_statistics_used():
    """The kernel-level entry point: ``(y, mean, biased_var, count)`` of the normalized input
    in training, the running statistics in evaluation."""
    from l2bn.kernels import fused_l2_batch_norm
    from l2bn.kernels.reference import l2_normalize_samples

    x = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    u = l2_normalize_samples(x, unit_rms=True)
    y, mean, var, count = fused_l2_batch_norm(x, w, b, None, None, 1e-3, 1e-12, True)
    torch.testing.assert_close(mean, u.mean((0, 2, 3)))
    torch.testing.assert_close(var, u.var((0, 2, 3), unbiased=False))
    assert float(count) == 6 * 20
    torch.testing.assert_close(
        y, l2_batch_norm_reference(x, None, None, w, b, True, eps=1e-3, unit_rms=True)
    )
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    y, mean, var, count = fused_l2_batch_norm(x, w, b, rm, rv, 1e-3, 1e-12, False)
    assert torch.equal(mean, rm) and torch.equal(var, rv) and float(count) == 120
    torch.testing.assert_close(y, l2_batch_norm_reference(x, rm, rv, w, b, False, eps=1e-3))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (3, 4, 2, 3, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_channels_last_values_float64(backend, shape, training):
    """channels_last inputs take other code paths (strided reductions, the (N, M, C) kernel
    loops): values, gradients and running statistics against the reference, in float64."""
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2 + 1
    _compare(backend, x.contiguous(memory_format=fmt), training=training)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("tangents", ["input", "weight", "bias", "input, no affine"])
def test_forward_ad_tangent_subsets(backend, training, tangents):
    """The Function's jvp with only some inputs dual (the others have no tangent), and without
    affine parameters, against the composite's jvp."""
    import torch.autograd.forward_ad as fwad

    x = torch.randn(6, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.5
    affine = tangents != "input, no affine"
    w = torch.linspace(0.5, 1.5, 3, dtype=torch.float64) if affine else None
    b = torch.linspace(-0.2, 0.2, 3, dtype=torch.float64) if affine else None
    rm, rv = (
        torch.linspace(-0.1, 0.1, 3, dtype=torch.float64),
        torch.linspace(0.5, 1.5, 3, dtype=torch.float64),
    )
    stats = (None, None) if training else (rm, rv)
    t = {
        "x": torch.randn_like(x),
        "w": torch.randn(3, dtype=torch.float64),
        "b": torch.randn(3, dtype=torch.float64),
    }
    use = {"input": "x", "weight": "w", "bias": "b", "input, no affine": "x"}[tangents]
    vals = {"x": x, "w": w, "b": b}
    with fwad.dual_level():
        args = {k: (fwad.make_dual(v, t[k]) if k == use else v) for k, v in vals.items()}
        y = l2_batch_norm(args["x"], *stats, args["w"], args["b"], training, backend=backend)
        dy = fwad.unpack_dual(y).tangent

    def ref(v):
        a = dict(vals, **{use: v})
        return l2_batch_norm_reference(a["x"], *stats, a["w"], a["b"], training)

    _, dy_ref = torch.func.jvp(ref, (vals[use],), (t[use],))
    torch.testing.assert_close(dy, dy_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_half_precision_statistics_are_float32(backend, dtype, training):
    """Half inputs with a large mean and a small spread: statistics and sums must be taken in
    float32 (rounding the per-row means to half alone would move y by several half ulps). The
    output must equal the float32 computation on the same half input, rounded once."""
    g = torch.Generator().manual_seed(7)
    x = (6.0 + 0.05 * torch.randn(8, 4, 5, 6, generator=g)).to(dtype)
    gy = torch.randn(8, 4, 5, 6, generator=g).to(dtype)
    c = x.shape[1]
    w, b = torch.linspace(0.5, 1.5, c), torch.linspace(-0.2, 0.2, c)
    xr = x.float()
    stats = (None, None)
    if not training:  # running statistics of the l2-normalized input, so y is O(1)
        u = xr.flatten(1) / xr.flatten(1).norm(dim=1, keepdim=True)
        u = u.reshape(xr.shape).transpose(0, 1).reshape(c, -1)
        stats = (u.mean(1), u.var(1))
    rm = [s.clone() if s is not None else None for s in stats]
    xa = x.clone().requires_grad_()
    y = l2_batch_norm(xa, *rm, w, b, training, backend=backend)
    y.backward(gy)
    xf = xr.clone().requires_grad_()
    ref = l2_batch_norm_reference(
        xf, *[s.clone() if s is not None else None for s in stats], w, b, training
    )
    ref.backward(gy.float())
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    assert y.dtype == dtype and xa.grad.dtype == dtype
    torch.testing.assert_close(
        y.float(), ref.to(dtype).float(), rtol=0, atol=2 * ulp * float(ref.abs().max())
    )
    torch.testing.assert_close(
        xa.grad.float(),
        xf.grad.to(dtype).float(),
        rtol=0,
        atol=4 * ulp * float(xf.grad.abs().max()),
    )


# ---- found by mutation testing of kernels/autograd.py: each fails on a surviving mutant or a bug


def test_pow2_scale_of_subnormal_samples_is_finite():
    """The exact power-of-two scale of a sample whose maximum is subnormal (float32 ~1e-40 would
    need 2^132) stops at the largest power of two of the dtype instead of overflowing to inf."""
    from l2bn.kernels.scaling import pow2_scale

    x = torch.tensor([[1e-40, -3e-41], [3e30, 1.0], [0.0, 0.0], [0.75, 0.1]])
    s = pow2_scale(x, torch.float32)
    assert torch.isfinite(s).all()
    assert s.tolist()[1:] == [2.0**-102, 1.0, 1.0]
    m = (s[:, None] * x).abs().amax(1)
    assert 1e-3 < float(m[0]) < 1 and 0.5 <= float(m[1]) < 1
    assert torch.equal((s[:, None] * x)[0] / s[0], x[0])  # exact


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("training", [True, False])
def test_empty_spatial_dims_with_tiny_l2_eps(backend, training):
    """(N, C, 0) with an l2_eps below the accurate range (which sends the batch to the rescaled
    path): no crash, outputs and running statistics as the reference's."""
    x = torch.randn(4, 3, 0)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    y = l2_batch_norm(x, rm, rv, training=training, l2_eps=1e-40, backend=backend)
    yr = l2_batch_norm_reference(x, rm2, rv2, training=training, l2_eps=1e-40)
    assert y.shape == x.shape == yr.shape
    assert torch.equal(rm, rm2) and torch.equal(rv, rv2)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("training", [True, False])
def test_running_stats_must_be_given_together(backend, training):
    """As F.batch_norm: one running statistic without the other is an error (in training the
    fast backends silently skipped the update)."""
    x = torch.randn(4, 3, 5)
    for rm, rv, only in (
        (torch.zeros(3), None, "running_mean"),
        (None, torch.ones(3), "running_var"),
    ):
        msg = (
            f"must be given together \\(got only {only}\\)"
            if training
            else "are required when training=False"
        )
        with pytest.raises(ValueError, match=msg):
            l2_batch_norm(x, rm, rv, training=training, backend=backend)


@pytest.mark.parametrize("backend", ["fused", "native"])
@pytest.mark.parametrize(
    "case", ["weight only", "weight, frozen bias", "bias only", "frozen weight, bias"]
)
def test_single_trainable_affine_parameter(backend, case):
    """x without grad and only one affine parameter trainable: the output still has a graph and
    the parameter's gradient equals the reference's."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    w = torch.linspace(0.5, 1.5, 3, dtype=torch.float64)
    b = torch.linspace(-0.3, 0.3, 3, dtype=torch.float64)
    train_w = case.startswith("weight")
    w_used = w if "weight" in case else None
    b_used = b if "bias" in case else None
    g = torch.randn(6, 3, 4, dtype=torch.float64)
    grads = []
    for be in (backend, "reference"):
        wi = w_used.clone().requires_grad_(train_w) if w_used is not None else None
        bi = b_used.clone().requires_grad_(not train_w) if b_used is not None else None
        y = l2_batch_norm(x, None, None, wi, bi, True, backend=be)
        assert y.requires_grad
        y.backward(g)
        grads.append((wi if train_w else bi).grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["fused", "native"])
@pytest.mark.parametrize("training", [True, False])
def test_parameters_are_used_in_the_accumulation_dtype(backend, training):
    """float32 input with float64 weight and bias: bitwise the same output and input gradient as
    with their float32 copies (the parameters are cast to the accumulation dtype), and each
    parameter's gradient comes back in its own dtype."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 5)
    g = torch.randn(6, 3, 4, 5)
    w64, b64 = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    rs = (torch.randn(3), torch.rand(3) + 0.5)
    outs = []
    for w, b in ((w64, b64), (w64.float(), b64.float())):
        xi, wi, bi = (
            x.clone().requires_grad_(),
            w.clone().requires_grad_(),
            b.clone().requires_grad_(),
        )
        y = l2_batch_norm(xi, rs[0].clone(), rs[1].clone(), wi, bi, training, backend=backend)
        y.backward(g)
        assert wi.grad.dtype == w.dtype and bi.grad.dtype == b.dtype and y.dtype == torch.float32
        outs.append((y, xi.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("scale,l2_eps", [(1e25, 1e-30), (1e-30, 1e-40)])
@pytest.mark.parametrize("training", [True, False])
def test_far_outside_float32_range_forward_and_backward(backend, scale, l2_eps, training):
    """float32 samples at 1e25 and 1e-30 (squares far beyond the range, both ways): y and dx as
    accurate as for ordinary inputs — the rescaled backward must undo the scale exactly."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5) * scale
    x[1] *= 3
    y, dx, yr, dxr = _scale_case(backend, x, l2_eps, training)
    assert_close_per_sample(y, yr, 1e-5, "y")
    assert_close_per_sample(dx, dxr, 1e-4, "dx")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("training", [True, False])
def test_float64_at_1e200_equals_the_unscaled_input(backend, training):
    """float64 samples at 1e200 (their squares overflow): y equals y of the unscaled input, and
    dx is that of the unscaled input divided by 1e200 (L2BN is scale invariant per sample)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    y1, dx1, _, _ = _scale_case(backend, x, 1e-12, training)
    y2, dx2, _, _ = _scale_case(backend, x * 1e200, 1e-12, training)
    torch.testing.assert_close(y2, y1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx2 * 1e200, dx1, rtol=1e-10, atol=1e-12)


def test_fused_l2_batch_norm_count_is_a_tensor_of_the_statistics_dtype():
    """The kernel-level entry point returns the count as a tensor (dtype and device of the
    statistics), in training and in evaluation."""
    from l2bn.kernels import fused_l2_batch_norm

    for dtype, acc in ((torch.float64, torch.float64), (torch.float16, torch.float32)):
        x = torch.randn(6, 3, 4, dtype=dtype)
        for stats in ((None, None), (torch.zeros(3, dtype=acc), torch.ones(3, dtype=acc))):
            y, mean, var, count = fused_l2_batch_norm(x, None, None, *stats, 1e-5, 1e-12, False)
            assert isinstance(count, torch.Tensor) and count.dtype == mean.dtype == acc
            assert count.device == mean.device and float(count) == 24 and not count.requires_grad


def test_needs_rescale_boundaries():
    """Norms in [lo, hi] are used as computed; l2_eps exactly at lo counts as the usual case
    (only overflow checked); just outside either bound triggers the exact rescale."""
    from l2bn.kernels.scaling import _norm_range, needs_rescale

    d = 60
    lo, hi = _norm_range(torch.float64, d)
    r = torch.tensor([lo / 2, 1.0], dtype=torch.float64)
    assert not needs_rescale(
        r, torch.float64, d, lo
    )  # l2_eps = lo: sub-lo norms are clamped by l2_eps
    assert needs_rescale(r, torch.float64, d, lo / 4)
    assert not needs_rescale(torch.tensor([hi, lo], dtype=torch.float64), torch.float64, d, lo / 4)
    assert needs_rescale(
        torch.tensor([hi * 1.0000001, 1.0], dtype=torch.float64), torch.float64, d, 1.0
    )
    assert needs_rescale(
        torch.tensor([float("nan"), 1.0], dtype=torch.float64), torch.float64, d, 1.0
    )


@pytest.mark.parametrize("backend", ["fused", "native"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_forward_ad_half_precision(backend, dtype, training):
    """jvp with a half-precision input and float32 parameters: the tangent has the input's dtype
    and equals the float32 composite's jvp rounded to it (within 2 ulps of the largest value)."""
    import torch.autograd.forward_ad as fwad

    g = torch.Generator().manual_seed(5)
    x = (torch.rand(8, 4, 36, generator=g) + 0.25).to(dtype)
    t = torch.randn(8, 4, 36, generator=g).to(dtype)
    w, b = torch.linspace(0.5, 1.5, 4), torch.linspace(-0.2, 0.2, 4)
    stats = (
        (None, None)
        if training
        else (torch.linspace(-0.01, 0.01, 4), torch.linspace(0.5, 1.5, 4) * 1e-3)
    )
    with fwad.dual_level():
        y = l2_batch_norm(fwad.make_dual(x, t), *stats, w, b, training, backend=backend)
        dy = fwad.unpack_dual(y).tangent
    assert dy.dtype == dtype

    def ref(v):
        return l2_batch_norm_reference(v, *stats, w, b, training)

    _, dy_ref = torch.func.jvp(ref, (x.float(),), (t.float(),))
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(dy.float(), dy_ref, rtol=0, atol=2 * ulp * float(dy_ref.abs().max()))


@pytest.mark.parametrize("backend", ["fused", "native"])
@pytest.mark.parametrize(
    "case", ["no affine", "frozen weight", "no bias", "float32 weight, bfloat16 bias"]
)
def test_double_backward_parameter_variants(backend, case):
    """create_graph=True with the affine parameters absent, frozen, partly absent or of mixed
    dtypes: the first derivatives (with a graph) equal the plain first-order ones, and the
    second-order gradient of a penalty equals the composite's."""
    torch.manual_seed(0)
    dt = torch.float64
    x0 = torch.randn(5, 3, 4, dtype=dt)
    v = torch.randn(5, 3, 4, dtype=dt)
    w = torch.linspace(0.5, 1.5, 3, dtype=dt)
    b = torch.linspace(-0.3, 0.3, 3, dtype=dt)
    if case == "no affine":
        w = b = None
    elif case == "frozen weight":
        b = b.requires_grad_()
    elif case == "no bias":
        w, b = w.requires_grad_(), None
    else:
        x0 = x0.float()
        v = v.float()
        w, b = w.float().requires_grad_(), b.to(torch.bfloat16).requires_grad_()
    results = []
    for be in (backend, "reference"):
        x = x0.clone().requires_grad_()
        ins = [t for t in (x, w, b) if t is not None and t.requires_grad]
        y = l2_batch_norm(x, None, None, w, b, True, backend=be)
        first = torch.autograd.grad((v * y).sum(), ins, create_graph=True)
        plain = torch.autograd.grad(
            (v * l2_batch_norm(x, None, None, w, b, True, backend=be)).sum(), ins
        )
        for f, p in zip(first, plain):
            assert f.dtype == p.dtype
            torch.testing.assert_close(f, p, rtol=1e-6, atol=1e-6)
        penalty = sum(f.float().pow(2).sum() for f in first)
        second = torch.autograd.grad(penalty, [x], allow_unused=True)
        results.append((first, second))
    (f1, s1), (f2, s2) = results
    tol = 1e-8 if x0.dtype == dt else 1e-3
    for a, r in zip(f1 + s1, f2 + s2):
        torch.testing.assert_close(a.double(), r.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("training", [True, False])
def test_mlp_output_can_be_modified_in_place(backend, training, monkeypatch):
    """Linear -> L2BatchNorm1d -> ReLU(inplace=True), the common MLP block: the (N, C) output
    must accept an in-place op (a view of a custom Function's intermediate would raise), and
    the gradients through it equal the reference's."""
    torch.manual_seed(0)
    x = torch.randn(16, 6, dtype=torch.float64)
    g = torch.randn(16, 5, dtype=torch.float64)
    base = nn.Sequential(nn.Linear(6, 5), l2bn.L2BatchNorm1d(5), nn.ReLU(inplace=True)).double()
    base[1].running_var.uniform_(0.5, 2.0)  # eval uses these: make them not the identity
    state = {k: v.clone() for k, v in base.state_dict().items()}
    out = {}
    for be in ("reference", backend):
        monkeypatch.setenv("L2BN_BACKEND", be)
        model = copy.deepcopy(base)
        model.load_state_dict(state)
        model.train(training)
        y = model(x)
        y.backward(g)
        out[be] = (
            y.detach(),
            [p.grad.clone() for p in model.parameters()],
            model[1].running_var.clone(),
        )
    (y0, g0, rv0), (y1, g1, rv1) = out["reference"], out[backend]
    torch.testing.assert_close(y1, y0, rtol=1e-9, atol=1e-9)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rv1, rv0, rtol=1e-12, atol=1e-12)


def test_backend_from_the_environment(monkeypatch):
    """$L2BN_BACKEND: a name selects that backend, "auto" or empty means automatic, an unknown
    name lists the choices, an unusable one names its reason; an explicit argument wins."""
    x = torch.randn(4, 3, 2, 2)
    for value, want in (
        ("fused", "fused"),
        ("reference", "reference"),
        ("auto", "native"),
        ("", "native"),
    ):
        monkeypatch.setenv("L2BN_BACKEND", value)
        assert backends.select(None, x) == want, value
    monkeypatch.setenv("L2BN_BACKEND", "fused")
    assert backends.select("reference", x) == "reference"
    monkeypatch.setenv("L2BN_BACKEND", "fast")
    with pytest.raises(
        ValueError, match=r"unknown L2BN backend 'fast'; choose one of \[.*'fused'.*\] or 'auto'"
    ):
        backends.select(None, x)
    monkeypatch.setenv("L2BN_BACKEND", "native")
    _without(monkeypatch, "native", "no C++ compiler (test)")
    with pytest.raises(
        RuntimeError, match="L2BN backend 'native' is not available: no C\\+\\+ compiler"
    ):
        backends.select(None, x)
    monkeypatch.delenv("L2BN_BACKEND")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (
            backends.select(None, x) == "fused"
        )  # automatic: native skipped (compiled prefers large inputs)


def test_register_a_backend(monkeypatch):
    """A third-party backend: registered with a priority it is tried first, only where it
    prefers the input, and skipped (one warning naming it, attributed to the caller's line) where
    it cannot run."""
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    monkeypatch.setattr(backends, "_AUTO_ORDER", list(backends._AUTO_ORDER))
    monkeypatch.setattr(backends, "_warned", set())
    calls = []

    def mine(x, *args):
        calls.append(x.shape)
        return backends.get("reference")(x, *args)

    state = {"reason": None}
    backends.register(
        "mine", mine, lambda x: state["reason"], auto_priority=0, prefer=lambda x: x.dim() == 4
    )
    backends.register(
        "mine", mine, lambda x: state["reason"], auto_priority=0, prefer=lambda x: x.dim() == 4
    )
    assert backends._AUTO_ORDER.count("mine") == 1 and backends._AUTO_ORDER[0] == "mine"
    assert "mine" in backends.available_backends() and backends.get("mine") is mine
    x4, x3 = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2)
    assert backends.select(None, x4) == "mine" and backends.select(None, x3) == "native"
    y = l2_batch_norm(x4, None, None, training=True)
    torch.testing.assert_close(y, l2_batch_norm_reference(x4, None, None, training=True))
    assert calls == [x4.shape]
    state["reason"] = "busy (test)"
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert backends.select(None, x4) == "native"
        l2_batch_norm(x4, None, None, training=True)
        l2_batch_norm(x4, None, None, training=True)
    msgs = [r for r in rec if "falling back" in str(r.message)]
    assert (
        len(msgs) == 1
        and str(msgs[0].message) == "L2BN backend 'mine' unavailable (busy (test)); falling back"
    )
    rec.clear()
    backends._warned.clear()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        l2_batch_norm(x4, None, None, training=True)
    if "MUTANT_UNDER_TEST" not in os.environ:  # mutmut's trampolines add a frame
        assert [r.filename for r in rec if "falling back" in str(r.message)] == [__file__]
    backends.register("other", mine)  # no priority: never chosen automatically
    assert "other" not in backends._AUTO_ORDER and backends.select("other", x3) == "other"


def test_each_unavailable_backend_warns_once(monkeypatch):
    """Two automatic candidates unusable for different reasons: one warning each (deduplicated
    per backend and reason, not globally); with no candidate at all, fused is the last resort."""
    x = torch.randn(64, 8, 16, 16)
    _without(monkeypatch, "native", "reason A (test)")
    _without(monkeypatch, "compiled", "reason B (test)")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            assert backends.select(None, x) == "fused"
    msgs = sorted(str(r.message) for r in rec if "falling back" in str(r.message))
    assert msgs == [
        "L2BN backend 'compiled' unavailable (reason B (test)); falling back",
        "L2BN backend 'native' unavailable (reason A (test)); falling back",
    ], msgs
    monkeypatch.setattr(backends, "_AUTO_ORDER", [])
    assert backends.select(None, x) == "fused"
