"""l2bn.functional.l2_batch_norm: backends, errors and property-based comparison to the spec."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from l2bn.functional import available_backends, l2_batch_norm
from l2bn.kernels.args import NormArgs
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


@settings(
    max_examples=int(__import__("os").environ.get("L2BN_HYPOTHESIS_EXAMPLES", 60)), deadline=None
)
@given(cases())
@example((4, 3, [5, 5], 1e8, True, False, True, False, False, 0))  # large norms: small gradients
@example((4, 3, [5, 5], 1e-6, False, True, True, True, True, 1))
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
    assert_grads_close(x.detach(), g, w, unit_rms, d, d_ref)


def assert_grads_close(x, g, w, unit_rms, d, d_ref, l2_eps=1e-12, eps=1e-5):
    """Input gradient per sample, against a bound on the size of the terms of that sample's
    gradient, |g| max(|w|, 1) k_n / sqrt(eps) with k_n = s / max(|x_n|, l2_eps): every term of
    dx_n scales with k_n, and with (near-)constant normalized channels the exact gradient is a
    cancellation of such terms, so float64 agreement is judged relative to this bound (plus
    1e-6 of the sample's own largest entry). Parameter gradients: sums over the batch of
    |g| times normalized values of size up to sqrt(count)."""
    n = x.shape[0]
    s = x[0].numel() ** 0.5 if unit_rms else 1.0
    k = s / x.flatten(1).norm(dim=1).clamp_min(l2_eps)
    wmax = float(w.detach().abs().max()) if w is not None else 1.0
    bound = float(g.abs().max()) * max(wmax, 1.0) * k / eps**0.5
    a, r = d[0].flatten(1), d_ref[0].flatten(1)
    err = (a - r).abs().amax(1)
    allowed = 1e-10 * bound + 1e-6 * r.abs().amax(1)
    assert bool((err <= allowed).all()), (err / allowed).tolist()
    count = x.numel() // x.shape[1]
    for a, r in zip(d[1:], d_ref[1:]):
        torch.testing.assert_close(
            a, r, rtol=1e-6, atol=1e-10 * float(g.abs().sum()) * count**0.5 / n
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_low_precision_close_to_float64(dtype):
    x = torch.randn(16, 8, 6, 6)
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    y = l2_batch_norm(x.to(dtype), None, None, w, b, training=True, backend="fused")
    y64 = l2_batch_norm_reference(x.double(), None, None, w.double(), b.double(), True)
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["reference", "fused", "compiled", "native"])
def test_eps_checked_like_batch_norm(backend):
    """eps <= 0 was accepted; F.batch_norm refuses it in training (positive) and eval
    (non-negative) with ValueError, and so do we, before any backend runs."""
    x = torch.randn(4, 3, 2, 2)
    rm, rv = torch.zeros(3), torch.ones(3)
    for eps in (0.0, -1.0):
        with pytest.raises(ValueError, match="eps must be positive during training") as bn:
            torch.nn.functional.batch_norm(x, rm, rv, training=True, eps=eps)
        with pytest.raises(
            ValueError, match="eps must be positive during training, but got"
        ) as ours:
            l2_batch_norm(x, rm.clone(), rv.clone(), training=True, eps=eps, backend=backend)
        assert type(ours.value) is type(bn.value)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        torch.nn.functional.batch_norm(x, rm, rv, training=False, eps=-1.0)
    with pytest.raises(ValueError, match="eps must be non-negative, but got -1.0"):
        l2_batch_norm(x, rm, rv, training=False, eps=-1.0, backend=backend)
    # eps = 0 in evaluation is allowed, as by BN
    assert torch.isfinite(l2_batch_norm(x, rm, rv, training=False, eps=0.0, backend=backend)).all()
    for l2_eps in (0.0, -1e-12, float("nan")):
        with pytest.raises(ValueError, match="l2_eps must be positive"):
            l2_batch_norm(x, None, None, training=True, l2_eps=l2_eps, backend=backend)
    with pytest.raises(TypeError, match="momentum must be a real number, got str"):
        l2_batch_norm(x, rm, rv, training=True, momentum="0.1", backend=backend)
    with pytest.raises(TypeError, match="eps must be a real number, got NoneType"):
        l2_batch_norm(x, rm, rv, training=True, eps=None, backend=backend)
    with pytest.raises(ValueError, match="running_var has 4 elements"):
        l2_batch_norm(x, rm, torch.ones(4), training=False, backend=backend)


def test_reference_keeps_memory_format():
    """The reference backend returned a contiguous output for a channels_last input."""
    x = torch.randn(4, 3, 5, 6).contiguous(memory_format=torch.channels_last)
    for training in (True, False):
        y = l2_batch_norm(x, torch.zeros(3), torch.ones(3), training=training, backend="reference")
        assert y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(
            y, l2_batch_norm(x, torch.zeros(3), torch.ones(3), training=training, backend="fused")
        )


def test_argument_errors_name_the_problem():
    x = torch.randn(4, 3, 2)
    with pytest.raises(TypeError, match="expected a Tensor input, got list"):
        l2_batch_norm([1.0, 2.0], None, None, training=True)
    with pytest.raises(ValueError, match=r"at least 2 dims, got 1D input of shape \(4,\)"):
        l2_batch_norm(torch.randn(4), None, None, training=True)
    with pytest.raises(TypeError, match="floating-point input .* got torch.int64"):
        l2_batch_norm(torch.ones(4, 3, dtype=torch.long), None, None, training=True)
    for name, kw in (
        ("running_mean", dict(running_mean=torch.zeros(2), running_var=torch.ones(3))),
        ("running_var", dict(running_mean=torch.zeros(3), running_var=torch.ones(5))),
        ("weight", dict(running_mean=None, running_var=None, weight=torch.ones(4))),
        ("bias", dict(running_mean=None, running_var=None, bias=torch.zeros(1))),
    ):
        n = next(t.numel() for k, t in kw.items() if k == name)
        with pytest.raises(
            ValueError,
            match=rf"input has 3 channels \(dim 1 of shape \(4, 3, 2\)\) but {name} has {n} "
            rf"elements",
        ):
            l2_batch_norm(x, training=True, **kw)
    with pytest.raises(TypeError, match="l2_eps must be a real number, got str"):
        l2_batch_norm(x, None, None, training=True, l2_eps="1e-12")
    with pytest.raises(TypeError, match="momentum must be a real number, got bool"):
        l2_batch_norm(x, None, None, training=True, momentum=True)
    msg = (
        r"l2_batch_norm: running_mean and running_var are required when training=False "
        r"\(pass training=True to use batch statistics\)"
    )
    for rm, rv in ((None, None), (torch.zeros(3), None), (None, torch.ones(3))):
        with pytest.raises(ValueError, match=msg):
            l2_batch_norm(x, rm, rv, training=False)


def test_defaults_are_batch_norms():
    """training=False, momentum=0.1, eps=1e-5, l2_eps=1e-12, unit_rms=False by default, as
    F.batch_norm (plus the l2 step)."""
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    x[0] = 1e-13  # norm below the default l2_eps
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    u = torch.nn.functional.normalize(x.flatten(1), dim=1, eps=1e-12).view_as(x)
    torch.testing.assert_close(l2_batch_norm(x, rm, rv), torch.nn.functional.batch_norm(u, rm, rv))
    rm2, rv2 = rm.clone(), rv.clone()
    y = l2_batch_norm(x, rm, rv, training=True)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(u, rm2, rv2, training=True))
    torch.testing.assert_close((rm, rv), (rm2, rv2))


@pytest.mark.parametrize("backend", ["fused", "compiled", "native", "reference"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (1, 1, 1, 1)])
def test_single_element_samples_in_eval(backend, shape):
    """Evaluation of a batch of one (BN allows it), down to a single entry."""
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64) * 3
    rm, rv = torch.randn(c, dtype=torch.float64) * 0.1, torch.rand(c, dtype=torch.float64) + 0.5
    u = torch.nn.functional.normalize(x.flatten(1), dim=1).view_as(x)
    torch.testing.assert_close(
        l2_batch_norm(x, rm, rv, backend=backend), torch.nn.functional.batch_norm(u, rm, rv)
    )


def test_reference_defaults_and_messages():
    """The reference's documented defaults (l2_eps 1e-12, unit_rms off, evaluation, momentum
    0.1) and its error messages (mutation testing found none of them checked)."""
    from l2bn.kernels.reference import l2_normalize_samples, reference_backend

    x = torch.randn(4, 3, 2, dtype=torch.float64)
    x[1] *= 1e-3  # a norm well below 1: a wrong l2_eps default would clamp it
    u = l2_normalize_samples(x)
    torch.testing.assert_close(u.flatten(1).norm(dim=1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(u, x / x.flatten(1).norm(dim=1)[:, None, None])
    rm, rv = torch.full((3,), 0.1, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64)
    y = l2_batch_norm_reference(x, rm, rv)  # evaluation: the running statistics, untouched
    torch.testing.assert_close(y, (u - 0.1) / (2.0 + 1e-5) ** 0.5)
    assert float(rm[0]) == 0.1 and float(rv[0]) == 2.0
    l2_batch_norm_reference(x, rm, rv, training=True)  # momentum 0.1 by default
    torch.testing.assert_close(rm, 0.9 * 0.1 + 0.1 * u.mean(dim=(0, 2)))
    with pytest.raises(ValueError, match="batch dimension and at least one more, got 1D"):
        l2_normalize_samples(torch.randn(5))
    with pytest.raises(ValueError) as e:
        reference_backend(x, NormArgs(None, None, None, None, True, process_group=object()))
    assert str(e.value) == "l2_batch_norm: the 'reference' backend does not support process_group"
    assert (
        l2_normalize_samples(x.half()).dtype == torch.float32
    )  # returned in the accumulation dtype


@pytest.mark.parametrize("backend", ["reference", "fused", "native", None])
def test_options_reach_the_backend(backend):
    """eps, l2_eps and unit_rms passed through l2_batch_norm reach every backend: the result is
    the formula written out by hand, with values that make each option visible."""
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    x[2] *= 1e-2  # norm ~0.03, below l2_eps = 0.5: clamped
    eps, l2_eps = 0.3, 0.5
    d = 3 * 4
    norms = x.flatten(1).norm(dim=1).clamp_min(l2_eps)[:, None, None]
    u = x / norms * d**0.5
    mean, var = u.mean(dim=(0, 2), keepdim=True), u.var(dim=(0, 2), unbiased=False, keepdim=True)
    want = (u - mean) / (var + eps).sqrt()
    y = l2_batch_norm(
        x, None, None, training=True, eps=eps, l2_eps=l2_eps, unit_rms=True, backend=backend
    )
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_backend_half_layer(dtype):
    """A layer converted with .half()/.to(bfloat16) on the reference backend: parameters and
    running statistics in the half dtype are used in float32 and updated in place, the output
    keeps the input's dtype; values as the float64 computation on the same (rounded) numbers."""
    from l2bn.kernels.reference import reference_backend

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 4, 4, generator=g).to(dtype)
    w, b = torch.rand(3, generator=g).add(0.5).to(dtype), torch.randn(3, generator=g).to(dtype)
    rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    y = reference_backend(x, NormArgs(rm, rv, w, b, training=True))
    assert y.dtype == dtype and rm.dtype == dtype and rv.dtype == dtype
    rm64, rv64 = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y64 = l2_batch_norm_reference(x.double(), rm64, rv64, w.double(), b.double(), training=True)
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(y.double(), y64, rtol=2 * ulp, atol=4 * ulp * float(y64.abs().max()))
    torch.testing.assert_close(
        rm.double(), rm64, rtol=2 * ulp, atol=2 * ulp * float(rm64.abs().max())
    )
    torch.testing.assert_close(rv.double(), rv64, rtol=2 * ulp, atol=0)
    # evaluation with the half running statistics
    y = reference_backend(x, NormArgs(rm, rv, w, b, training=False))
    y64 = l2_batch_norm_reference(x.double(), rm.double(), rv.double(), w.double(), b.double())
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), y64, rtol=2 * ulp, atol=4 * ulp * float(y64.abs().max()))
