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
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        acc = accumulate_dtype(x.dtype)
        xs, dims, m_sp = _as_ncm(x)
        n, c = xs.shape[0], xs.shape[1]
        xa = xs if xs.dtype == acc else xs.to(acc)
        v, m = torch.var_mean(xa, dim=dims, correction=0)  # (N, C) each
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
                mu = xa.new_zeros(c)
                m2 = xa.new_zeros(c)
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
        y = torch.addcmul(_bshape(bvec, xs.dim()), xs, _bshape(amat.to(acc), xs.dim()))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if x.dim() == 2:
            y = y.squeeze(-1)

        ctx.save_for_backward(x, weight, k, r, m, v, mu, invstd, count)
        ctx.use_batch_stats = use_batch_stats
        ctx.l2_eps = l2_eps
        ctx.process_group = process_group
        ctx.m_sp = m_sp
        ctx.mark_non_differentiable(mu, var, count)
        return y, mu, var, count

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor, _gmu: Any, _gvar: Any, _gcount: Any):  # type: ignore[override]
        x, weight, k, r, m, v, mu, invstd, count = ctx.saved_tensors
        acc = invstd.dtype
        xs, dims, m_sp = _as_ncm(x)
        gs = gy.unsqueeze(-1) if gy.dim() == 2 else gy
        if gs.dtype != acc:
            ga, xa = gs.to(acc), xs.to(acc)
        else:
            ga, xa = gs, xs
        g_nc = ga.sum(dims)  # (N, C)  sum_s g
        gx_nc = (ga * xa).sum(dims)  # (N, C)  sum_s g x
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
            nd = xs.dim()
            gx = torch.addcmul(_bshape(rr, nd), xa, _bshape(q, nd))
            gx.addcmul_(ga, _bshape(p, nd))
            if x.dim() == 2:
                gx = gx.squeeze(-1)
            grad_x = gx.to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


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
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the fused L2BN; returns ``(y, mean, biased_var, count)`` of the statistics used.

    ``stat_mean``/``stat_var`` ``None`` means batch statistics (training); otherwise they are the
    running statistics used in evaluation.
    """
    return FusedL2BatchNorm.apply(
        input, weight, bias, stat_mean, stat_var, eps, l2_eps, unit_rms, process_group
    )
