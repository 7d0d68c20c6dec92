"""Drop-in means drop-in: every autograd mode and torch.func transform BN supports, per backend.

Each check compares against the paper's composite ``BN(F.normalize(x.flatten(1)).view_as(x))``
in float64: double backward (gradgradcheck, a WGAN-GP gradient-penalty step), forward-mode AD,
``torch.func`` grad / vmap (a model ensemble, train and eval) / jvp / jacrev / hessian.
"""

import copy
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from conftest import bn_step, composite
from l2bn_checks import composite_fn
from torch import nn

import l2bn
from l2bn.functional import l2_batch_norm

BACKENDS = ["fused", "compiled", "native", "reference"]
LAYERS = {
    "1d": (l2bn.L2BatchNorm1d, nn.BatchNorm1d, (5, 3)),
    "1d-seq": (l2bn.L2BatchNorm1d, nn.BatchNorm1d, (3, 2, 4)),
    "2d": (l2bn.L2BatchNorm2d, nn.BatchNorm2d, (3, 2, 3, 2)),
    "3d": (l2bn.L2BatchNorm3d, nn.BatchNorm3d, (2, 2, 2, 2, 2)),
}
MODES = ["train", "eval", "eval-untracked"]  # eval without running stats uses batch statistics


def _layer(kind, affine=True, unit_rms=False, mode="train", seed=0):
    cls, bncls, shape = LAYERS[kind]
    c = shape[1]
    gen = torch.Generator().manual_seed(seed)
    kw = dict(affine=affine, track_running_stats="untracked" not in mode, dtype=torch.float64)
    layer, bn = cls(c, unit_rms=unit_rms, **kw), bncls(c, **kw)
    with torch.no_grad():
        if affine:
            layer.weight.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
            layer.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        if layer.running_mean is not None:
            layer.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 0.1)
            layer.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
    bn.load_state_dict(layer.state_dict())
    layer.train(mode.startswith("train"))
    bn.train(mode.startswith("train"))
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    return layer, bn, x


def _as_function(layer):
    """``f(x, *params)`` calling the layer with the given parameters (torch.func.functional_call
    is not a transform: the layer's own backend runs)."""
    names = [n for n, _ in layer.named_parameters()]

    def f(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    return f, [p.detach().clone().requires_grad_() for p in layer.parameters()]


# ------------------------------------------------------------------- double backward


def _gradgrad_cases():
    cases = []
    for backend in BACKENDS:
        for kind in LAYERS:
            for mode in MODES:
                for affine in (True, False):
                    for unit_rms in (False, True):
                        # the compiled backend compiles a graph per layout: a subset keeps it fast
                        if backend == "compiled" and (
                            not affine or unit_rms or mode == "eval-untracked"
                        ):
                            continue
                        cases.append((backend, kind, mode, affine, unit_rms))
    return cases


@pytest.mark.parametrize("backend,kind,mode,affine,unit_rms", _gradgrad_cases())
def test_gradcheck_and_gradgradcheck(backend, kind, mode, affine, unit_rms, monkeypatch):
    """Second derivatives were silently wrong (the backward was once_differentiable). The full
    Jacobians are checked for the fused backend with affine parameters; the other cases use
    gradcheck's fast mode (random projections u^T J v, which a wrong derivative fails too)."""
    monkeypatch.setenv("L2BN_BACKEND", backend)
    layer, _, x = _layer(kind, affine, unit_rms, mode)
    f, params = _as_function(layer)
    inputs = (x.requires_grad_(), *params)
    fast = not (backend == "fused" and affine and not unit_rms)
    assert torch.autograd.gradcheck(f, inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("mode", MODES)
def test_gradient_penalty_step_matches_composite(backend, kind, mode, monkeypatch):
    """A WGAN-GP style step: loss = mean(y^2) + |d<v, y>/dx|^2, backpropagated to the input and
    the affine parameters, equals the composite's."""
    monkeypatch.setenv("L2BN_BACKEND", backend)
    layer, bn, x0 = _layer(kind, mode=mode, seed=1)
    v = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn, mod in ((layer, layer), (lambda t: composite(bn, t), bn)):
        x = x0.clone().requires_grad_()
        y = fn(x)
        (gx,) = torch.autograd.grad((v * y).sum(), x, create_graph=True)
        loss = y.pow(2).mean() + gx.pow(2).sum()
        loss.backward()
        grads.append((x.grad, mod.weight.grad, mod.bias.grad))
    for name, a, r in zip(("input", "weight", "bias"), *grads):
        torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("backend", ["fused", "compiled", "native"])
def test_double_backward_through_sync_is_refused(backend, monkeypatch):
    """Synchronised batch statistics have no differentiable collective here: create_graph=True
    raises instead of returning a detached gradient."""
    import torch.distributed as dist

    from l2bn.kernels import autograd
    from l2bn.kernels.args import NormArgs

    def fake_gather(out, local, group=None):
        for t in out:
            t.copy_(local)

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(dist, "all_gather", fake_gather)
    engine = autograd.ATEN if backend == "fused" else l2bn.kernels.compiled.ENGINE
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    args = NormArgs(None, None, None, None, training=True, process_group=object())
    y = autograd.l2_batch_norm_fast(x, args, engine=engine)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad((y * y).sum(), x, create_graph=True)


# ----------------------------------------------------------------------- forward mode


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("mode", MODES)
def test_forward_ad_matches_composite(backend, kind, mode):
    """torch.autograd.forward_ad dual tensors (the Function's jvp), input and parameter
    tangents together."""
    layer, bn, x = _layer(kind, mode=mode)
    gen = torch.Generator().manual_seed(5)
    tx = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    tw, tb = (torch.randn(x.shape[1], generator=gen, dtype=torch.float64) for _ in range(2))
    rm = layer.running_mean
    track = rm is not None and mode == "eval"

    def ours(x, w, b):
        return l2_batch_norm(
            x,
            rm.clone() if track else None,
            layer.running_var.clone() if track else None,
            w,
            b,
            mode != "eval",
            backend=backend,
        )

    def comp(x, w, b):
        return composite_fn(
            x,
            rm.clone() if track else None,
            layer.running_var.clone() if track else None,
            w,
            b,
            mode != "eval",
        )

    w, b = layer.weight.detach(), layer.bias.detach()
    with fwad.dual_level():
        y = ours(fwad.make_dual(x, tx), fwad.make_dual(w, tw), fwad.make_dual(b, tb))
        dy = fwad.unpack_dual(y).tangent
    _, dy_ref = torch.func.jvp(comp, (x, w, b), (tx, tw, tb))
    torch.testing.assert_close(dy, dy_ref, rtol=1e-9, atol=1e-10)


# ------------------------------------------------------------------------- torch.func


def _same_as_bn(run_ours, run_ref):
    """Both raise the same kind of error (as BN does), or both return equal results."""
    try:
        ref = run_ref()
    except Exception as e:  # BN's own behaviour under this transform
        with pytest.raises(type(e)):
            run_ours()
        return None
    out = run_ours()
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("mode", ["train-untracked"] + MODES)
def test_func_grad_jvp_jacrev(backend, kind, mode, monkeypatch):
    """torch.func.grad (input and parameters), jvp, jacrev and hessian through the layer raised
    "must override the setup_context staticmethod"; now each equals the composite's. A training
    layer that tracks running statistics is refused by these transforms for BN itself (the
    module's in-place counter/statistics update on captured buffers), and likewise for L2BN."""
    monkeypatch.setenv("L2BN_BACKEND", backend)
    layer, bn, x = _layer(kind, mode=mode)
    v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    params = {n: p.detach() for n, p in layer.named_parameters()}

    def ours(x, p):
        return torch.func.functional_call(layer, p, (x,))

    def ref(x, p):
        return torch.func.functional_call(bn, p, (F.normalize(x.flatten(1), dim=1).view_as(x),))

    def loss(fn):
        return lambda x, p: (fn(x, p) * v).pow(2).sum()

    results = [
        _same_as_bn(
            lambda: torch.func.grad(loss(ours), argnums=(0, 1))(x, params),
            lambda: torch.func.grad(loss(ref), argnums=(0, 1))(x, params),
        ),
        _same_as_bn(
            lambda: torch.func.jvp(lambda t: ours(t, params), (x,), (v,)),
            lambda: torch.func.jvp(lambda t: ref(t, params), (x,), (v,)),
        ),
        _same_as_bn(
            lambda: torch.func.jacrev(ours)(x, params), lambda: torch.func.jacrev(ref)(x, params)
        ),
        _same_as_bn(
            lambda: torch.func.hessian(lambda t: loss(ours)(t, params))(x),
            lambda: torch.func.hessian(lambda t: loss(ref)(t, params))(x),
        ),
    ]
    assert (
        all(r is None for r in results) if mode == "train" else all(r is not None for r in results)
    )


def _ensemble(kind, n_models=3, track=True):
    cls, bncls, shape = LAYERS[kind]
    c_in, c = 2, shape[1]
    conv = {"1d": None, "1d-seq": nn.Conv1d, "2d": nn.Conv2d, "3d": nn.Conv3d}[kind]
    models, refs = [], []
    for i in range(n_models):
        torch.manual_seed(10 + i)
        head = nn.Linear(c_in, c) if conv is None else conv(c_in, c, 1)
        l2 = cls(c, track_running_stats=track)
        bn = bncls(c, track_running_stats=track)
        with torch.no_grad():
            l2.weight.uniform_(0.5, 1.5)
            l2.bias.uniform_(-0.5, 0.5)
            if track:
                l2.running_mean.uniform_(-0.1, 0.1)
                l2.running_var.uniform_(0.5, 1.5)
        bn.load_state_dict(l2.state_dict())
        models.append(nn.Sequential(head, l2).double())
        refs.append(nn.Sequential(copy.deepcopy(head), _Composite(bn)).double())
    x = torch.randn((shape[0], c_in) + shape[2:], dtype=torch.float64)
    return models, refs, x


class _Composite(nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        return bn_step(self.bn, F.normalize(x.flatten(1), dim=1).view_as(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("training", [True, False])
def test_vmap_model_ensemble(backend, kind, training, monkeypatch):
    """The documented ensemble pattern (stack_module_state + functional_call + vmap): outputs
    and, in training, each model's running statistics equal the composite's, model by model."""
    monkeypatch.setenv("L2BN_BACKEND", backend)
    models, refs, x = _ensemble(kind)
    for m in models + refs:
        m.train(training)
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def fmodel(p, b, x):
        return torch.func.functional_call(base, (p, b), (x,))

    y = torch.func.vmap(fmodel, in_dims=(0, 0, None))(params, buffers, x)
    for i, ref in enumerate(refs):
        torch.testing.assert_close(y[i], ref(x), rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(buffers["1.running_mean"][i], ref[1].bn.running_mean)
        torch.testing.assert_close(buffers["1.running_var"][i], ref[1].bn.running_var)
        assert int(buffers["1.num_batches_tracked"][i]) == int(ref[1].bn.num_batches_tracked)
    # gradients of the ensemble through vmap(grad)
    g = torch.func.vmap(
        torch.func.grad(lambda p, b, x: fmodel(p, b, x).pow(2).sum()), in_dims=(0, 0, None)
    )(params, buffers, x)
    for i, ref in enumerate(refs):
        ref.zero_grad()
        ref(x).pow(2).sum().backward()
        torch.testing.assert_close(g["1.weight"][i], ref[1].bn.weight.grad, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(g["0.weight"][i], ref[0].weight.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_running_stats_like_batchnorm(backend, monkeypatch):
    """vmap over inputs with one set of unbatched running statistics: in training BN refuses
    (the in-place update would need a batched buffer) and so do we, with the same error type;
    in evaluation, or without running statistics, it works and equals the composite."""
    monkeypatch.setenv("L2BN_BACKEND", backend)
    layer, bn, _ = _layer("2d")
    xs = torch.randn(4, 3, 2, 3, 2, dtype=torch.float64)
    _same_as_bn(
        lambda: torch.func.vmap(layer)(xs), lambda: torch.func.vmap(lambda t: composite(bn, t))(xs)
    )
    for mode in ("eval", "eval-untracked", "train-untracked"):
        layer, bn, _ = _layer("2d", mode=mode)
        out = _same_as_bn(
            lambda layer=layer: torch.func.vmap(layer)(xs),
            lambda bn=bn: torch.func.vmap(lambda t: composite(bn, t))(xs),
        )
        assert out is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_batched_and_autograd_hessian(backend):
    """torch.autograd.grad(is_grads_batched=True) (a vmap over the backward) and
    torch.autograd.functional.hessian (double backward) equal the composite's."""
    layer, bn, x = _layer("2d")
    w, b = layer.weight.detach(), layer.bias.detach()

    def ours(t):
        return l2_batch_norm(t, None, None, w, b, True, backend=backend)

    def comp(t):
        return composite_fn(t, None, None, w, b, True)

    gs = torch.randn((4,) + x.shape, dtype=torch.float64)
    res = []
    for fn in (ours, comp):
        xi = x.clone().requires_grad_()
        with warnings.catch_warnings():  # batched gradients must not disable a compiled graph
            warnings.filterwarnings("error", message=".*using the eager kernels")
            res.append(torch.autograd.grad(fn(xi), xi, gs, is_grads_batched=True)[0])
    torch.testing.assert_close(res[0], res[1], rtol=1e-9, atol=1e-10)
    h = [
        torch.autograd.functional.hessian(lambda t, fn=fn: fn(t).pow(3).sum(), x)
        for fn in (ours, comp)
    ]
    torch.testing.assert_close(h[0], h[1], rtol=1e-9, atol=1e-9)


def test_torch_compile_double_backward_refused_like_batchnorm():
    """Under torch.compile, create_graph=True fails loudly for BN and for L2BN alike (AOT
    autograd has no double backward); first-order training works (see test_modules)."""
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    for norm in (nn.BatchNorm2d(4), l2bn.L2BatchNorm2d(4)):
        # static shapes: with automatic dynamic shapes (after other tests compiled other sizes)
        # AOT autograd may fail earlier, with another RuntimeError, for BN and L2BN alike
        model = torch.compile(nn.Sequential(nn.Conv2d(3, 4, 3), norm), dynamic=False)
        y = model(x)
        with pytest.raises(RuntimeError, match="double backward"):
            (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
            gx.pow(2).sum().backward()


@pytest.mark.parametrize("backend", ["fused", "compiled", "native"])
@pytest.mark.parametrize("training", [True, False])
def test_forward_ad_parameter_tangents_only_and_stats_not_differentiable(backend, training):
    """Tangents on the affine parameters alone (the input is not dual), and dual running
    statistics, which BN treats as non-differentiable inputs (zero tangent contribution)."""
    layer, bn, x = _layer("2d", mode="train" if training else "eval")
    w, b = layer.weight.detach(), layer.bias.detach()
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    tw, tb = torch.randn_like(w), torch.randn_like(b)
    with fwad.dual_level():
        y = l2_batch_norm(
            x,
            fwad.make_dual(rm, torch.ones_like(rm)),
            fwad.make_dual(rv, torch.ones_like(rv)),
            fwad.make_dual(w, tw),
            fwad.make_dual(b, tb),
            training,
            0.0,
            backend=backend,
        )
        dy = fwad.unpack_dual(y).tangent
    _, dy_ref = torch.func.jvp(
        lambda w, b: composite_fn(x, rm.clone(), rv.clone(), w, b, training, 0.0), (w, b), (tw, tb)
    )
    torch.testing.assert_close(dy, dy_ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_double_backward_with_non_default_options(backend, training):
    """create_graph=True honours eps, l2_eps (a sample below it) and unit_rms."""
    x0 = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    x0[0] *= 1e-4  # norm below l2_eps = 1e-2
    w = torch.rand(3, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64).requires_grad_()
    rm, rv = torch.randn(3, dtype=torch.float64) * 0.1, torch.rand(3, dtype=torch.float64) + 0.5
    v = torch.randn(x0.shape, dtype=torch.float64)
    kw = dict(eps=1e-1, l2_eps=1e-2, unit_rms=True)
    out = []
    for fn in (
        lambda t: l2_batch_norm(
            t, rm.clone(), rv.clone(), w, b, training, 0.1, backend=backend, **kw
        ),
        lambda t: composite_fn(t, rm.clone(), rv.clone(), w, b, training, 0.1, **kw),
    ):
        x = x0.clone().requires_grad_()
        # first derivatives with respect to everything, then a penalty on all of them
        gx, gw, gb = torch.autograd.grad((v * fn(x)).sum(), (x, w, b), create_graph=True)
        penalty = gx.pow(2).sum() + gw.pow(2).sum() * 3 + gb.pow(2).sum()
        out.append(torch.autograd.grad(penalty, (x, w, b), allow_unused=True) + (gw, gb))
    for a, r in zip(*out):
        if r is None:
            assert a is None or not a.abs().any()
        else:
            torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_parameters_only(backend):
    """create_graph=True when only the affine parameters require grad (a frozen input)."""
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64).requires_grad_()
    v = torch.randn(x.shape, dtype=torch.float64)
    out = []
    for fn in (
        lambda: l2_batch_norm(x, None, None, w, b, True, backend=backend),
        lambda: composite_fn(x, None, None, w, b, True),
    ):
        gw, gb = torch.autograd.grad((v * fn()).pow(2).sum(), (w, b), create_graph=True)
        out.append(torch.autograd.grad(gw.pow(2).sum() + gb.pow(2).sum(), (w, b)))
    for a, r in zip(*out):
        torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", ["fused", "native"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_matches_the_reference(backend, reentrant, monkeypatch):
    """torch.utils.checkpoint recomputes the forward in backward: gradients and running
    statistics (updated by both passes, as for BN) equal the reference backend's under the same
    checkpointing."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3), l2bn.L2BatchNorm2d(4), nn.ReLU(inplace=True)).double()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    g = torch.randn(5, 4, 6, 6, dtype=torch.float64)
    out = {}
    for be in ("reference", backend):
        monkeypatch.setenv("L2BN_BACKEND", be)
        m = copy.deepcopy(base)
        xx = x.clone().requires_grad_()
        checkpoint(m, xx, use_reentrant=reentrant).backward(g)
        out[be] = (
            xx.grad,
            m[0].weight.grad,
            m[1].weight.grad,
            m[1].running_var.clone(),
            int(m[1].num_batches_tracked),
        )
    for a, b in zip(out[backend], out["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(5, 4, 6, 6), (5, 4)])
def test_inference_mode(backend, shape, monkeypatch):
    """Under torch.inference_mode, evaluation and training (running statistics updated) equal
    the same calls without it."""
    monkeypatch.setenv("L2BN_BACKEND", backend)
    layer = (l2bn.L2BatchNorm2d if len(shape) == 4 else l2bn.L2BatchNorm1d)(4)
    x = torch.randn(shape)
    ref = copy.deepcopy(layer)
    with torch.inference_mode():
        y_eval = layer.eval()(x)
        y_train = layer.train()(x)
    with torch.no_grad():
        torch.testing.assert_close(y_eval, ref.eval()(x))
        torch.testing.assert_close(y_train, ref.train()(x))
    torch.testing.assert_close(layer.running_var, ref.running_var)
