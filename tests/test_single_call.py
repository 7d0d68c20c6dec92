"""The layers' single C++ call on the CPU (``l2bn::layer``, csrc/layer.h).

A module forward on a CPU tensor is one operator call: checks, kernel, running statistics, step
count and a C++ autograd node. These tests pin that it is used (one top-level operator, the C++
node), that it computes what the Python layer computes (bit for bit against the native backend's
operators, and against the float64 reference over several steps: outputs, gradients, double
backward, running statistics with the warm-up factor), and that it declines — having changed
nothing — wherever the Python layer has something to add: the first step, bad input (same
errors), out-of-range norms, another backend, forward-mode AD, ``torch.func``, dispatch modes.
"""

import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import l2bn
from l2bn.functional import l2_batch_norm
from l2bn.kernels import native
from l2bn.kernels.reference import l2_batch_norm_reference
from l2bn.running import running_factor

native.load()
NODE = "torch::autograd::CppNode<l2bn::L2BatchNormFunction>"  # the C++ autograd node

CASES = {  # name: (layer class, input shape, memory format)
    "1d (N, C)": (l2bn.L2BatchNorm1d, (16, 5), None),
    "1d (N, C, L)": (l2bn.L2BatchNorm1d, (6, 4, 9), None),
    "2d": (l2bn.L2BatchNorm2d, (6, 4, 5, 5), None),
    "2d channels_last": (l2bn.L2BatchNorm2d, (6, 4, 5, 5), torch.channels_last),
    "3d": (l2bn.L2BatchNorm3d, (3, 4, 2, 3, 3), None),
}


def _input(shape, fmt, dtype=torch.float64, seed=0):
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5
    return x.contiguous(memory_format=fmt) if fmt is not None else x


def _python_only(layer, x):
    """The layer's Python path, whatever the single call would do."""
    return layer._python_forward(x)


def _fresh(cls, c, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    layer = cls(c, **kw).to(dtype)
    if layer.weight is not None:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            if layer.bias is not None:
                layer.bias.uniform_(-0.5, 0.5)
    return layer


def _top_level_ops(fn):
    with torch.autograd.profiler.profile() as prof:
        fn()
    return [e.name for e in prof.function_events if e.cpu_parent is None]


@pytest.mark.parametrize("case", list(CASES))
def test_a_forward_is_one_operator_call(case):
    """One operator per forward; during the warm-up of the running factor (17 steps at momentum
    0.9, 356 at BN's 0.1) the layer also reads its step count once on the host."""
    cls, shape, fmt = CASES[case]
    layer = _fresh(cls, shape[1], torch.float32, momentum=0.9)
    x = _input(shape, fmt, torch.float32).requires_grad_()
    layer(x)  # the first step runs in Python (the layer's eps check)
    assert _top_level_ops(lambda: layer(x)) == ["l2bn::layer", "aten::item"]
    for _ in range(16):
        layer(x)
    assert not layer._stats_warmup
    assert _top_level_ops(lambda: layer(x)) == ["l2bn::layer"]
    assert layer(x).grad_fn.name() == NODE
    layer.eval()
    with torch.no_grad():
        assert _top_level_ops(lambda: layer(x)) == ["l2bn::layer"]
    assert layer(x).grad_fn.name() == NODE  # parameters need gradients in evaluation too


def _reference_steps(layer, xs, gys):
    """The float64 composite with BN's step count and L2BN's running factor, by hand."""
    rm = layer.running_mean.clone() if layer.running_mean is not None else None
    rv = layer.running_var.clone() if layer.running_var is not None else None
    w = layer.weight.detach().clone().requires_grad_() if layer.weight is not None else None
    b = layer.bias.detach().clone().requires_grad_() if layer.bias is not None else None
    out = []
    for step, (x, gy) in enumerate(zip(xs, gys), start=1):
        xx = x.detach().clone().requires_grad_()
        y = l2_batch_norm_reference(
            xx, None, None, w, b, True, l2_eps=layer.l2_eps, unit_rms=layer.unit_rms
        )
        if rm is not None:
            n = x.numel() // x.shape[1]
            u = l2bn.functional.l2_normalize_samples(
                x, l2_eps=layer.l2_eps, unit_rms=layer.unit_rms
            )
            dims = [0] + list(range(2, x.dim()))
            f = running_factor(layer.momentum, step)
            rm = (1 - f) * rm + f * u.mean(dims)
            rv = (1 - f) * rv + f * u.var(dims, unbiased=False) * n / (n - 1)
        grads = torch.autograd.grad(y, [t for t in (xx, w, b) if t is not None], gy)
        out.append((y.detach(), grads, rm, rv))
    return out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"momentum": None},
        {"momentum": 0.5, "unit_rms": True},
        {"affine": False},
        {"bias": False},
        {"track_running_stats": False},
    ],
    ids=["default", "cumulative", "m0.5-unit_rms", "no-affine", "no-bias", "untracked"],
)
def test_training_steps_match_the_float64_reference(case, kw):
    """Five steps: outputs, input/weight/bias gradients, running statistics (warm-up factor of
    running_factor), step count; then evaluation with the running statistics."""
    cls, shape, fmt = CASES[case]
    layer = _fresh(cls, shape[1], **kw)
    xs = [_input(shape, fmt, seed=s) for s in range(5)]
    gys = [
        torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9 + s))
        for s in range(5)
    ]
    want = _reference_steps(layer, xs, gys)
    params = [t for t in (layer.weight, layer.bias) if t is not None]
    for step, (x, gy, (y_ref, g_ref, rm, rv)) in enumerate(zip(xs, gys, want), start=1):
        xx = x.clone().requires_grad_()
        y = layer(xx)
        assert y.grad_fn.name() == NODE  # the first step too: its Python layer calls the op
        grads = torch.autograd.grad(y, [xx, *params], gy)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
        for g, r in zip(grads, g_ref):
            torch.testing.assert_close(g, r, rtol=0, atol=1e-9)
        if rm is not None:
            torch.testing.assert_close(layer.running_mean, rm, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(layer.running_var, rv, rtol=1e-12, atol=1e-14)
            assert int(layer.num_batches_tracked) == step
    layer.eval()
    x = _input(shape, fmt, seed=11)
    ref = l2_batch_norm_reference(
        x,
        layer.running_mean,
        layer.running_var,
        layer.weight,
        layer.bias,
        layer.running_mean is None,
        l2_eps=layer.l2_eps,
        unit_rms=layer.unit_rms,
    )
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", ["1d (N, C)", "2d", "2d channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_and_gradgradcheck(case, training):
    cls, shape, fmt = CASES[case]
    layer = _fresh(cls, shape[1])
    layer(_input(shape, fmt, seed=3))  # past the first step
    layer.train(training)
    x = _input(shape, fmt).requires_grad_()

    def fn(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    args = (
        x,
        layer.weight.detach().clone().requires_grad_(),
        layer.bias.detach().clone().requires_grad_(),
    )
    assert fn(*args).grad_fn.name() == NODE
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_the_same_bits_as_the_native_backend(case, dtype):
    """The single call runs the native operators' kernels: outputs and gradients are the same
    bits as ``backend="native"`` (whose accuracy test_backends and test_adversarial judge); the
    running statistics agree to rounding (a fused loop here, ``mul_``/``add_`` there)."""
    cls, shape, fmt = CASES[case]
    layer = _fresh(cls, shape[1], torch.float32)
    layer(_input(shape, fmt, dtype, seed=5))
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    for training in (True, False):
        layer.train(training)
        x = _input(shape, fmt, dtype).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        w2, b2 = (t.detach().clone().requires_grad_() for t in (layer.weight, layer.bias))
        if not training:  # the layer's own statistics (updated to rounding, checked below)
            rm, rv = layer.running_mean.clone(), layer.running_var.clone()
        y = layer(x)
        assert y.grad_fn.name() == NODE and y.dtype == dtype
        factor = running_factor(0.1, 2) if training else 0.1
        y2 = l2_batch_norm(x2, rm, rv, w2, b2, training, factor, backend="native")
        gy = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        g1 = torch.autograd.grad(y, [x, layer.weight, layer.bias], gy)
        g2 = torch.autograd.grad(y2, [x2, w2, b2], gy)
        assert torch.equal(y, y2) and y.stride() == y2.stride()
        assert all(torch.equal(a, b) for a, b in zip(g1, g2))
        torch.testing.assert_close(layer.running_mean, rm, rtol=1e-6, atol=0)
        torch.testing.assert_close(layer.running_var, rv, rtol=1e-6, atol=0)


def _state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _unchanged(before, layer):
    return all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def _op_args(layer, x):
    return (
        x,
        layer.weight,
        layer.bias,
        layer.running_mean,
        layer.running_var,
        layer.num_batches_tracked,
        layer.training,
        layer.track_running_stats,
        layer.momentum,
        layer._stats_warmup,
        layer.eps,
        layer.l2_eps,
        layer.unit_rms,
        layer._expected_dims,
        layer.num_features,
    )


def test_bad_input_gets_the_python_layers_errors():
    """The operator declines bad input without touching the layer's state; the Python layer
    then raises its own error (and counts the step first where BN does, as BN)."""
    layer = l2bn.L2BatchNorm2d(4)
    layer(torch.randn(8, 4, 3, 3))
    bad = [
        (torch.randn(8, 4, 3), ValueError, r"expected 4D input \(got 3D input\)"),
        (torch.randn(8, 5, 3, 3), ValueError, "expected 4 channels in dim 1"),
        (torch.randn(1, 4, 1, 1), ValueError, "more than 1 value per channel"),
        (torch.ones(8, 4, 3, 3, dtype=torch.long), TypeError, "floating-point input"),
    ]
    op = native.layer_op(torch.zeros(2, 4))
    for x, err, msg in bad:
        before = _state(layer)
        assert op(*_op_args(layer, x)) is None and _unchanged(before, layer)
        with pytest.raises(err, match=msg):
            layer(x)
    layer.eps = 0.0
    before = _state(layer)
    assert op(*_op_args(layer, torch.randn(8, 4, 3, 3))) is None and _unchanged(before, layer)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        layer(torch.randn(8, 4, 3, 3))


@pytest.mark.parametrize(
    "name,make",
    [
        ("first step", lambda: (l2bn.L2BatchNorm2d(4), torch.randn(8, 4, 3, 3))),
        ("empty batch", lambda: (l2bn.L2BatchNorm2d(4), torch.randn(0, 4, 3, 3))),
        ("huge norms", lambda: (l2bn.L2BatchNorm2d(4), torch.randn(8, 4, 3, 3) * 1e20)),
        (
            "meta",
            lambda: (l2bn.L2BatchNorm2d(4, device="meta"), torch.randn(8, 4, 3, 3, device="meta")),
        ),
        ("in range", lambda: (l2bn.L2BatchNorm2d(4), torch.randn(8, 4, 3, 3))),
    ],
)
def test_declined_calls_run_the_python_layer(name, make, monkeypatch):
    layer, x = make()
    if name not in ("first step", "meta"):
        layer(torch.randn(8, 4, 3, 3).to(x.dtype))  # past the first step
    calls = []
    python = type(layer)._python_forward
    monkeypatch.setattr(
        type(layer), "_python_forward", lambda self, x: calls.append(1) or python(self, x)
    )
    y = layer(x)
    assert calls == ([] if name == "in range" else [1]), name
    if x.device.type == "cpu" and x.numel():
        torch.testing.assert_close(
            y.double(),
            l2_batch_norm_reference(
                x.double(), None, None, layer.weight.double(), layer.bias.double(), True
            ),
            rtol=1e-4,
            atol=1e-4,
        )


def test_the_first_step_still_warns_when_eps_dominates():
    layer = l2bn.L2BatchNorm2d(4)
    with pytest.warns(l2bn.running.EpsDominanceWarning):
        layer(torch.randn(2, 4, 200, 200))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(2, 4, 200, 200))  # once per layer


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_another_backend_named_in_the_environment_is_used(backend, monkeypatch):
    layer = l2bn.L2BatchNorm2d(4)
    layer(torch.randn(8, 4, 3, 3))
    monkeypatch.setenv("L2BN_BACKEND", backend)
    y = layer(torch.randn(8, 4, 3, 3, requires_grad=True))
    assert y.grad_fn.name() != NODE
    monkeypatch.setenv("L2BN_BACKEND", "native")
    assert layer(torch.randn(8, 4, 3, 3, requires_grad=True)).grad_fn.name() == NODE


def test_transforms_and_modes_run_the_python_layer():
    """torch.func, forward-mode AD and dispatch modes need the Python layer (batching rules,
    jvp, ATen ops the mode can see); each gives the reference's values."""
    layer = _fresh(l2bn.L2BatchNorm2d, 4)
    layer(_input((6, 4, 5, 5), None, seed=1))
    layer.eval()
    x, t = _input((6, 4, 5, 5), None), _input((6, 4, 5, 5), None, seed=2)

    def ref(x):
        return l2_batch_norm_reference(
            x, layer.running_mean, layer.running_var, layer.weight, layer.bias
        )

    with torch.no_grad():
        torch.testing.assert_close(torch.func.vmap(layer)(x[None])[0], ref(x))
        y, jy = torch.func.jvp(layer, (x,), (t,))
        _, jr = torch.func.jvp(ref, (x,), (t,))
    torch.testing.assert_close(jy, jr)

    class Names(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Names() as mode:
        layer(x)
    assert mode.names and not any("l2bn::layer" in n for n in mode.names)


def test_the_functional_takes_the_single_call_too():
    """``l2_batch_norm`` without a backend argument: one call, BN's update with ``momentum``."""
    x = _input((6, 4, 5, 5), None).requires_grad_()
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    y = l2_batch_norm(x, rm, rv, training=True)
    assert y.grad_fn.name() == NODE
    u = l2bn.functional.l2_normalize_samples(x.detach())
    n = x.numel() // 4
    torch.testing.assert_close(rm, 0.1 * u.mean((0, 2, 3)), rtol=1e-12, atol=1e-15)
    var = u.var((0, 2, 3), unbiased=False) * n / (n - 1)
    torch.testing.assert_close(rv, 0.9 + 0.1 * var, rtol=1e-12, atol=0)
    assert _top_level_ops(lambda: l2_batch_norm(x, rm, rv, training=True)) == ["l2bn::layer"]


@pytest.mark.parametrize("shape", [(4, 8, 2, 2), (6, 4, 5, 5), (16, 64), (8, 16, 8, 8)])
def test_saves_what_bn_saves_within_five_percent(shape):
    """Backward keeps x, the weight and O(N + C) statistics (per-sample norm and scale: 2 values
    per sample of C * M entries); the row statistics of u (2 N C values) only where they cost
    under 5 % of x (M >= 40), else backward recomputes them."""
    cls = l2bn.L2BatchNorm1d if len(shape) == 2 else l2bn.L2BatchNorm2d
    bn_cls = nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d
    sizes = {}
    for name, layer in (("bn", bn_cls(shape[1])), ("l2bn", cls(shape[1]))):
        x = torch.randn(shape, requires_grad=True)
        layer(x)  # past the first step
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        if name == "l2bn":
            assert y.grad_fn.name() == NODE
        sizes[name] = sum(saved)
    assert sizes["l2bn"] <= 1.05 * sizes["bn"], sizes


def test_inference_buffers_negative_views_and_a_changed_momentum():
    """Buffers made under inference_mode: the single call declines outside it, untouched, and
    the Python layer raises torch's error (as BN); a lazily negated input is read as its
    values; a momentum changed after the warm-up is used as it is, whichever path counted the
    earlier steps."""
    with torch.inference_mode():
        layer = l2bn.L2BatchNorm2d(4)
        layer(torch.randn(8, 4, 3, 3))  # the first step, inside
        x = torch.randn(8, 4, 3, 3)
        assert _top_level_ops(lambda: layer(x))[0] == "l2bn::layer"  # then the warm-up's read
    x, before = torch.randn(8, 4, 3, 3), _state(layer)
    op = native.layer_op(x)
    assert op(*_op_args(layer, x)) is None and _unchanged(before, layer)  # declined, untouched
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside"):
        layer(x)  # the Python layer's error (torch's, as for BN)

    layer = _fresh(l2bn.L2BatchNorm2d, 4)
    layer(_input((6, 4, 5, 5), None, seed=1))
    x = _input((6, 4, 5, 5), None)
    y = layer(torch._neg_view(x))
    want = l2_batch_norm_reference(-x, None, None, layer.weight, layer.bias, True)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-10)

    layer = l2bn.L2BatchNorm1d(4)
    for _ in range(400):
        layer(torch.randn(8, 4))
    assert not layer._stats_warmup  # cleared by the single call's path too
    layer.momentum = 0.01
    x = torch.randn(8, 4)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    layer(x)
    l2_batch_norm(x, rm, rv, layer.weight, layer.bias, True, 0.01)
    assert torch.equal(layer.running_mean, rm) and torch.equal(layer.running_var, rv)
