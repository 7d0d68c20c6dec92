"""Every backend against the reference: values, gradients, running statistics, memory."""

import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from l2bn.functional import l2_batch_norm
from l2bn.kernels import backends, compiled
from l2bn.kernels.reference import l2_batch_norm_reference

FAST = ["fused", "compiled"]
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 6e-2, torch.float16: 1.5e-2}


def _run(backend, x, w, b, rm, rv, training, unit_rms=False):
    x = x.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in (w, b)]
    y = (l2_batch_norm_reference if backend == "reference" else l2_batch_norm)(
        x, rm, rv, *params, training, 0.1, 1e-5, unit_rms=unit_rms,
        **({} if backend == "reference" else {"backend": backend}),
    )
    g = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(y.dtype)
    y.backward(g)
    return y, x.grad, params[0].grad, params[1].grad


def _compare(backend, x, training=True, unit_rms=False, dtype=None):
    dtype = dtype or x.dtype
    c = x.shape[1]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.linspace(0.5, 1.5, c, dtype=pdt)
    b = torch.linspace(-0.3, 0.3, c, dtype=pdt)
    rm1, rv1 = torch.full((c,), 0.01, dtype=pdt), torch.full((c,), 0.9, dtype=pdt)
    rm2, rv2 = rm1.clone(), rv1.clone()
    out = _run(backend, x.to(dtype), w, b, rm1, rv1, training, unit_rms)
    # reference in float64 on the same (rounded) input
    ref = _run("reference", x.to(dtype).double(), w.double(), b.double(), rm2.double(), rv2.double(), training, unit_rms)
    tol = TOL[dtype]
    assert out[0].dtype == dtype and out[1].dtype == dtype
    for name, a, r in zip(("y", "dx", "dw", "db"), out, ref):
        scale = max(1.0, float(r.detach().abs().max()))
        torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol * scale, msg=f"{backend} {name}")
    if training:
        torch.testing.assert_close(rm1.double(), rm2.double() * 0 + _ref_stats(x.to(dtype), unit_rms)[0] * 0.1 + 0.009, rtol=tol, atol=tol)


def _ref_stats(x, unit_rms):
    rm = torch.zeros(x.shape[1], dtype=torch.float64)
    rv = torch.ones(x.shape[1], dtype=torch.float64)
    l2_batch_norm_reference(x.double(), rm, rv, None, None, True, 1.0, 1e-5, unit_rms=unit_rms)
    return rm, rv


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", [(16, 4), (8, 4, 33), (6, 5, 7, 9), (4, 3, 3, 5, 4)])
@pytest.mark.parametrize("training", [True, False])
def test_backend_matches_reference_float64(backend, shape, training):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    x[0] = 0  # a zero sample
    x[1] *= 1e4
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
    y.float().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", FAST)
def test_backend_layouts(backend):
    torch.manual_seed(0)
    base = torch.randn(6, 5, 7, 9, dtype=torch.float64)
    cl = base.contiguous(memory_format=torch.channels_last)
    _compare(backend, cl)
    y = l2_batch_norm(cl, None, None, training=True, backend=backend)
    assert y.is_contiguous(memory_format=torch.channels_last)
    _compare(backend, torch.randn(6, 9, 7, 5, dtype=torch.float64).transpose(1, 3))


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


def test_unavailable_backend(monkeypatch):
    x = torch.randn(64, 8, 16, 16)
    monkeypatch.setattr(compiled, "_unavailable", lambda t: "no C++ compiler (test)")
    monkeypatch.setitem(backends._REGISTRY, "compiled", (compiled.compiled_l2_batch_norm, compiled._unavailable))
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.raises(RuntimeError, match="'compiled' is not available: no C\\+\\+ compiler"):
        l2_batch_norm(x, None, None, training=True, backend="compiled")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        l2_batch_norm(x, None, None, training=True)
        l2_batch_norm(x, None, None, training=True)
    msgs = [str(r.message) for r in rec if "falling back" in str(r.message)]
    assert len(msgs) == 1 and "no C++ compiler" in msgs[0]


def test_auto_selection():
    big = torch.randn(64, 8, 16, 16)
    assert backends.select(None, big) == "compiled"
    assert backends.select(None, big.double()) == "fused"
    assert backends.select(None, torch.randn(4, 3)) == "fused"
