"""L2BatchNorm{1,2,3}d against the composite BN(F.normalize(x)) in float64, and BN's contract."""

import copy
import itertools

import pytest
import torch
from conftest import composite
from torch import nn

import l2bn

LAYERS = [
    (l2bn.L2BatchNorm1d, nn.BatchNorm1d, (16, 5)),
    (l2bn.L2BatchNorm1d, nn.BatchNorm1d, (12, 5, 7)),
    (l2bn.L2BatchNorm2d, nn.BatchNorm2d, (10, 4, 6, 5)),
    (l2bn.L2BatchNorm3d, nn.BatchNorm3d, (6, 3, 4, 5, 3)),
]
OPTIONS = list(
    itertools.product([0.1, None], [True, False], [True, False], [False, True])
)  # momentum, affine, track_running_stats, unit_rms


def _params(m):
    return [p for p in (m.weight, m.bias) if p is not None]


@pytest.mark.parametrize("l2cls,bncls,shape", LAYERS)
@pytest.mark.parametrize("momentum,affine,track,unit_rms", OPTIONS)
def test_matches_composite_float64(l2cls, bncls, shape, momentum, affine, track, unit_rms):
    c = shape[1]
    kw = dict(momentum=momentum, affine=affine, track_running_stats=track, dtype=torch.float64)
    bn = bncls(c, **kw)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    l2 = l2cls(c, **kw, unit_rms=unit_rms)
    l2.load_state_dict(bn.state_dict())
    for step in range(4):
        training = step < 3
        bn.train(training)
        l2.train(training)
        x = (torch.randn(shape, dtype=torch.float64) * (1 + step)).requires_grad_()
        x.data[0] *= 10  # unequal sample norms
        y_ref = composite(bn, x, unit_rms)
        y = l2(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
        g = torch.randn_like(y)
        d_ref = torch.autograd.grad(y_ref, [x] + _params(bn), g)
        d = torch.autograd.grad(y, [x] + _params(l2), g)
        for a, b in zip(d, d_ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        for key, val in bn.state_dict().items():
            torch.testing.assert_close(l2.state_dict()[key], val, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("unit_rms", [False, True])
@pytest.mark.parametrize("shape", [(5, 3, 4, 4), (6, 4), (4, 3, 5)])
def test_gradcheck(training, unit_rms, shape):
    m = l2bn.L2BatchNorm2d if len(shape) == 4 else l2bn.L2BatchNorm1d
    layer = m(shape[1], dtype=torch.float64, unit_rms=unit_rms)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
        layer.running_mean.uniform_(-0.1, 0.1)
        layer.running_var.uniform_(0.5, 1.5)
    layer.train(training)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return l2bn.functional.l2_batch_norm(
            x,
            layer.running_mean.clone(),
            layer.running_var.clone(),
            w,
            b,
            training,
            unit_rms=unit_rms,
        )

    assert torch.autograd.gradcheck(f, (x, layer.weight, layer.bias))


def test_zero_sample_is_finite():
    layer = l2bn.L2BatchNorm2d(3, dtype=torch.float64)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    x[1] = 0
    x.requires_grad_()
    y = layer(x)
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    ref = composite(nn.BatchNorm2d(3, dtype=torch.float64), x)
    torch.testing.assert_close(y, ref)
    layer.eval()
    assert torch.isfinite(layer(x)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_huge_values(dtype):
    layer = l2bn.L2BatchNorm2d(4)
    x = torch.randn(8, 4, 6, 6).mul(65504 / 4).clamp(-65504, 65504).to(dtype)
    x[0, 0, 0, 0] = 65504
    x.requires_grad_()
    y = layer(x)
    assert y.dtype == dtype
    # a random upstream gradient: d(sum y)/dx is exactly 0 in training, it proves nothing
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.float().backward(g)
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert x.grad.dtype == dtype
    xd = x.detach().double().requires_grad_()
    ref = l2bn.functional.l2_batch_norm(xd, None, None, training=True, backend="reference")
    ref.backward(g.double())
    torch.testing.assert_close(y.double(), ref.detach(), rtol=2e-2, atol=2e-2)
    # the gradient is ~1e-5 (1/norm of a sample of 6e4s), near half's subnormal range: compare
    # relative to its own size, sample by sample
    err = (x.grad.double() - xd.grad).flatten(1).norm(dim=1) / xd.grad.flatten(1).norm(dim=1)
    assert float(err.max()) < 5e-2, err
    assert torch.isfinite(layer.running_var).all()


def test_autocast_cpu_bf16():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), l2bn.L2BatchNorm2d(8), nn.ReLU())
    x = torch.randn(4, 3, 10, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model[0](x)
        h.retain_grad()
        y = model[2](model[1](h))
    assert h.dtype == y.dtype == torch.bfloat16
    assert model[1].running_mean.dtype == torch.float32
    # a random upstream gradient (d(sum y)/dx of a norm layer is 0 in training); the layer's
    # input gradient must equal the float64 reference at the same bfloat16 input to bfloat16's
    # rounding (measured 0.24%; plain BN's gradient is 16-24% away)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y.float().backward(g)
    assert h.grad.dtype == torch.bfloat16 and torch.isfinite(model[0].weight.grad).all()
    hd = h.detach().double().requires_grad_()
    w, b = model[1].weight.detach().double(), model[1].bias.detach().double()
    ref = torch.relu(
        l2bn.functional.l2_batch_norm(hd, None, None, w, b, training=True, backend="reference")
    )
    ref.backward(g.double())
    err = (h.grad.double() - hd.grad).flatten(1).norm(dim=1) / hd.grad.flatten(1).norm(dim=1)
    assert float(err.max()) < 1e-2, err


def test_channels_last_and_noncontiguous():
    layer = l2bn.L2BatchNorm2d(6, dtype=torch.float64)
    bn = nn.BatchNorm2d(6, dtype=torch.float64)
    x = torch.randn(5, 6, 7, 8, dtype=torch.float64)
    xcl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    y = layer(xcl)
    assert y.is_contiguous(memory_format=torch.channels_last)
    xr = x.clone().requires_grad_()
    y_ref = composite(bn, xr)
    torch.testing.assert_close(y, y_ref)
    # a random upstream gradient: d(sum y)/dx is exactly 0 in training, it proves nothing
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert xcl.grad.shape == x.shape
    torch.testing.assert_close(xcl.grad, xr.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer.weight.grad, bn.weight.grad, rtol=1e-9, atol=1e-9)
    # non-contiguous: a transposed and a strided view
    base = torch.randn(5, 8, 7, 6, dtype=torch.float64).transpose(1, 3)
    assert not base.is_contiguous()
    torch.testing.assert_close(layer(base), composite(bn, base.contiguous()))
    sl = torch.randn(10, 6, 7, 16, dtype=torch.float64)[::2, :, :, ::2]
    torch.testing.assert_close(layer(sl), composite(bn, sl.contiguous()))


def test_state_dict_round_trip_with_bn():
    bn = nn.BatchNorm2d(5)
    bn.train()
    bn(torch.randn(4, 5, 3, 3))
    l2 = l2bn.L2BatchNorm2d(5)
    assert list(l2.state_dict()) == list(bn.state_dict())
    l2.load_state_dict(bn.state_dict())
    for k, v in bn.state_dict().items():
        assert torch.equal(l2.state_dict()[k], v)
    l2(torch.randn(4, 5, 3, 3))
    bn2 = nn.BatchNorm2d(5)
    bn2.load_state_dict(l2.state_dict())
    assert int(bn2.num_batches_tracked) == 2


def test_errors_like_bn():
    layer = l2bn.L2BatchNorm2d(3)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        layer(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        l2bn.L2BatchNorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="expected 3 channels"):
        layer(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError) as bn_err:
        nn.BatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError) as l2_err:
        l2bn.L2BatchNorm1d(3)(torch.randn(1, 3))
    assert str(l2_err.value) == str(bn_err.value)
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 3, 4, 4, dtype=torch.long))
    # eval with a batch of one is fine, as in BN
    layer.eval()
    assert layer(torch.randn(1, 3, 4, 4)).shape == (1, 3, 4, 4)


def test_compile_fullgraph():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), l2bn.L2BatchNorm2d(8), nn.ReLU())
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 8, 8)
    y = compiled(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert model[0].weight.grad is not None
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)


def test_momentum_none_cumulative_average():
    bn = nn.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    l2 = l2bn.L2BatchNorm2d(3, momentum=None, dtype=torch.float64)
    for _ in range(5):
        x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
        composite(bn, x)
        l2(x)
    torch.testing.assert_close(l2.running_var, bn.running_var)
    assert int(l2.num_batches_tracked) == 5


def test_repr_and_docstrings():
    assert "unit_rms=True" in repr(l2bn.L2BatchNorm2d(4, unit_rms=True))
    for name in l2bn.__all__:
        obj = getattr(l2bn, name)
        assert (
            obj.__doc__ and "Example" in obj.__doc__ or name in ("functional", "L2_NORM_CLASSES")
        ), name


@pytest.mark.skipif(
    "bias" not in __import__("inspect").signature(nn.BatchNorm2d.__init__).parameters,
    reason="BatchNorm(bias=...) exists from torch 2.14",
)
def test_bias_false_like_batchnorm():
    bn = nn.BatchNorm2d(4, bias=False, dtype=torch.float64)
    l2 = l2bn.L2BatchNorm2d(4, bias=False, dtype=torch.float64)
    assert l2.bias is None and list(l2.state_dict()) == list(bn.state_dict())
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(l2(x), composite(bn, x))
    conv = l2bn.convert(nn.Sequential(nn.BatchNorm2d(4, bias=False)))
    assert conv[0].bias is None and type(l2bn.revert(conv)[0]) is nn.BatchNorm2d


def test_constructor_signature_mirrors_batchnorm():
    import inspect

    bn = list(inspect.signature(nn.BatchNorm2d.__init__).parameters)
    ours = list(inspect.signature(l2bn.L2BatchNorm2d.__init__).parameters)
    assert ours[: len(bn)] == bn or ours[: len(bn) - 1] == [p for p in bn if p != "bias"]


def test_many_layer_shapes_share_compiled_kernels():
    """A model whose layers have many different sizes must not exhaust dynamo's recompile limit."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the compiled path must not fall back
        for c, h in [
            (3, 40),
            (5, 33),
            (8, 16),
            (16, 8),
            (24, 24),
            (32, 4),
            (40, 12),
            (48, 6),
            (64, 2),
            (96, 7),
            (7, 7),
            (12, 30),
        ]:
            m = l2bn.L2BatchNorm2d(c)
            x = torch.randn(64, c, h, h, requires_grad=True)
            y = l2bn.functional.l2_batch_norm(
                x, m.running_mean, m.running_var, m.weight, m.bias, True, backend="compiled"
            )
            y.sum().backward()
            ref = l2bn.functional.l2_batch_norm(
                x.detach(), None, None, m.weight, m.bias, True, backend="reference"
            )
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_constructor_checks_like_batchnorm():
    """num_features, eps, momentum and l2_eps are checked with BN's error types."""
    for cls, bn in ((l2bn.L2BatchNorm2d, nn.BatchNorm2d), (l2bn.L2BatchNorm1d, nn.BatchNorm1d)):
        with pytest.raises(RuntimeError) as bn_err:
            bn(-1)
        with pytest.raises(RuntimeError, match="num_features must be non-negative, got -1"):
            cls(-1)
        assert "negative" in str(bn_err.value)
        with pytest.raises(TypeError):
            bn(2.5)
        with pytest.raises(TypeError, match="num_features must be an int, got float"):
            cls(2.5)
        with pytest.raises(TypeError, match="momentum must be a float or None, got str"):
            cls(3, momentum="fast")
        with pytest.raises(TypeError, match="eps must be a float, got str"):
            cls(3, eps="small")
        with pytest.raises(ValueError, match="l2_eps must be positive"):
            cls(3, l2_eps=0.0)
        assert cls(0).num_features == 0 and cls(3, momentum=None).momentum is None


@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_nonpositive_eps_raises_at_forward_like_batchnorm(eps):
    """BN accepts eps <= 0 at construction and raises ValueError at the forward in training
    ("eps must be positive"); in evaluation eps = 0 is fine and eps < 0 is refused."""
    x = torch.randn(4, 3, 2, 2)
    for mod in (nn.BatchNorm2d(3, eps=eps), l2bn.L2BatchNorm2d(3, eps=eps)):
        with pytest.raises(ValueError, match="eps must be positive during training"):
            mod(x)
        mod.eval()
        if eps == 0.0:
            assert torch.isfinite(mod(x)).all()
        else:
            with pytest.raises(ValueError, match="eps must be non-negative"):
                mod(x)
