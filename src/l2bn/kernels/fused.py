"""One-pass L2BN as an ``autograd.Function``: BN's memory traffic, BN's saved tensors.

The math (training mode, ``x`` of shape ``(N, C, *S)``, ``M = prod(S)``, see
``shared/DESIGN.md``):

* one reduction over ``x`` gives per-(n, c) mean ``m`` and biased variance ``v``;
* ``r_n^2 = M * sum_c (v + m^2)``, ``k_n = s / max(r_n, eps_2)`` with ``s = 1`` (paper) or
  ``sqrt(C*M)`` (unit RMS);
* the statistics of ``u = k x`` follow on ``(N, C)`` tensors: per-(n, c) means ``k m`` and
  variances ``k^2 v``, combined over ``n`` with Chan's parallel formula (no
  ``E[x^2] - E[x]^2`` cancellation);
* the output is one elementwise pass ``y = x * A[n, c] + B[c]``.

Backward needs per-(n, c) sums of ``g`` and ``g * x`` and then one elementwise pass
``dx = g * P[n, c] + x * Q[n, c] + R[n, c]``. Only ``x`` and ``O(N * C)`` statistics are saved
for backward — the naive composite also keeps the normalized copy of ``x``.

With a ``process_group`` the per-channel statistics are combined across processes in the
forward (all-gather of count, mean and M2) and the two per-channel gradient sums are
all-reduced in the backward, as ``nn.SyncBatchNorm`` does. This works with any backend
(gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .reference import accumulate_dtype

__all__ = ["FusedL2BatchNorm", "fused_l2_batch_norm"]


def _as_ncm(x: Tensor) -> Tuple[Tensor, Tuple[int, ...], int]:
    """View ``x`` as having at least one spatial dim; return it, the spatial dims and M."""
    xs = x.unsqueeze(-1) if x.dim() == 2 else x
    dims = tuple(range(2, xs.dim()))
    m = 1
    for s in xs.shape[2:]:
        m *= s
    return xs, dims, m


def _bshape(t: Tensor, ndim: int) -> Tensor:
    """Reshape an (N, C) or (C,) tensor so it broadcasts against an ``ndim``-D input."""
    if t.dim() == 1:
        return t.reshape((1, -1) + (1,) * (ndim - 2))
    return t.reshape(t.shape + (1,) * (ndim - 2))


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
    counts, means, m2s = allst[:, 0], allst[:, 1], allst[:, 2]
    total = counts.sum(0)
    gmean = (counts * means).sum(0) / total
    gm2 = (m2s + counts * (means - gmean) ** 2).sum(0)
    return total[0], gmean, gm2


def _row_mean_var(xs: Tensor, dims: Tuple[int, ...], m_sp: int, acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Per-(n, c) mean and biased variance in ``acc``, two-pass (centred) for stability.

    ``torch.var_mean`` over trailing dims is ~10x slower than a sum on CPU, so the variance is
    the squared l2 norm of the centred values (a vectorised reduction) divided by M.
    """
    xa = xs if xs.dtype == acc else xs.to(acc)
    m = xa.mean(dims)
    d = xa - _bshape(m, xa.dim())
    if d.is_contiguous():
        m2 = torch.linalg.vector_norm(d, dim=dims).square()
    else:
        m2 = (d * d).sum(dims)
    return m, m2 / m_sp


def _affine_apply(xs: Tensor, amat: Tensor, bvec: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``y = x * A[n, c] + B[c]`` in one elementwise pass."""
    y = torch.addcmul(_bshape(bvec, xs.dim()), xs, _bshape(amat, xs.dim()))
    return y if y.dtype == out_dtype else y.to(out_dtype)


def _grad_sums(gs: Tensor, xs: Tensor, dims: Tuple[int, ...], acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Per-(n, c) sums of ``g`` and ``g * x`` in ``acc``."""
    if gs.dtype != acc:
        gs, xs = gs.to(acc), xs.to(acc)
    return gs.sum(dims), (gs * xs).sum(dims)


def _grad_apply(gs: Tensor, xs: Tensor, p: Tensor, q: Tensor, r: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``dx = g * P[n, c] + x * Q[n, c] + R[n, c]``."""
    nd = xs.dim()
    dx = torch.addcmul(_bshape(r, nd), xs, _bshape(q, nd))
    dx.addcmul_(gs, _bshape(p, nd))
    return dx if dx.dtype == out_dtype else dx.to(out_dtype)


def unsaved_row_stats(xs: Tensor, acc: torch.dtype, row_stats: Any = None) -> Tuple[Tensor, Tensor]:
    """Per-(n, c) mean and variance that forward did not save: for one entry per (n, c) (an
    (N, C) input) they are x itself and 0; otherwise ``row_stats`` recomputes them."""
    if xs[0, 0].numel() == 1:
        m = xs.reshape(xs.shape[0], xs.shape[1]).to(acc)
        return m, torch.zeros_like(m)
    dims = tuple(range(2, xs.dim()))
    return (row_stats or _row_mean_var)(xs, dims, xs[0, 0].numel(), acc)


class Kernels:
    """The four bulk passes of L2BN; everything else works on ``(N, C)`` tensors.

    ``EAGER`` uses ATen ops; :mod:`l2bn.kernels.compiled` provides versions generated by
    ``torch.compile`` (C++/OpenMP on CPU, Triton on CUDA).
    """

    def __init__(self, row_stats: Any, affine_apply: Any, grad_sums: Any, grad_apply: Any) -> None:
        self.row_stats = row_stats
        self.affine_apply = affine_apply
        self.grad_sums = grad_sums
        self.grad_apply = grad_apply


EAGER = Kernels(_row_mean_var, _affine_apply, _grad_sums, _grad_apply)
KERNELS = {"fused": EAGER}


class FusedL2BatchNorm(torch.autograd.Function):
    """Fused L2BN forward/backward. Use :func:`fused_l2_batch_norm`, not this class directly."""

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
        kernels: str,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        kern = KERNELS[kernels]
        acc = accumulate_dtype(x.dtype)
        xs, dims, m_sp = _as_ncm(x)
        n, c = xs.shape[0], xs.shape[1]
        m, v = kern.row_stats(xs, dims, m_sp, acc)  # (N, C) each
        sq = (v + m * m).sum(1) * m_sp  # (N,) squared l2 norm of each sample
        r = sq.sqrt()
        scale = math.sqrt(c * m_sp) if unit_rms else 1.0
        k = scale / r.clamp_min(l2_eps)  # (N,)
        use_batch_stats = stat_mean is None
        if use_batch_stats:
            mk = m * k[:, None]
            vk = v * (k * k)[:, None]
            if n > 0:
                mu = mk.mean(0)
                m2 = (vk.mean(0) + ((mk - mu) ** 2).mean(0)) * (n * m_sp)
            else:
                mu = m.new_zeros(c)
                m2 = m.new_zeros(c)
            if process_group is not None:
                count, mu, m2 = _combine_across(n * m_sp, mu, m2, process_group)
            else:
                count = torch.tensor(float(n * m_sp), dtype=acc, device=x.device)
            var = m2 / count
        else:
            assert stat_var is not None
            mu = stat_mean.to(acc)
            var = stat_var.to(acc)
            count = torch.tensor(float(n * m_sp), dtype=acc, device=x.device)
        invstd = torch.rsqrt(var + eps)
        gamma = weight.to(acc) if weight is not None else torch.ones_like(invstd)
        beta = bias.to(acc) if bias is not None else torch.zeros_like(invstd)
        a_c = gamma * invstd
        amat = a_c[None, :] * k[:, None]  # (N, C)
        bvec = beta - mu * a_c  # (C,)
        y = kern.affine_apply(xs, amat, bvec, x.dtype)
        if x.dim() == 2:
            y = y.squeeze(-1)

        # With one entry per (n, c) (an MLP's (N, C) input) the row statistics are x itself and
        # 0: recompute them in backward rather than save two more tensors of x's size.
        row = (m, v) if m_sp > 1 else (None, None)
        ctx.save_for_backward(x, weight, k, r, *row, mu, invstd, count)
        ctx.use_batch_stats = use_batch_stats
        ctx.l2_eps = l2_eps
        ctx.process_group = process_group
        ctx.m_sp = m_sp
        ctx.kernels = kernels
        ctx.mark_non_differentiable(mu, var, count)
        return y, mu, var, count

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor, _gmu: Any, _gvar: Any, _gcount: Any):  # type: ignore[override]
        x, weight, k, r, m, v, mu, invstd, count = ctx.saved_tensors
        acc = invstd.dtype
        xs, dims, m_sp = _as_ncm(x)
        if m is None:
            m, v = unsaved_row_stats(xs, acc)
        gs = gy.unsqueeze(-1) if gy.dim() == 2 else gy
        kern = KERNELS[ctx.kernels]
        g_nc, gx_nc = kern.grad_sums(gs, xs, dims, acc)  # (N, C): sum_s g, sum_s g x
        g_c = g_nc.sum(0)
        su_c = (k[:, None] * gx_nc).sum(0)  # sum g u
        gamma = weight.to(acc) if weight is not None else torch.ones_like(invstd)
        a_c = gamma * invstd
        grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = ((su_c - mu * g_c) * invstd).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = g_c.to(weight.dtype if weight is not None else acc)

        grad_x = None
        if ctx.needs_input_grad[0]:
            if ctx.use_batch_stats:
                if ctx.process_group is not None:
                    import torch.distributed as dist

                    both = torch.stack([g_c, su_c])
                    dist.all_reduce(both, group=ctx.process_group)
                    g_c, su_c = both[0], both[1]
                h_c = (su_c - mu * g_c) * invstd
                b_c = -a_c * h_c * invstd / count
                c_c = -a_c * g_c / count - b_c * mu
            else:
                b_c = torch.zeros_like(a_c)
                c_c = torch.zeros_like(a_c)
            s1 = m * m_sp
            s2 = (v + m * m) * m_sp
            # t_n = sum over the sample of (dL/du) * x
            t = (a_c * gx_nc + b_c * k[:, None] * s2 + c_c * s1).sum(1)
            mask = r >= ctx.l2_eps
            radial = torch.where(mask, k * t / (r * r).clamp_min(1e-300 if acc == torch.float64 else 1e-30), 0.0)
            p = k[:, None] * a_c
            q = (k * k)[:, None] * b_c - radial[:, None]
            rr = k[:, None] * c_c
            grad_x = kern.grad_apply(gs, xs, p, q, rr, x.dtype)
            if x.dim() == 2:
                grad_x = grad_x.squeeze(-1)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None


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
    kernels: str = "fused",
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the fused L2BN; returns ``(y, mean, biased_var, count)`` of the statistics used.

    ``stat_mean``/``stat_var`` ``None`` means batch statistics (training); otherwise they are the
    running statistics used in evaluation. ``kernels`` names the bulk-pass implementation
    (``"fused"``: ATen ops; ``"compiled"``: generated by ``torch.compile``).
    """
    return FusedL2BatchNorm.apply(
        input, weight, bias, stat_mean, stat_var, eps, l2_eps, unit_rms, process_group, kernels
    )
