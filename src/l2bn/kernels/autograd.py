r"""The autograd Function of the fast backends (``fused``, ``compiled``) and its entry points.

The computation itself is :mod:`l2bn.kernels.engine` (bulk passes and engines) on top of
:mod:`l2bn.kernels.algebra` (the ``(N, C)`` math). This module decides, per call, what runs:

* :class:`L2BatchNormFunction`: the engine's training or evaluation forward; a first-order
  backward through the engine's fused backward; **double backward** (any backward run with
  ``create_graph=True``) recomputes the reference composite
  :func:`l2bn.kernels.reference.l2_batch_norm_reference` from the saved input and
  differentiates it with a graph, so higher derivatives are exact, never detached.
  :class:`L2BatchNormFunctionFwAD` adds **forward-mode AD** (``jvp``, from
  :func:`l2bn.kernels.algebra.tangent_coeffs` and the same bulk passes).
* **Scale safety** (:mod:`l2bn.kernels.scaling`): on CPU the per-sample norms are checked
  after the (cheap) statistics pass, and a batch with a norm out of the safe range is
  recomputed from :math:`\sigma_n x_n` with a per-sample power of two :math:`\sigma_n` (exact
  scaling), forward and backward.
* With a ``process_group`` the per-channel statistics are combined across processes in the
  forward (all-gather of count, mean and M2) and the two per-channel gradient sums are
  all-reduced in the backward, as ``nn.SyncBatchNorm`` does (gloo on CPU, NCCL on CUDA).

Why one file: forward, backward, double backward and ``jvp`` share one saved-tensor layout and
the scale decision taken in the forward; the entry points at the end are their only callers.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Tuple

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor

from . import algebra
from .algebra import SampleNorms
from .args import NormArgs
from .engine import (
    ATEN,
    ATEN_KERNELS,
    Engine,
    _ncm,
    _numel,
    backward_core,
    eval_forward,
    finish_train,
    local_stats,
    train_forward,
)
from .reference import accumulate_dtype, l2_batch_norm_reference
from .scaling import needs_rescale, pow2_scale

__all__ = [
    "ATEN",
    "L2BatchNormFunction",
    "L2BatchNormFunctionFwAD",
    "l2_batch_norm_fast",
    "fused_l2_batch_norm",
    "in_functorch_transform",
]


# ------------------------------------------------------------------------- transforms

_maybe_current_level = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", None)


def in_functorch_transform() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jvp, ...) is active (also the ``vmap``
    behind ``torch.autograd.grad(..., is_grads_batched=True)``); never true while
    ``torch.compile`` traces.

    Example:
        >>> in_functorch_transform()
        False
        >>> bool(torch.func.vmap(lambda t: t * in_functorch_transform())(torch.ones(2)).all())
        True
    """
    if _maybe_current_level is None or torch.compiler.is_compiling():
        return False
    return _maybe_current_level() is not None


# --------------------------------------------------------------------------- autograd


class Saved(NamedTuple):
    """What :class:`L2BatchNormFunction` saves for backward (``ctx.save_for_backward(*saved)``,
    read back as ``Saved(*ctx.saved_tensors)``): the input and weight, the per-sample norms ``r``
    and scales ``k``, the row statistics ``mk``/``vk`` of ``u`` (``None`` where recomputed), the
    statistics used (``mu``, ``invstd``; ``var`` in evaluation, for double backward), the count
    combined across a process group (``None`` when it follows from the shape), and the
    per-sample power of two ``sigma`` of a rescaled batch (``None`` if none)."""

    x: Tensor
    weight: Optional[Tensor]
    k: Tensor
    r: Tensor
    mk: Optional[Tensor]
    vk: Optional[Tensor]
    mu: Tensor
    invstd: Tensor
    count: Optional[Tensor]
    var: Optional[Tensor]
    sigma: Optional[Tensor]

    @property
    def norm_stats(self) -> Tuple[Any, ...]:
        """``(k, r, mk, vk, mu, invstd)``, in the order the engines' backward takes them."""
        return self.k, self.r, self.mk, self.vk, self.mu, self.invstd


def _combine_across(
    count: int, mean: Tensor, m2: Tensor, process_group: Any
) -> Tuple[Tensor, Tensor, Tensor]:
    """All-gather per-rank (count, mean, M2) of each channel and combine them (Chan et al.)."""
    import torch.distributed as dist

    world = dist.get_world_size(process_group)
    local = torch.stack([torch.full_like(mean, float(count)), mean, m2])
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=process_group)
    allst = torch.stack(gathered)  # (W, 3, C)
    total, gmean, gm2 = algebra.combine_moments(allst[:, 0], allst[:, 1], allst[:, 2])
    return total[0], gmean, gm2


def _all_reducer(process_group: Any) -> Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]:
    def reduce(g_c: Tensor, su_c: Tensor) -> Tuple[Tensor, Tensor]:
        import torch.distributed as dist

        both = torch.stack([g_c, su_c])
        dist.all_reduce(both, group=process_group)
        return both[0], both[1]

    return reduce


def _forward_ad_active() -> bool:
    return _fwad._current_level >= 0 and not torch.compiler.is_compiling()


def _apply(*args: Any) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    x, weight, bias = args[0], args[1], args[2]
    if _forward_ad_active():
        out = L2BatchNormFunctionFwAD.apply(*args)
    elif torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        out = L2BatchNormFunction.apply(*args)
    else:  # nothing to differentiate (inference, torch.no_grad): skip the autograd.Function
        out = _forward_core(*args)[:4]
    if x.dim() == 2:
        # the Function works on (N, C, 1); the (N, C) view is taken here, outside it: a view made
        # inside a custom Function could not be modified in place (nn.ReLU(inplace=True) after
        # the norm of an MLP would raise), one made outside can
        return (out[0].squeeze(-1), *out[1:])
    return out


def _static_count(count: Any, acc: torch.dtype, device: torch.device) -> Any:
    """The element count per channel of an unsynchronised batch: a Python float in eager mode (no
    tensor per call); a tensor while ``torch.compile`` traces, where the count may be symbolic
    and a Function cannot return a symbolic number."""
    if torch.compiler.is_compiling():
        return torch.tensor(float(count), dtype=acc, device=device)
    return float(count)


def _forward_core(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    stat_mean: Optional[Tensor],
    stat_var: Optional[Tensor],
    eps: float,
    l2_eps: float,
    unit_rms: bool,
    process_group: Any,
    engine: Engine,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, tuple]:
    """The forward of :class:`L2BatchNormFunction` without autograd: ``(y, mean, var, count,
    saved)``, ``saved`` being what the backward needs. ``count`` (entries per channel) is a
    Python float, or a tensor when it was combined across a process group."""
    acc = accumulate_dtype(x.dtype)
    xs = _ncm(x)
    n, c = xs.shape[0], xs.shape[1]
    m_sp = _numel(xs.shape[2:])
    s = algebra.unit_scale(c * m_sp, unit_rms)
    w = weight.to(acc) if weight is not None else None
    b = bias.to(acc) if bias is not None else None
    batch_stats = stat_mean is None
    # empty inputs never reach a compiled graph (sizes 0 would specialise it)
    eng = engine if xs.numel() > 0 else ATEN
    sigma: Optional[Tensor] = None
    mk = vk = var_saved = None
    if batch_stats and process_group is None:
        y, r, k, mk, vk, mu, var, invstd = eng.train(xs, w, b, eps, l2_eps, s)
        if needs_rescale(r, acc, c * m_sp, l2_eps):
            sigma = pow2_scale(xs, acc, l2_eps)
            y, r, k, mk, vk, mu, var, invstd = train_forward(
                xs, w, b, eps, l2_eps, s, ATEN_KERNELS, sigma
            )
        count: Any = _static_count(n * m_sp, acc, x.device)
    elif batch_stats:
        norms = local_stats(xs, acc, s, l2_eps, eng.kernels.row_stats)
        if needs_rescale(norms.r, acc, c * m_sp, l2_eps):  # before any collective
            sigma = pow2_scale(xs, acc, l2_eps)
            norms = local_stats(xs, acc, s, l2_eps, ATEN_KERNELS.row_stats, sigma)
        r, k, mk, vk = norms
        mu, m2 = algebra.batch_moments(mk, vk, m_sp)
        count, mu, m2 = _combine_across(n * m_sp, mu, m2, process_group)
        y, var, invstd = finish_train(
            xs, norms, w, b, eps, mu, m2, count, eng.kernels.affine_apply, sigma
        )
    else:
        assert stat_var is not None
        y, r, k, mu, var, invstd = eng.evaluate(xs, w, b, stat_mean, stat_var, eps, l2_eps, s)
        if needs_rescale(r, acc, c * m_sp, l2_eps):
            sigma = pow2_scale(xs, acc, l2_eps)
            y, r, k, mu, var, invstd = eval_forward(
                xs, w, b, stat_mean, stat_var, eps, l2_eps, s, ATEN_KERNELS, sigma
            )
        count = _static_count(n * m_sp, acc, x.device)
        var_saved = var
    # With one entry per (n, c) (an MLP's (N, C) input) the row statistics of u are k x and
    # 0: recompute them in backward rather than save two more tensors of x's size.
    keep = batch_stats and m_sp != 1
    synced = (
        count if isinstance(count, Tensor) else None
    )  # the static count is recomputed from x's shape
    saved = Saved(
        x,
        weight,
        k,
        r,
        mk if keep else None,
        vk if keep else None,
        mu,
        invstd,
        synced,
        var_saved,
        sigma,
    )
    return y, mu, var, count, saved


class L2BatchNormFunction(torch.autograd.Function):
    """L2BN forward and backward for the fast backends; use :func:`l2_batch_norm_fast`.

    Returns ``(y, mean, biased_var, count)`` of the statistics used (the last three are not
    differentiable). First-order backward runs the engine's fused backward; a backward with
    ``create_graph=True`` differentiates the reference composite instead (exact higher-order
    derivatives; see :func:`_higher_order_backward`). Forward-mode AD:
    :class:`L2BatchNormFunctionFwAD`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        stat_mean: Optional[Tensor],
        stat_var: Optional[Tensor],
        eps: float,
        l2_eps: float,
        unit_rms: bool,
        process_group: Any,
        engine: Engine,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        y, mu, var, count, saved = _forward_core(
            x, weight, bias, stat_mean, stat_var, eps, l2_eps, unit_rms, process_group, engine
        )
        batch_stats = stat_mean is None
        acc = accumulate_dtype(x.dtype)
        ctx.save_for_backward(*saved)
        if _forward_ad_active():
            ctx.save_for_forward(*saved)
        ctx.batch_stats = batch_stats
        ctx.eps, ctx.l2_eps, ctx.unit_rms = eps, l2_eps, unit_rms
        ctx.process_group = process_group if batch_stats else None
        ctx.engine = engine
        ctx.param_dtypes = (
            weight.dtype if weight is not None else acc,
            bias.dtype if bias is not None else acc,
        )
        ctx.mark_non_differentiable(mu, var, *([count] if isinstance(count, Tensor) else []))
        return y, mu, var, count

    @staticmethod
    def backward(ctx: Any, gy: Tensor, _gmu: Any, _gvar: Any, _gcount: Any):  # type: ignore[override]
        if torch.is_grad_enabled():
            return _higher_order_backward(ctx, gy)
        saved = Saved(*ctx.saved_tensors)
        x, weight, sigma = saved.x, saved.weight, saved.sigma
        need_dx, need_w, need_b = ctx.needs_input_grad[:3]
        acc = saved.invstd.dtype
        xs, gs = _ncm(x), _ncm(gy)
        w = weight.to(acc) if weight is not None else None
        pg = ctx.process_group
        if pg is None and sigma is None and xs.numel() > 0:
            dx, gw, gb = ctx.engine.backward(
                gs,
                xs,
                w,
                *saved.norm_stats,
                ctx.l2_eps,
                ctx.unit_rms,
                ctx.batch_stats,
                need_dx,
            )
        else:
            kern = ctx.engine.kernels if sigma is None and xs.numel() > 0 else ATEN_KERNELS
            dx, gw, gb = backward_core(
                gs,
                xs,
                w,
                *saved.norm_stats,
                ctx.l2_eps,
                ctx.unit_rms,
                ctx.batch_stats,
                need_dx,
                kern,
                count=saved.count if pg is not None else None,
                all_reduce=_all_reducer(pg) if pg is not None else None,
                sigma=sigma,
            )
        if dx is not None and x.dim() == 2:
            dx = dx.squeeze(-1)
        grad_w = gw.to(ctx.param_dtypes[0]) if weight is not None and need_w else None
        grad_b = gb.to(ctx.param_dtypes[1]) if need_b else None
        return dx, grad_w, grad_b, None, None, None, None, None, None, None


class L2BatchNormFunctionFwAD(L2BatchNormFunction):
    """:class:`L2BatchNormFunction` with forward-mode AD (``jvp``), used inside a
    ``torch.autograd.forward_ad.dual_level``. A separate class because ``torch.compile`` cannot
    trace a Function that defines ``jvp``."""

    @staticmethod
    def jvp(
        ctx: Any,
        dx: Optional[Tensor],
        dw: Optional[Tensor],
        db: Optional[Tensor],  # type: ignore[override]
        *_: Any,
    ):
        """Tangent of ``y``; running statistics are not differentiable inputs (as in BN)."""
        if ctx.process_group is not None:
            raise NotImplementedError(
                "l2_batch_norm: forward-mode AD through synchronised batch statistics "
                "(process_group) is not supported"
            )
        saved = Saved(*ctx.saved_tensors)
        x, weight, k, r, mk, vk, mu, invstd = saved.x, saved.weight, *saved.norm_stats
        acc = invstd.dtype
        xs = _ncm(x)
        n, c = xs.shape[0], xs.shape[1]
        m_sp = _numel(xs.shape[2:])
        count = float(n * m_sp)
        if mk is None:
            mk = xs.reshape(n, c).to(acc) * k[:, None] if m_sp == 1 else k.new_zeros(n, c)
            vk = torch.zeros_like(mk)
        d_nc = xd_nc = None
        dxs = torch.zeros_like(xs) if dx is None else _ncm(dx)
        if dx is not None:
            d_nc, xd_nc = ATEN_KERNELS.grad_sums(dxs, xs, tuple(range(2, xs.dim())), acc)
        w = weight.to(acc) if weight is not None else None
        # parameter tangents in the accumulation dtype too (a float64 weight's zero tangent would
        # otherwise promote the float32 coefficients, which the forward never does)
        dw = dw.to(acc) if dw is not None else None
        db = db.to(acc) if db is not None else None
        p, q, rr = algebra.tangent_coeffs(
            d_nc,
            xd_nc,
            SampleNorms(r, k, mk, vk),
            mu,
            invstd,
            w,
            dw,
            db,
            count,
            m_sp,
            r > ctx.l2_eps,
            ctx.batch_stats,
        )
        dy = ATEN_KERNELS.grad_apply(dxs, xs, p, q, rr, x.dtype)
        return (
            dy.reshape(xs.shape),
            None,
            None,
            None,
        )  # the Function's output is (N, C, 1) for (N, C)


def _higher_order_backward(ctx: Any, gy: Tensor) -> Tuple[Optional[Tensor], ...]:
    """Backward with ``create_graph=True``: differentiate the reference composite, recomputed
    from the saved input, with a graph — exact second (and higher) derivatives.

    Batch statistics are recomputed from ``x``; evaluation uses the saved running statistics.
    Synchronised batch statistics would need differentiable collectives: refused, not detached.
    """
    if ctx.process_group is not None:
        raise NotImplementedError(
            "l2_batch_norm: double backward (create_graph=True) through synchronised batch "
            "statistics (process_group) is not supported"
        )
    saved = Saved(*ctx.saved_tensors)
    x, weight, mu, var = saved.x, saved.weight, saved.mu, saved.var
    need_dx, need_w, need_b = ctx.needs_input_grad[:3]
    acc = accumulate_dtype(x.dtype)
    targets = [t for t, need in ((x, need_dx), (weight, need_w)) if need and t is not None]
    grads: list = []
    if targets:
        with torch.enable_grad():
            w = weight.to(acc) if weight is not None else None
            y = l2_batch_norm_reference(
                x,
                None if ctx.batch_stats else mu,
                None if ctx.batch_stats else var,
                w,
                None,
                ctx.batch_stats,
                0.0,
                ctx.eps,
                l2_eps=ctx.l2_eps,
                unit_rms=ctx.unit_rms,
            )
        grads = list(
            torch.autograd.grad(y, targets, gy.reshape(y.shape), create_graph=True)
        )  # gy: (N, C, 1) for (N, C)
    dx = grads.pop(0) if need_dx else None
    dw = grads.pop(0).to(ctx.param_dtypes[0]) if need_w and weight is not None else None
    db = None
    if need_b:
        db = gy.sum([d for d in range(gy.dim()) if d != 1], dtype=acc).to(ctx.param_dtypes[1])
    return dx, dw, db, None, None, None, None, None, None, None


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: Tensor,
    momentum: float,
    static_count: Optional[int],
) -> None:
    r"""BN's update: :math:`\hat x \leftarrow (1 - m) \hat x + m x_t` with the unbiased variance.

    An empty batch (``count`` 0) leaves the statistics unchanged, as BN does. ``static_count``
    is the count when it is known without looking at ``count`` (no process group).
    """
    with torch.no_grad():
        if static_count is not None:
            if static_count == 0:
                return
            # in place, no temporaries: (1 - m) * running + m * batch
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(
                var, alpha=momentum * static_count / max(static_count - 1, 1)
            )
            return
        unbiased = var * (count / (count - 1).clamp_min(1))
        keep = count == 0
        running_mean.copy_(
            torch.where(keep, running_mean, running_mean * (1 - momentum) + mean * momentum)
        )
        running_var.copy_(
            torch.where(keep, running_var, running_var * (1 - momentum) + unbiased * momentum)
        )


def l2_batch_norm_fast(input: Tensor, args: NormArgs, *, engine: Engine = ATEN) -> Tensor:
    """The backend entry point of the fast backends (signature shared by every backend in
    :mod:`l2bn.kernels.backends`): :class:`L2BatchNormFunction` plus BN's running-statistics
    update.

    Example:
        >>> x = torch.randn(8, 4, 5, 5)
        >>> rm, rv = torch.zeros(4), torch.ones(4)
        >>> y = l2_batch_norm_fast(x, NormArgs(rm, rv, None, None, training=True))
        >>> ref = l2_batch_norm_reference(x, None, None, training=True)
        >>> torch.allclose(y, ref, atol=1e-5)
        True
    """
    a = args
    rm, rv = a.running_mean, a.running_var
    if not a.training:
        return _apply(input, a.weight, a.bias, rm, rv, a.eps, a.l2_eps, a.unit_rms, None, engine)[0]
    pg = a.process_group
    y, mean, var, count = _apply(
        input, a.weight, a.bias, None, None, a.eps, a.l2_eps, a.unit_rms, pg, engine
    )
    if rm is not None and rv is not None:
        static = None if pg is not None else input.shape[0] * _numel(input.shape[2:])
        update_running_stats(rm, rv, mean, var, count, a.momentum, static)
    return y


def fused_l2_batch_norm(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    stat_mean: Optional[Tensor],
    stat_var: Optional[Tensor],
    eps: float,
    l2_eps: float,
    unit_rms: bool,
    process_group: Any = None,
    engine: Engine = ATEN,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the fused L2BN; returns ``(y, mean, biased_var, count)`` of the statistics used.

    ``stat_mean``/``stat_var`` ``None`` means batch statistics (training); otherwise they are the
    running statistics used in evaluation.

    Example:
        >>> y, mean, var, count = fused_l2_batch_norm(torch.randn(6, 3, 4), None, None, None, None,
        ...                                           1e-5, 1e-12, False)
        >>> y.shape, mean.shape, float(count)
        (torch.Size([6, 3, 4]), torch.Size([3]), 24.0)
    """
    y, mean, var, count = _apply(
        input, weight, bias, stat_mean, stat_var, eps, l2_eps, unit_rms, process_group, engine
    )
    if not isinstance(count, Tensor):
        count = torch.tensor(count, dtype=mean.dtype, device=mean.device)
    return y, mean, var, count
