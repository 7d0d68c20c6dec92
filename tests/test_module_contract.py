"""The module contract PyTorch tests BatchNorm1d/2d/3d against, run on L2BatchNorm1d/2d/3d.

The inputs are PyTorch's own ``ModuleInfo`` entries for ``nn.BatchNorm{1,2,3}d`` (their
``module_inputs_func`` and ``module_error_inputs_func`` from
``torch.testing._internal.common_modules``); the checks are ours, of the same kinds as
PyTorch's ``test/test_modules.py``: forward against the composite, errors, gradcheck and
gradgradcheck, pickling and save/load, factory kwargs, memory formats, non-contiguous inputs,
``.to()`` / ``to_empty`` and meta-device construction. CPU only.
"""

from __future__ import annotations

import copy
import io
import pickle
import sys
import types
import unittest

import pytest
import torch
from conftest import composite
from torch import nn

import l2bn


def _load_module_db():
    # common_utils imports expecttest only for its TestCase base class; a stub is enough here
    stub = "expecttest" not in sys.modules
    if stub:
        try:
            import expecttest  # noqa: F401

            stub = False
        except ImportError:
            mod = types.ModuleType("expecttest")
            mod.TestCase = unittest.TestCase
            sys.modules["expecttest"] = mod
    try:
        from torch.testing._internal.common_modules import module_db
    finally:
        if stub:
            del sys.modules["expecttest"]
    return module_db


L2_OF = {
    nn.BatchNorm1d: l2bn.L2BatchNorm1d,
    nn.BatchNorm2d: l2bn.L2BatchNorm2d,
    nn.BatchNorm3d: l2bn.L2BatchNorm3d,
}
INFOS = [m for m in _load_module_db() if m.module_cls in L2_OF]
assert len(INFOS) == 3, [m.name for m in INFOS]


def _cases(dtype=torch.float64, requires_grad=False, training=True, keep=None):
    """PyTorch's module inputs; ``keep(x)`` selects the cases a check applies to (chosen at
    collection, so no test is skipped at run time)."""
    out = []
    for info in INFOS:
        for mi in info.module_inputs_func(
            info, device="cpu", dtype=dtype, requires_grad=requires_grad, training=training
        ):
            if keep is not None and not keep(mi.forward_input.args[0]):
                continue
            out.append(pytest.param(info, mi, id=f"{info.name}-{mi.desc or 'default'}"))
    return out


def _build(info, mi, dtype=torch.float64, device="cpu"):
    """The L2 layer and a BN with the same constructor arguments and (randomised) state."""
    args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    l2 = L2_OF[info.module_cls](*args, **kwargs, device=device, dtype=dtype)
    bn = info.module_cls(*args, **kwargs, device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in (l2.weight, l2.bias, l2.running_mean):
            if t is not None:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=dtype) * 0.5 + 1)
        if l2.running_var is not None:
            l2.running_var.copy_(torch.rand(l2.running_var.shape, generator=gen, dtype=dtype) + 0.5)
    bn.load_state_dict(l2.state_dict())
    return l2, bn


def _input(mi):
    return mi.forward_input.args[0].detach()


@pytest.mark.parametrize("info,mi", _cases())
@pytest.mark.parametrize("training", [True, False])
def test_forward_matches_composite(info, mi, training):
    """Outputs, running statistics and num_batches_tracked over several steps, BN(F.normalize)."""
    l2, bn = _build(info, mi)
    x0 = _input(mi)
    l2.train(training)
    bn.train(training)
    assert info.train_and_eval_differ
    for step in range(3):
        x = x0 * (1 + step)
        torch.testing.assert_close(l2(x), composite(bn, x), rtol=1e-9, atol=1e-9)
        for key, val in bn.state_dict().items():
            torch.testing.assert_close(l2.state_dict()[key], val, rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.parametrize("info", INFOS, ids=[i.name for i in INFOS])
@pytest.mark.parametrize("training", [True, False])
def test_errors_like_batchnorm(info, training):
    """PyTorch's error inputs for BN raise the same error type and message pattern for L2BN
    (eps <= 0: "eps must be positive" in training; in evaluation BN refuses only eps < 0)."""
    for err in info.module_error_inputs_func(
        info, device="cpu", dtype=torch.float32, requires_grad=False, training=training
    ):
        mi = err.module_error_input
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        x = _input(mi)
        for cls in (info.module_cls, L2_OF[info.module_cls]):
            m = cls(*args, **kwargs).train(training)
            if training:
                with pytest.raises(err.error_type, match=err.error_regex):
                    m(x)
            elif kwargs.get("eps", 1e-5) < 0:
                with pytest.raises(ValueError, match="eps must be non-negative"):
                    m(x)
            else:
                assert m(x).shape == x.shape


@pytest.mark.parametrize("info,mi", _cases(requires_grad=True))
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_gradgradcheck(info, mi, training):
    l2, _ = _build(info, mi)
    l2.train(training)
    names = [n for n, _ in l2.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in l2.parameters()]

    def f(x, *ps):
        return torch.func.functional_call(l2, dict(zip(names, ps)), (x,))

    inputs = (_input(mi).requires_grad_(), *params)
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("info,mi", _cases(dtype=torch.float32))
def test_pickle_and_save_load(info, mi, tmp_path):
    l2, _ = _build(info, mi, dtype=torch.float32)
    x = _input(mi)
    l2.train()
    l2(x)
    l2.eval()
    expected = l2(x)
    copies = [pickle.loads(pickle.dumps(l2)), copy.deepcopy(l2)]
    buf = io.BytesIO()
    torch.save(l2, buf)
    buf.seek(0)
    copies.append(torch.load(buf, weights_only=False))
    fresh = type(l2)(*mi.constructor_input.args, **mi.constructor_input.kwargs)
    fresh.load_state_dict(torch.load(_save_state(l2, tmp_path), weights_only=True))
    copies.append(fresh.eval())
    for c in copies:
        assert type(c) is type(l2) and repr(c) == repr(l2)
        torch.testing.assert_close(c(x), expected)
        for key, val in l2.state_dict().items():
            assert torch.equal(c.state_dict()[key], val), key


def _save_state(module, tmp_path):
    path = tmp_path / "state.pt"
    torch.save(module.state_dict(), path)
    return path


@pytest.mark.parametrize("info,mi", _cases(dtype=torch.float32))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_factory_kwargs(info, mi, dtype):
    """device= and dtype= reach every parameter and floating buffer (num_batches_tracked stays
    long), as for BN; meta-device construction allocates nothing."""
    args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    for device in ("cpu", "meta"):
        l2 = L2_OF[info.module_cls](*args, **kwargs, device=device, dtype=dtype)
        bn = info.module_cls(*args, **kwargs, device=device, dtype=dtype)
        ours = {k: (v.dtype, v.device.type) for k, v in l2.state_dict().items()}
        theirs = {k: (v.dtype, v.device.type) for k, v in bn.state_dict().items()}
        assert ours == theirs
        for p in l2.parameters():
            assert p.dtype == dtype and p.device.type == device and p.requires_grad


@pytest.mark.parametrize("info,mi", _cases(keep=lambda x: x.dim() in (4, 5) and x.shape[0] > 0))
@pytest.mark.parametrize("training", [True, False])
def test_memory_formats(info, mi, training):
    """channels_last (4D) / channels_last_3d (5D) in: same format out, same values and input
    gradient as with a contiguous input; other ranks keep their (contiguous) layout."""
    x = _input(mi)
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[x.dim()]
    results = []
    for xin in (x.contiguous(), x.contiguous(memory_format=fmt)):
        l2, _ = _build(info, mi)
        l2.train(training)
        xi = xin.clone(memory_format=torch.preserve_format).requires_grad_()
        y = l2(xi)
        assert y.is_contiguous(
            memory_format=torch.contiguous_format if xin.is_contiguous() else fmt
        )
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape))
        results.append((y, xi.grad, l2.state_dict()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("info,mi", _cases(keep=lambda x: x.shape[0] > 0))
@pytest.mark.parametrize("training", [True, False])
def test_non_contiguous_input(info, mi, training):
    """A strided view (every other sample and entry) and a transposed layout give the same
    outputs and gradients as contiguous copies."""
    x = _input(mi)
    big = torch.stack([x, x * 3], dim=-1)  # (..., 2): taking [..., 0] is non-contiguous
    views = [big[..., 0]]
    if x.dim() >= 3:
        views.append(x.transpose(1, -1).contiguous().transpose(1, -1))
    for view in views:
        assert not view.is_contiguous()
        outs = []
        for xin in (view, view.contiguous()):
            l2, _ = _build(info, mi)
            l2.train(training)
            xi = xin.detach().clone(memory_format=torch.preserve_format).requires_grad_()
            y = l2(xi)
            g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
            y.backward(g)
            outs.append((y, xi.grad))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("info,mi", _cases(dtype=torch.float32))
def test_to_and_to_empty(info, mi):
    """.to(dtype) converts parameters and buffers as for BN (outputs follow); a meta-device
    layer materialised with to_empty + reset_parameters is a freshly initialised layer."""
    l2, bn = _build(info, mi, dtype=torch.float32)
    x = _input(mi)
    for m in (l2, bn):
        m.to(torch.float64)
    assert {k: v.dtype for k, v in l2.state_dict().items()} == {
        k: v.dtype for k, v in bn.state_dict().items()
    }
    l2.train()
    assert l2(x.double()).dtype == torch.float64
    args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    meta = L2_OF[info.module_cls](*args, **kwargs, device="meta")
    bn_meta = info.module_cls(*args, **kwargs, device="meta")
    try:
        bn_meta(x.to("meta"))
    except RuntimeError:  # momentum=None: BN reads the meta counter with float(), and so do we
        with pytest.raises(RuntimeError, match="meta"):
            meta(x.to("meta"))
    else:
        y_meta = meta(x.to("meta"))
        assert y_meta.device.type == "meta" and y_meta.shape == x.shape
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    fresh = L2_OF[info.module_cls](*args, **kwargs)
    for key, val in fresh.state_dict().items():
        assert torch.equal(meta.state_dict()[key], val), key
    torch.testing.assert_close(meta(x), fresh(x))
