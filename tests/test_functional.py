"""l2bn.functional.l2_batch_norm: backends, errors and property-based comparison to the spec."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from l2bn.functional import available_backends, l2_batch_norm
from l2bn.kernels.reference import l2_batch_norm_reference


def test_matches_torch_batch_norm_signature():
    import inspect

    bn_params = list(inspect.signature(torch.nn.functional.batch_norm).parameters)
    ours = list(inspect.signature(l2_batch_norm).parameters)
    assert ours[: len(bn_params)] == bn_params


def test_unknown_backend_is_a_clear_error(monkeypatch):
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="unknown L2BN backend 'nope'"):
        l2_batch_norm(x, None, None, training=True, backend="nope")
    monkeypatch.setenv("L2BN_BACKEND", "reference")
    y = l2_batch_norm(x, None, None, training=True)
    assert y.shape == x.shape
    assert {"reference", "fused"} <= set(available_backends())


def test_eval_requires_running_stats():
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        l2_batch_norm(torch.randn(4, 3), None, None, training=False)


def test_rejects_wrong_param_size():
    with pytest.raises(ValueError, match="weight has 4 elements"):
        l2_batch_norm(torch.randn(4, 3), None, None, torch.ones(4), None, training=True)


@st.composite
def cases(draw):
    ndim = draw(st.integers(2, 5))
    n = draw(st.integers(2, 6))
    c = draw(st.integers(1, 5))
    spatial = [draw(st.integers(1, 5)) for _ in range(ndim - 2)]
    scale = draw(st.sampled_from([1e-6, 1e-2, 1.0, 1e3, 1e8]))
    training = draw(st.booleans())
    unit_rms = draw(st.booleans())
    affine = draw(st.booleans())
    zero_sample = draw(st.booleans())
    channels_last = ndim == 4 and draw(st.booleans())
    return (n, c, spatial, scale, training, unit_rms, affine, zero_sample, channels_last)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_fused_matches_reference_property(case):
    n, c, spatial, scale, training, unit_rms, affine, zero_sample, channels_last = case
    x = torch.randn([n, c] + spatial, dtype=torch.float64) * scale
    if zero_sample:
        x[0] = 0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.rand(c, dtype=torch.float64).add(0.5).requires_grad_() if affine else None
    b = torch.randn(c, dtype=torch.float64).requires_grad_() if affine else None
    rm, rv = torch.randn(c, dtype=torch.float64) * 0.1, torch.rand(c, dtype=torch.float64) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    if training and n * max(1, int(torch.tensor(spatial).prod()) if spatial else 1) == 1:
        return
    y = l2_batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, unit_rms=unit_rms, backend="fused")
    y_ref = l2_batch_norm_reference(x, rm2, rv2, w, b, training, 0.1, 1e-5, unit_rms=unit_rms)
    torch.testing.assert_close(y, y_ref, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(rm, rm2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rv, rv2, rtol=1e-9, atol=1e-12)
    g = torch.randn_like(y)
    inputs = [x] + ([w, b] if affine else [])
    d = torch.autograd.grad(y, inputs, g)
    d_ref = torch.autograd.grad(y_ref, inputs, g)
    for a, r in zip(d, d_ref):
        # the input gradient scales like 1/|x|: compare relative to its magnitude
        tol = 1e-7 * max(1.0, float(r.abs().max()))
        torch.testing.assert_close(a, r, rtol=1e-6, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_low_precision_close_to_float64(dtype):
    x = torch.randn(16, 8, 6, 6)
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    y = l2_batch_norm(x.to(dtype), None, None, w, b, training=True, backend="fused")
    y64 = l2_batch_norm_reference(x.double(), None, None, w.double(), b.double(), True)
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)
