r"""The L2BN algebra on ``(N, C)`` statistics, written once in Python: the ATen, compiled and
Triton backends call these functions; the C++ kernel (``csrc/kernels.h``) computes the same
formulas in C++ and is tested against them and the reference.

Notation (training mode, input ``x`` of shape ``(N, C, *S)``, ``M = prod(S)``, ``D = C M``):

* per-(n, c) row statistics of ``x``: mean :math:`m_{nc}` and biased variance :math:`v_{nc}`;
* sample norm :math:`r_n = \sqrt{M \sum_c (v_{nc} + m_{nc}^2)} = \lVert x_n \rVert_2` and scale
  :math:`k_n = s / \max(r_n, \epsilon_2)`, :math:`s = 1` (paper) or :math:`\sqrt{D}` (unit RMS),
  so that :math:`u = k x`;
* row statistics of ``u``: :math:`\bar u_{nc} = k_n m_{nc}` (``mk``) and :math:`k_n^2 v_{nc}`
  (``vk``); both are scale-free (bounded by :math:`s^2`), so the rest never overflows;
* batch statistics :math:`\mu_c, \sigma^2_c` of ``u`` (Chan's parallel combination of the rows, no
  :math:`E[u^2] - E[u]^2` cancellation), :math:`a_c = \gamma_c / \sqrt{\sigma^2_c + \epsilon}`;
* forward :math:`y = x A_{nc} + B_c` with :math:`A = a_c k_n`, :math:`B = \beta_c - \mu_c a_c`.

Backward, from the per-(n, c) sums :math:`G_{nc} = \sum_s g` and :math:`X_{nc} = \sum_s g x`:
:math:`\partial L/\partial u = a_c g + b_c u + c_c` with (batch statistics)
:math:`h_c = (\sum_n k_n X_{nc} - \mu_c \sum_n G_{nc}) / \sigma_c`,
:math:`b_c = -a_c h_c / (\sigma_c \cdot \mathrm{count})`,
:math:`c_c = -a_c \sum_n G_{nc} / \mathrm{count} - b_c \mu_c` (eval: :math:`b = c = 0`); then, with
:math:`t_n = \sum_i (\partial L/\partial u)_i x_i` and the radial term
:math:`\rho_n = k_n t_n / r_n^2` (zero where :math:`r_n < \epsilon_2`, where ``u`` is linear in
``x``), :math:`dx = g P + x Q + R` with :math:`P = k a`, :math:`Q = k^2 b - \rho`, :math:`R = k c`.
:math:`t_n / r_n` is formed from scale-free terms and :math:`\rho_n = (k_n / r_n)(t_n / r_n)`, so no
:math:`r^2` is ever formed.

Forward-mode (``jvp``), from the sums :math:`\sum_s \dot x` and :math:`\sum_s x \dot x`:
:math:`\dot u = k \dot x - k \dot\rho x` with :math:`\dot\rho_n = (\sum_i x_i \dot x_i) / r_n^2`,
and BN's tangent on top; :math:`\dot y = \dot x P + x Q' + R'`.

All functions are pure tensor code: they run eagerly, under ``torch.compile`` (inlined into one
graph with the bulk passes) and under autograd.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "SampleNorms",
    "unit_scale",
    "norm_scale",
    "sample_norms",
    "batch_moments",
    "combine_moments",
    "affine_coeffs",
    "channel_grad_sums",
    "param_grads",
    "input_grad_coeffs",
    "tangent_coeffs",
]

Count = Union[float, Tensor]


class SampleNorms(NamedTuple):
    """Per-sample norm ``r`` and scale ``k`` (``(N,)``); row statistics of ``u`` (``(N, C)``)."""

    r: Tensor
    k: Tensor
    mk: Tensor
    vk: Tensor


def unit_scale(d: int, unit_rms: bool) -> float:
    r"""The target norm :math:`s` of a normalized sample of ``d`` entries: 1, or :math:`\sqrt{d}`.

    Example:
        >>> unit_scale(16, False), unit_scale(16, True)
        (1.0, 4.0)
    """
    return math.sqrt(d) if unit_rms else 1.0


def norm_scale(
    rs: Tensor, s: float, l2_eps: float, sigma: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""From the norm ``rs`` of :math:`\sigma_n x_n` (``sigma`` ``None``: :math:`\sigma = 1`) return
    ``(r, k, ku)``: the norm of :math:`x_n`, :math:`k_n = s / \max(r_n, \epsilon_2)` and
    :math:`k_n / \sigma_n` (the scale that maps :math:`\sigma_n x_n` to :math:`u_n`).

    ``sigma`` is a per-sample power of two chosen so that the statistics of :math:`\sigma x` can
    neither overflow nor underflow; multiplying by it is exact.

    Example:
        >>> r, k, ku = norm_scale(torch.tensor([5.0, 0.0]), 1.0, 1e-12)
        >>> r.tolist(), k.tolist()
        ([5.0, 0.0], [0.20000000298023224, 999999995904.0])
    """
    # k is s / max(r, l2_eps) as in the reference, also where k^2 would overflow (an all-zero
    # sample with l2_eps < ~5e-20 in float32): its gradient k (g a + c) depends on k, so k^2 is
    # never formed (sample_norms multiplies twice, the backward rescales). Only where s / l2_eps
    # itself overflows (l2_eps below the dtype's range) is k the largest finite value, so that
    # an all-zero sample's u is 0 * k = 0, as the reference's 0 / l2_eps.
    top = torch.finfo(rs.dtype).max
    if sigma is None:
        k = (s / rs.clamp_min(l2_eps)).clamp_max(top)
        return rs, k, k
    ku = (s / torch.maximum(rs, sigma * l2_eps)).clamp_max(top)
    return rs / sigma, (ku * sigma).clamp_max(top), ku


def sample_norms(
    m: Tensor, v: Tensor, m_sp: int, s: float, l2_eps: float, sigma: Optional[Tensor] = None
) -> SampleNorms:
    r"""Per-sample norm and scale, and the row statistics of ``u``, from per-(n, c) mean ``m``
    and biased variance ``v`` (of :math:`\sigma x` when ``sigma`` is given).

    .. math:: r_n = \sqrt{M \textstyle\sum_c (v_{nc} + m_{nc}^2)}, \quad
              \bar u_{nc} = k_n m_{nc}, \quad \mathrm{var}(u)_{nc} = k_n^2 v_{nc}

    Example:
        >>> x = torch.randn(4, 3, 5)
        >>> st = sample_norms(x.mean(2), x.var(2, unbiased=False), 5, 1.0, 1e-12)
        >>> torch.allclose(st.r, x.flatten(1).norm(dim=1))
        True
    """
    rs = ((v + m * m).sum(1) * m_sp).sqrt()
    r, k, ku = norm_scale(rs, s, l2_eps, sigma)
    kc = ku[:, None]
    return SampleNorms(r, k, m * kc, (v * kc) * kc)  # (v k) k: k^2 alone may overflow where v = 0


def batch_moments(mk: Tensor, vk: Tensor, m_sp: int) -> Tuple[Tensor, Tensor]:
    r"""Batch mean :math:`\mu_c` and sum of squared deviations :math:`M2_c` of ``u`` from its
    per-(n, c) means ``mk`` and variances ``vk`` (Chan's combination of N rows of M entries):

    .. math:: \mu_c = \tfrac1N \textstyle\sum_n \bar u_{nc}, \quad
              M2_c = M \textstyle\sum_n \left(\mathrm{var}(u)_{nc} + (\bar u_{nc} - \mu_c)^2\right)

    An empty batch gives zeros.

    Example:
        >>> u = torch.randn(6, 2, 4)
        >>> mu, m2 = batch_moments(u.mean(2), u.var(2, unbiased=False), 4)
        >>> torch.allclose(m2 / 24, u.transpose(0, 1).reshape(2, -1).var(1, unbiased=False))
        True
    """
    n = mk.shape[0]
    if n == 0:
        return mk.new_zeros(mk.shape[1]), mk.new_zeros(mk.shape[1])
    mu = mk.mean(0)
    m2 = (vk.mean(0) + (mk - mu).square().mean(0)) * (n * m_sp)
    return mu, m2


def combine_moments(counts: Tensor, means: Tensor, m2s: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Combine per-group ``(count, mean, M2)`` rows (shape ``(G, C)``) into one (Chan et al.):

    .. math:: n = \textstyle\sum_g n_g, \quad \mu = \sum_g n_g \mu_g / n, \quad
              M2 = \textstyle\sum_g M2_g + n_g (\mu_g - \mu)^2

    Groups with ``n_g = 0`` contribute nothing; if every group is empty the mean is 0.

    Example:
        >>> a, b = torch.randn(3, 2), torch.randn(5, 2)
        >>> n, mu, m2 = combine_moments(
        ...     torch.tensor([[3.0, 3.0], [5.0, 5.0]]), torch.stack([a.mean(0), b.mean(0)]),
        ...     torch.stack([a.var(0, unbiased=False) * 3, b.var(0, unbiased=False) * 5]))
        >>> torch.allclose(m2 / n, torch.cat([a, b]).var(0, unbiased=False))
        True
    """
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total.clamp_min(1)
    m2 = (m2s + counts * (means - mean) ** 2).sum(0)
    return total, mean, m2


def affine_coeffs(
    k: Tensor, mu: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    r"""``(A, B)`` of the forward ``y = x A[n, c] + B[c]``: :math:`A = a_c k_n`,
    :math:`B = \beta_c - \mu_c a_c`, :math:`a_c = \gamma_c / \sqrt{\sigma^2_c + \epsilon}`."""
    a = invstd if weight is None else weight * invstd
    amat = a[None, :] * k[:, None]
    bvec = -mu * a if bias is None else bias - mu * a
    return amat, bvec


def channel_grad_sums(g_nc: Tensor, gxc_nc: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
    r"""Per-channel :math:`\sum g` and the centred :math:`\sum g (u - \mu) = \sum_n k_n
    \sum_s g (x - \mu_c / k_n)` from the per-(n, c) sums, the second taken with the shift
    :math:`\mu_c / k_n` (the two quantities a synchronised backward all-reduces; centred, so no
    cancellation when :math:`|\mu| \gg` the spread of :math:`u`)."""
    return g_nc.sum(0), (k[:, None] * gxc_nc).sum(0)


def param_grads(g_c: Tensor, suc_c: Tensor, invstd: Tensor) -> Tuple[Tensor, Tensor]:
    r""":math:`\partial L/\partial\gamma_c = \sum g (u - \mu_c) / \sigma_c` and
    :math:`\partial L/\partial\beta_c = \sum g` (as BN, local to this process), from the
    centred sum of :func:`channel_grad_sums`."""
    return suc_c * invstd, g_c


def input_grad_coeffs(
    g_c: Tensor,
    su_c: Tensor,
    gx_nc: Tensor,
    norms: SampleNorms,
    mu: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    count: Count,
    m_sp: int,
    s: float,
    mask: Tensor,
    batch_stats: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""``(P, Q, R)`` of :math:`dx = g P + x Q + R` (see the module docstring).

    ``mask`` is :math:`r_n > \epsilon_2` (where the radial term applies; at the tie none, as in the
    reference composite). In eval
    (``batch_stats=False``) :math:`b = c = 0`. The terms of :math:`t_n / r_n` are scale-free:
    :math:`k_n M (v + m^2) / r_n = M(\mathrm{var}(u) + \bar u^2)/s` and
    :math:`M m / r_n = M \bar u / s` wherever the mask holds.
    """
    r, k, mk, vk = norms
    a = invstd if weight is None else weight * invstd
    r_safe = torch.where(mask, r, torch.ones_like(r))
    kk = k[:, None]
    p = kk * a
    if batch_stats:
        h = su_c * invstd  # su_c is centred: sum g (u - mu)
        b = -a * h * invstd / count
        c = -a * g_c / count - b * mu
        t_over_r = (a * gx_nc / r_safe[:, None] + (b * (vk + mk * mk) + c * mk) * (m_sp / s)).sum(1)
        radial = torch.where(mask, (k / r_safe) * t_over_r, torch.zeros_like(r))
        return p, kk * kk * b - radial[:, None], kk * c
    t_over_r = (a * gx_nc).sum(1) / r_safe
    radial = torch.where(mask, (k / r_safe) * t_over_r, torch.zeros_like(r))
    q = (-radial)[:, None].expand_as(p)
    return p, q, torch.zeros_like(p)


def tangent_coeffs(
    d_nc: Optional[Tensor],
    xd_nc: Optional[Tensor],
    norms: SampleNorms,
    mu: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    d_weight: Optional[Tensor],
    d_bias: Optional[Tensor],
    count: Count,
    m_sp: int,
    mask: Tensor,
    batch_stats: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""``(P, Q, R)`` of the forward-mode tangent :math:`\dot y = \dot x P + x Q + R`.

    ``d_nc``, ``xd_nc``: per-(n, c) sums of :math:`\dot x` and :math:`x \dot x` (``None``: no
    input tangent). With :math:`\dot\rho_n = \sum_i x_i \dot x_i / r_n^2` (masked),
    :math:`\sum_s \dot u = k \sum_s \dot x - \dot\rho M \bar u` and
    :math:`\sum_s u \dot u = k^2 \sum_s x \dot x - \dot\rho M (\mathrm{var}(u) + \bar u^2)`; in
    training :math:`\dot\mu = \sum \dot u / n` and
    :math:`\dot\sigma^2 = 2 (\sum u \dot u - \mu \sum \dot u) / n`; in eval they are 0 (running
    statistics are not differentiable inputs, as in BN). Then :math:`e_c = \gamma \dot\sigma^{-1} +
    \dot\gamma \sigma^{-1}`,
    :math:`P = a k`, :math:`Q = k (e - a \dot\rho)`, :math:`R = -a \dot\mu - e \mu + \dot\beta`.
    """
    r, k, mk, vk = norms
    a = invstd if weight is None else weight * invstd
    kk = k[:, None]
    zc = torch.zeros_like(invstd)
    if d_nc is not None and xd_nc is not None:
        r_safe = torch.where(mask, r, torch.ones_like(r))
        rho = torch.where(mask, xd_nc.sum(1) / r_safe / r_safe, torch.zeros_like(r))[:, None]
    else:
        rho = torch.zeros_like(kk)
    if batch_stats:
        if d_nc is not None and xd_nc is not None:
            sdu = (kk * d_nc - rho * m_sp * mk).sum(0)
            sudu = ((kk * xd_nc) * kk - rho * m_sp * (vk + mk * mk)).sum(
                0
            )  # k^2 alone may overflow
            dmu = sdu / count
            dvar = 2 * (sudu - mu * sdu) / count
        else:
            dmu, dvar = zc, zc
    else:
        dmu, dvar = zc, zc
    dinv = -0.5 * invstd**3 * dvar
    e = dinv if weight is None else weight * dinv
    if d_weight is not None:
        e = e + d_weight * invstd
    rvec = -a * dmu - e * mu
    if d_bias is not None:
        rvec = rvec + d_bias
    return kk * a, kk * (e - a * rho), rvec[None, :].expand_as(mk)
