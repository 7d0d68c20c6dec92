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
    seed = draw(st.integers(0, 2**31 - 1))
    return (n, c, spatial, scale, training, unit_rms, affine, zero_sample, channels_last, seed)


@settings(max_examples=int(__import__("os").environ.get("L2BN_HYPOTHESIS_EXAMPLES", 60)), deadline=None)
@given(cases())
def test_fused_matches_reference_property(case):
    n, c, spatial, scale, training, unit_rms, affine, zero_sample, channels_last, seed = case
    torch.manual_seed(seed)
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
    # Bound on the size of the intermediate terms of the input gradient: |g| |w| k / sqrt(eps),
    # k = s / min_n |x_n|. With (near-)constant normalized channels the exact gradient is a
    # cancellation of such terms, so float64 agreement is judged relative to this bound.
    norms = x.detach().flatten(1).norm(dim=1)
    k = (x[0].numel() ** 0.5 if unit_rms else 1.0) / float(norms[norms > 0].min())
    wmax = float(w.detach().abs().max()) if affine else 1.0
    bound = float(g.abs().max()) * max(wmax, 1.0) * max(k, 1.0) / 1e-5**0.5
    for a, r in zip(d, d_ref):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-10 * bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_low_precision_close_to_float64(dtype):
    x = torch.randn(16, 8, 6, 6)
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    y = l2_batch_norm(x.to(dtype), None, None, w, b, training=True, backend="fused")
    y64 = l2_batch_norm_reference(x.double(), None, None, w.double(), b.double(), True)
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)
