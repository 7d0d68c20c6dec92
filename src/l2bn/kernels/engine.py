r"""The L2BN computation of the fast backends, as plain tensor functions: bulk passes and engines.

* **bulk passes** (:class:`Kernels`): per-(n, c) mean and variance of ``x``; ``y = x*A + B``;
  per-(n, c) sums of ``g`` and ``g*x``; ``dx = g*P + x*Q + R``; per-sample norms (evaluation).
  :data:`ATEN_KERNELS` uses ATen ops; :mod:`l2bn.kernels.compiled` generates its own with
  ``torch.compile``.
* **engines** (:class:`Engine`): the training forward (:func:`train_forward`), the evaluation
  forward (:func:`eval_forward`) and the first-order backward (:func:`backward_core`), each one
  function of the bulk passes and the ``(N, C)`` algebra of :mod:`l2bn.kernels.algebra`; the
  compiled backend compiles each of them as one graph. Only ``x`` and ``O(N * C)`` statistics
  are needed by the backward — the naive composite also keeps the normalized copy of ``x``.

The autograd plumbing around them is :mod:`l2bn.kernels.autograd`.

Why one file: the bulk passes and the engine functions built from them are one table
(:data:`ATEN_KERNELS`) and the three functions that every fast backend's engine mirrors.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import algebra
from .algebra import SampleNorms
from .reference import accumulate_dtype

__all__ = [
    "Kernels",
    "Engine",
    "ATEN_KERNELS",
    "ATEN",
    "local_stats",
    "finish_train",
    "train_forward",
    "eval_forward",
    "backward_core",
]

# ---------------------------------------------------------------------------- bulk passes


def _ncm(x: Tensor) -> Tensor:
    """View an ``(N, C)`` input as ``(N, C, 1)`` so every input has a spatial part."""
    return x.unsqueeze(-1) if x.dim() == 2 else x


def _numel(shape: Any) -> int:
    return math.prod(shape)


def _bshape(t: Tensor, ndim: int) -> Tensor:
    """Reshape an (N, C), (N,) or (C,) tensor to broadcast against an ``ndim``-D input:
    (C,) is per channel, (N,) per sample."""
    if t.dim() == 1:
        return t.reshape((1, -1) + (1,) * (ndim - 2))
    return t.reshape(t.shape + (1,) * (ndim - t.dim()))


def _row_mean_var(
    xs: Tensor, dims: Tuple[int, ...], m_sp: int, acc: torch.dtype
) -> Tuple[Tensor, Tensor]:
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


def _grad_sums(
    gs: Tensor, xs: Tensor, dims: Tuple[int, ...], acc: torch.dtype, shift: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Per-(n, c) sums of ``g`` and ``g * (x - shift[n, c])`` in ``acc`` (``shift`` 0 if not
    given)."""
    if gs.dtype != acc or xs.dtype != acc:
        gs, xs = gs.to(acc), xs.to(acc)
    if shift is not None:
        xs = xs - _bshape(shift, xs.dim())
    return gs.sum(dims), (gs * xs).sum(dims)


def _grad_apply(
    gs: Tensor, xs: Tensor, p: Tensor, q: Tensor, r: Tensor, out_dtype: torch.dtype
) -> Tensor:
    """``dx = g * P[n, c] + x * Q[n, c] + R[n, c]``."""
    nd = xs.dim()
    dx = torch.addcmul(_bshape(r, nd), xs, _bshape(q, nd))
    dx.addcmul_(gs, _bshape(p, nd))
    return dx if dx.dtype == out_dtype else dx.to(out_dtype)


def _sample_norm(xs: Tensor, acc: torch.dtype) -> Tensor:
    """Per-sample l2 norm over all non-batch dims, in ``acc``."""
    xa = xs if xs.dtype == acc else xs.to(acc)
    return torch.linalg.vector_norm(xa, dim=tuple(range(1, xs.dim())))


class Kernels(NamedTuple):
    """The bulk passes of L2BN; everything else works on ``(N, C)`` tensors (see
    :mod:`l2bn.kernels.algebra`)."""

    row_stats: Callable[[Tensor, Tuple[int, ...], int, torch.dtype], Tuple[Tensor, Tensor]]
    affine_apply: Callable[[Tensor, Tensor, Tensor, torch.dtype], Tensor]
    grad_sums: Callable[..., Tuple[Tensor, Tensor]]  # (g, x, dims, acc, shift=None)
    grad_apply: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, torch.dtype], Tensor]
    sample_norm: Callable[[Tensor, torch.dtype], Tensor]


ATEN_KERNELS = Kernels(_row_mean_var, _affine_apply, _grad_sums, _grad_apply, _sample_norm)


# ------------------------------------------------------------------ forward and backward


def local_stats(
    xs: Tensor,
    acc: torch.dtype,
    s: float,
    l2_eps: float,
    row_stats: Callable,
    sigma: Optional[Tensor] = None,
) -> SampleNorms:
    """Per-sample norms/scales and per-(n, c) statistics of ``u`` (no communication).

    With ``sigma`` the row statistics are taken of ``sigma_n * x_n`` (see
    :func:`l2bn.kernels.scaling.pow2_scale`).
    """
    n, c = xs.shape[0], xs.shape[1]
    m_sp = _numel(xs.shape[2:])
    if xs.numel() == 0:
        m = v = xs.new_zeros((n, c), dtype=acc)
    else:
        src = xs if sigma is None else xs.to(acc) * _bshape(sigma[:, None], xs.dim())
        if m_sp == 1:  # one entry per (n, c): the row statistics are x itself and 0
            m = src.reshape(n, c).to(acc)
            v = torch.zeros_like(m)
        else:
            m, v = row_stats(src, tuple(range(2, xs.dim())), m_sp, acc)
    return algebra.sample_norms(m, v, m_sp, s, l2_eps, sigma)


def finish_train(
    xs: Tensor,
    norms: SampleNorms,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    mu: Tensor,
    m2: Tensor,
    count: algebra.Count,
    affine_apply: Callable,
    sigma: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Batch variance, ``1/sqrt(var + eps)`` and the output ``y = x*A + B``; an empty batch has
    variance 0 (its statistics are never used). With ``sigma`` the output is formed from
    ``sigma * x`` and ``k / sigma`` (no coefficient ``a k`` overflows)."""
    var = m2 / (count.clamp_min(1) if isinstance(count, Tensor) else max(count, 1))
    invstd = torch.rsqrt(var + eps)
    return _affine_out(xs, norms.k, sigma, mu, invstd, weight, bias, affine_apply), var, invstd


def _affine_out(
    xs: Tensor,
    k: Tensor,
    sigma: Optional[Tensor],
    mu: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    affine_apply: Callable,
) -> Tensor:
    """``y = x * (a k) + B``, or ``(sigma x) * (a k / sigma) + B`` with ``sigma``."""
    out_dtype = xs.dtype
    if sigma is not None:
        xs, k = xs.to(invstd.dtype) * _bshape(sigma[:, None], xs.dim()), k / sigma
    amat, bvec = algebra.affine_coeffs(k, mu, invstd, weight, bias)
    return affine_apply(xs, amat, bvec, out_dtype)


def train_forward(
    xs: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    l2_eps: float,
    s: float,
    kernels: Kernels,
    sigma: Optional[Tensor] = None,
) -> Tuple[Tensor, ...]:
    """The whole training forward (no communication): ``(y, r, k, mk, vk, mu, var, invstd)``."""
    acc = accumulate_dtype(xs.dtype)
    m_sp = _numel(xs.shape[2:])
    norms = local_stats(xs, acc, s, l2_eps, kernels.row_stats, sigma)
    mu, m2 = algebra.batch_moments(norms.mk, norms.vk, m_sp)
    y, var, invstd = finish_train(
        xs, norms, weight, bias, eps, mu, m2, xs.shape[0] * m_sp, kernels.affine_apply, sigma
    )
    return (y, *norms, mu, var, invstd)


def eval_forward(
    xs: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    eps: float,
    l2_eps: float,
    s: float,
    kernels: Kernels,
    sigma: Optional[Tensor] = None,
) -> Tuple[Tensor, ...]:
    """Evaluation: per-sample norms (one reduction), then ``y = x*A + B`` with the running
    statistics; returns ``(y, r, k, mu, var, invstd)``."""
    acc = accumulate_dtype(xs.dtype)
    if xs.numel() == 0:
        rs = xs.new_zeros(xs.shape[0], dtype=acc)
    else:
        src = xs if sigma is None else xs.to(acc) * _bshape(sigma[:, None], xs.dim())
        rs = kernels.sample_norm(src, acc)
    r, k, _ = algebra.norm_scale(rs, s, l2_eps, sigma)
    mu, var_a = mean.to(acc), var.to(acc)
    invstd = torch.rsqrt(var_a + eps)
    return (
        _affine_out(xs, k, sigma, mu, invstd, weight, bias, kernels.affine_apply),
        r,
        k,
        mu,
        var_a,
        invstd,
    )


def _with_big_k(k: Tensor, sigma: Optional[Tensor], acc: torch.dtype) -> Optional[Tensor]:
    """``sigma`` extended by a power of two close to ``k_n`` for every sample whose ``k_n^2``
    would overflow in the input-gradient coefficient ``k^2 b`` (a norm far below a tiny
    ``l2_eps``: an all-zero sample gave ``0 * inf = NaN``): the passes then run on ``u = k x``
    (bounded) with ``k`` near 1, and the coefficients are rescaled exactly. Checked on the CPU
    outside compilation only (elsewhere it would synchronise)."""
    if k.numel() == 0 or k.device.type != "cpu" or torch.compiler.is_compiling():
        return sigma
    kk = k if sigma is None else k / sigma
    lim = math.sqrt(torch.finfo(acc).max) * 1e-4
    if not float(kk.max()) > lim:
        return sigma
    extra = torch.where(kk > lim, torch.exp2(torch.floor(torch.log2(kk))), torch.ones_like(kk))
    return extra if sigma is None else sigma * extra


def backward_core(
    gs: Tensor,
    xs: Tensor,
    weight: Optional[Tensor],
    k: Tensor,
    r: Tensor,
    mk: Optional[Tensor],
    vk: Optional[Tensor],
    mu: Tensor,
    invstd: Tensor,
    l2_eps: float,
    unit_rms: bool,
    batch_stats: bool,
    need_dx: bool,
    kernels: Kernels,
    count: Optional[algebra.Count] = None,
    all_reduce: Optional[Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]] = None,
    sigma: Optional[Tensor] = None,
) -> Tuple[Optional[Tensor], Tensor, Tensor]:
    """First-order backward: ``(dx or None, dweight, dbias)`` in the accumulation dtype (``dx`` in
    ``x``'s). ``count``: number of entries per channel (default: this batch's); ``all_reduce``
    sums the per-channel gradient sums across processes; with ``sigma`` the passes run on
    ``sigma * x`` and the coefficients are rescaled (exactly) so nothing underflows."""
    acc = invstd.dtype
    out_dtype = xs.dtype
    n, c = xs.shape[0], xs.shape[1]
    m_sp = _numel(xs.shape[2:])
    s = algebra.unit_scale(c * m_sp, unit_rms)
    if count is None:
        count = n * m_sp
    mask = r > l2_eps  # at r == l2_eps no gradient through r, as in the reference composite
    sigma = _with_big_k(k, sigma, acc)
    if sigma is not None:
        xs = xs.to(acc) * _bshape(sigma[:, None], xs.dim())
        k, r = k / sigma, r * sigma
    if batch_stats and mk is None:  # one entry per (n, c): not saved, recompute
        mk = xs.reshape(n, c).to(acc) * k[:, None]
        vk = torch.zeros_like(mk)
    # centred sums: shifted by mu_c / k_n, k_n * sum_s g (x - shift) = sum g (u - mu) directly,
    # without the cancellation of sum g u - mu sum g when |mu| >> the spread of u
    shift = mu[None, :] / k[:, None]
    g_nc, gxc_nc = kernels.grad_sums(gs, xs, tuple(range(2, xs.dim())), acc, shift)
    g_c, su_c = algebra.channel_grad_sums(g_nc, gxc_nc, k)
    grad_w, grad_b = algebra.param_grads(g_c, su_c, invstd)
    if not need_dx:
        return None, grad_w, grad_b
    if all_reduce is not None and batch_stats:
        g_c, su_c = all_reduce(g_c, su_c)
    norms = SampleNorms(r, k, mk, vk)  # type: ignore[arg-type]  (unused in eval)
    gx_nc = gxc_nc + shift * g_nc  # sum_s g x, for the radial term
    p, q, rr = algebra.input_grad_coeffs(
        g_c, su_c, gx_nc, norms, mu, invstd, weight, count, m_sp, s, mask, batch_stats
    )
    if sigma is not None:
        sc = sigma[:, None]
        p, q, rr = p * sc, q * sc, rr * sc
    return kernels.grad_apply(gs, xs, p, q, rr, out_dtype), grad_w, grad_b


class Engine(NamedTuple):
    """A backend's three bulk functions (each one compiled graph in the compiled backend) and
    its kernels (used piecewise when a process group must communicate in between)."""

    name: str
    kernels: Kernels
    train: Callable[..., Tuple[Tensor, ...]]
    evaluate: Callable[..., Tuple[Tensor, ...]]
    backward: Callable[..., Tuple[Optional[Tensor], Tensor, Tensor]]


def _aten_train(xs, weight, bias, eps, l2_eps, s):  # type: ignore[no-untyped-def]
    return train_forward(xs, weight, bias, eps, l2_eps, s, ATEN_KERNELS)


def _aten_eval(xs, weight, bias, mean, var, eps, l2_eps, s):  # type: ignore[no-untyped-def]
    return eval_forward(xs, weight, bias, mean, var, eps, l2_eps, s, ATEN_KERNELS)


def _aten_backward(
    gs, xs, weight, k, r, mk, vk, mu, invstd, l2_eps, unit_rms, batch_stats, need_dx
):  # type: ignore[no-untyped-def]
    return backward_core(
        gs,
        xs,
        weight,
        k,
        r,
        mk,
        vk,
        mu,
        invstd,
        l2_eps,
        unit_rms,
        batch_stats,
        need_dx,
        ATEN_KERNELS,
    )


ATEN = Engine("fused", ATEN_KERNELS, _aten_train, _aten_eval, _aten_backward)
