"""The native backend: the l2bn:: custom operators (schema, fake kernels, registered autograd,
torch.compile) and their build. Values against the reference are in test_backends.py, which
runs every backend (native included) through the same differential checks."""

import copy
import subprocess
import sys

import pytest
import torch
import torch.fx

import l2bn
from l2bn.kernels import native
from l2bn.kernels.reference import l2_batch_norm_reference

native.load()  # builds once per machine (README set-up does it ahead of time)
OPS = torch.ops.l2bn

SHAPES = [
    ((6, 4, 5, 5), torch.contiguous_format),
    ((6, 4, 5, 5), torch.channels_last),
    ((3, 4, 2, 3, 3), torch.channels_last_3d),
    ((7, 5), torch.contiguous_format),
    ((4, 3, 9), torch.contiguous_format),
]


def _input(shape, fmt, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=dtype, generator=g) * 2 + 0.5
    return x.contiguous(memory_format=fmt) if x.dim() >= 4 else x


def _stats_args(x):
    c = x.shape[1]
    return torch.linspace(-0.2, 0.2, c, dtype=torch.float64), torch.linspace(
        0.5, 1.5, c, dtype=torch.float64
    )


@pytest.mark.parametrize("shape,fmt", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_opcheck_forward_ops(shape, fmt, affine):
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration and AOT dispatch
    of the two forward operators."""
    x = _input(shape, fmt).requires_grad_()
    c = shape[1]
    w = torch.rand(c, dtype=torch.float64).add(0.5).requires_grad_() if affine else None
    b = torch.randn(c, dtype=torch.float64).requires_grad_() if affine else None
    torch.library.opcheck(OPS.train_forward.default, (x, w, b, 1e-5, 1e-12, 1.0))
    mean, var = _stats_args(x)
    torch.library.opcheck(OPS.eval_forward.default, (x, w, b, mean, var, 1e-5, 1e-12, 1.0))


@pytest.mark.parametrize("shape,fmt", SHAPES)
def test_opcheck_backward_op(shape, fmt):
    x = _input(shape, fmt)
    g = _input(shape, fmt, seed=1)
    c = shape[1]
    w = torch.rand(c, dtype=torch.float64).add(0.5)
    y, r, k, mk, vk, mu, var, invstd = OPS.train_forward(x, w, None, 1e-5, 1e-12, 1.0)
    rows = (mk, vk) if mk.numel() else (None, None)
    for batch_stats in (True, False):
        for need_dx in (True, False):
            torch.library.opcheck(
                OPS.backward.default,
                (g, x, w, k, r, *rows, mu, invstd, 1e-12, 1.0, batch_stats, need_dx),
            )


@pytest.mark.parametrize("shape,fmt", SHAPES)
def test_registered_autograd_matches_reference(shape, fmt):
    """The operators are differentiable on their own (torch.library.register_autograd): gradcheck
    in float64, and the gradients equal the reference composite's."""
    x = _input(shape, fmt, seed=2).requires_grad_()
    c = shape[1]
    w = torch.rand(c, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(c, dtype=torch.float64).requires_grad_()
    mean, var = _stats_args(x)
    train = lambda x, w, b: OPS.train_forward(x, w, b, 1e-5, 1e-12, 1.0)[0]  # noqa: E731
    evalf = lambda x, w, b: OPS.eval_forward(x, w, b, mean, var, 1e-5, 1e-12, 1.0)[0]  # noqa: E731
    assert torch.autograd.gradcheck(train, (x, w, b))
    assert torch.autograd.gradcheck(evalf, (x, w, b))
    g = torch.randn(shape, dtype=torch.float64)
    for fn, kw in (
        (train, dict(training=True)),
        (evalf, dict(running_mean=mean, running_var=var, training=False)),
    ):
        got = torch.autograd.grad(fn(x, w, b), (x, w, b), g)
        ref_y = l2_batch_norm_reference(
            x, kw.get("running_mean"), kw.get("running_var"), w, b, kw["training"], 0.0, 1e-5
        )
        ref = torch.autograd.grad(ref_y, (x, w, b), g)
        for a, e in zip(got, ref):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9 * float(e.abs().max()))


def test_outputs_keep_layout_and_statistics_shapes():
    x = _input((6, 4, 5, 5), torch.channels_last)
    y, r, k, mk, vk, mu, var, invstd = OPS.train_forward(x, None, None, 1e-5, 1e-12, 1.0)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert (
        r.shape == k.shape == (6,)
        and mk.shape == vk.shape == (6, 4)
        and mu.shape == var.shape == invstd.shape == (4,)
    )
    torch.testing.assert_close(r, x.flatten(1).norm(dim=1))
    # (N, C): the row statistics are k x and 0, not returned
    y2, *_, mk2, vk2, _m, _v, _i = OPS.train_forward(
        torch.randn(5, 3, dtype=torch.float64), None, None, 1e-5, 1e-12, 1.0
    )
    assert mk2.numel() == 0 and vk2.numel() == 0


def test_half_precision_is_computed_in_float32():
    x = torch.randn(8, 4, 6, 6).half()
    y, r, *_ = OPS.train_forward(x, None, None, 1e-5, 1e-12, 1.0)
    assert y.dtype == torch.float16 and r.dtype == torch.float32
    ref = l2_batch_norm_reference(x.float(), None, None, training=True)
    torch.testing.assert_close(y.float(), ref, rtol=2e-3, atol=2e-3)


def test_bad_input_is_a_clear_error():
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64"):
        OPS.train_forward(torch.ones(4, 3, dtype=torch.int64), None, None, 1e-5, 1e-12, 1.0)
    with pytest.raises(RuntimeError, match="per-channel tensor of 3 entries"):
        OPS.train_forward(torch.randn(4, 3, 2), torch.ones(4), None, 1e-5, 1e-12, 1.0)
    with pytest.raises(RuntimeError, match="shape"):
        OPS.backward(
            torch.randn(4, 3),
            torch.randn(4, 3, 2),
            None,
            torch.ones(4),
            torch.ones(4),
            None,
            None,
            torch.zeros(3),
            torch.ones(3),
            1e-12,
            1.0,
            True,
            True,
        )


def _graph_code(model, x):
    codes = []

    def capture(gm, example_inputs):
        codes.extend(m.code for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
        return gm.forward

    out = torch.compile(model, backend=capture, fullgraph=True)(x)
    return out, "\n".join(codes)


def test_compile_fullgraph_sees_one_op_per_call(monkeypatch):
    """Once the kernel is loaded, torch.compile(fullgraph=True) traces each L2BN call as the
    custom operator (no graph break, no decomposition), and the compiled model equals eager."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), l2bn.L2BatchNorm2d(8), torch.nn.ReLU()
    )
    x = torch.randn(4, 3, 8, 8)
    eager = model(x)
    out, code = _graph_code(model, x)
    assert "l2bn.train_forward" in code and "batch_norm" not in code
    torch.testing.assert_close(out, eager)
    model.eval()
    out, code = _graph_code(model, x)
    assert "l2bn.eval_forward" in code
    torch.testing.assert_close(out, model(x))
    # and with inductor, forward and backward against the reference backend
    model.train()
    ref = copy.deepcopy(model)
    xc = x.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    yc = torch.compile(model, fullgraph=True)(xc)
    g = torch.randn_like(yc)
    yc.backward(g)
    monkeypatch.setenv("L2BN_BACKEND", "reference")
    yr = ref(xr)
    yr.backward(g)
    torch.testing.assert_close(yc, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[0].weight.grad, ref[0].weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var)


def test_build_command_reports_ready():
    """``python -m l2bn.kernels`` (the README's set-up runs it) loads and checks the kernel."""
    out = subprocess.run(
        [sys.executable, "-m", "l2bn.kernels"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    assert "native kernel ready" in out.stdout and "float64" in out.stdout
    err = float(out.stdout.split("reference| = ")[1].split()[0])
    assert err < 1e-10


def test_build_check_in_process(capsys):
    """The same check in this process (so that it is seen by coverage and mutation testing)."""
    assert native._main() == 0
    out = capsys.readouterr().out
    assert out.startswith("l2bn native kernel ready (") and str(native._library_path()) in out
    err = float(out.split("reference| = ")[1].split()[0])
    assert 0 <= err < 1e-10


@pytest.mark.parametrize("shape,fmt", SHAPES)
def test_native_l2_batch_norm_matches_reference(shape, fmt):
    """The engine entry point, batch statistics and given statistics, with and without affine."""
    x = _input(shape, fmt)
    c = x.shape[1]
    w, b = (
        torch.linspace(0.5, 2.0, c, dtype=torch.float64),
        torch.linspace(-1.0, 1.0, c, dtype=torch.float64),
    )
    for weight, bias in ((None, None), (w, b)):
        y, mean, var, count = native.native_l2_batch_norm(
            x, weight, bias, None, None, 1e-5, 1e-12, False
        )
        ref = l2_batch_norm_reference(x, None, None, weight, bias, training=True)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        assert float(count) == x.numel() / c
        rm, rv = _stats_args(x)
        y, mean, var, _ = native.native_l2_batch_norm(x, weight, bias, rm, rv, 1e-5, 1e-12, True)
        ref = l2_batch_norm_reference(x, rm, rv, weight, bias, training=False, unit_rms=True)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(mean, rm)
        torch.testing.assert_close(var, rv)


def test_automatic_selection_prefers_native_for_cpu_floats():
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert native._prefer(torch.empty(2, 3, dtype=dtype))
        assert l2bn.kernels.backends.select(None, torch.empty(2, 3, dtype=dtype)) == "native"
    assert not native._prefer(torch.empty(2, 3, dtype=torch.complex64))
    assert not native._prefer(torch.empty(2, 3, device="meta"))
    assert "CPU only" in native._unavailable(torch.empty(2, 3, device="meta"))
    assert "supports float16/bfloat16/float32/float64" in native._unavailable(
        torch.empty(2, 3, dtype=torch.int64)
    )


def test_import_and_first_call_print_nothing():
    """On a CPU-only machine torch warns "No CUDA runtime is found" when its extension module is
    first imported, which loading l2bn's kernel does: l2bn drops that one message."""
    import subprocess
    import sys

    code = (
        "import torch, l2bn; x = torch.randn(2, 4, 3, 3); "
        "l2bn.L2BatchNorm2d(4)(x).sum().backward(); "
        "print(l2bn.kernels.backends.select(None, x))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "native", r.stderr
    assert r.stderr == "", r.stderr
