r"""Scale safety of the fast backends: the fast statistics can overflow (float32 samples of norm
above ~1.8e19) or underflow (norms below ~1e-16 when ``l2_eps`` is smaller still).
:func:`needs_rescale` tells from the sample norms of the statistics pass whether a batch is out
of the safe range; :func:`pow2_scale` gives the per-sample power of two that brings it back
(exact scaling). On devices other than the CPU the check would need a host synchronisation and
is skipped."""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["needs_rescale", "pow2_scale"]


@functools.lru_cache(maxsize=256)
def _norm_range(acc: torch.dtype, d: int) -> Tuple[float, float]:
    """Sample norms outside ``[lo, hi]`` may lose accuracy in ``acc``: above ``hi`` squares can
    overflow (and ``k^2`` underflows in backward), below ``lo`` squares of the entries are
    subnormal enough to matter."""
    fi = torch.finfo(acc)
    return math.sqrt(max(d, 1) * fi.tiny / fi.eps), math.sqrt(fi.max) / 4


def needs_rescale(r: Tensor, acc: torch.dtype, d: int, l2_eps: float) -> bool:
    """Whether any sample norm ``r`` (as computed by the fast pass) is out of the safe range.

    Only checked on CPU outside compilation: elsewhere it would synchronise with the device.
    NaN counts as out of range (an overflow inside the pass gives inf - inf).
    """
    if r.device.type != "cpu" or r.numel() == 0 or torch.compiler.is_compiling():
        return False
    lo, hi = _norm_range(acc, d)
    if (
        l2_eps >= lo
    ):  # the usual case: only overflow (or NaN, for which the comparison fails) matters
        return not float(r.max()) <= hi
    # l2_eps below the accurate range: every norm below lo is suspect, also one that is under
    # l2_eps or 0 (the squares of a sample of 1e-25s underflow to 0 in float32); an all-zero
    # sample is rescaled by 1, which changes nothing
    ok = (r <= hi) & (r >= lo)
    return not bool(ok.all())


def pow2_scale(xs: Tensor, acc: torch.dtype, l2_eps: Optional[float] = None) -> Tensor:
    r"""Per-sample power of two :math:`\sigma_n` with :math:`\max|\sigma_n x_n| \in [1/2, 1)`
    (1 for a non-finite sample); scaling by it is exact. An all-zero sample gets the power of
    two that brings ``l2_eps`` near 1 (1 without ``l2_eps``): its scale :math:`k = s /
    \epsilon_2` is then formed as :math:`(s / (\sigma \epsilon_2)) \sigma`, so no coefficient
    :math:`a k` or :math:`k^2 b` overflows even where :math:`k` itself is near the dtype's
    largest value.

    Example:
        >>> x = torch.tensor([[3e30, 1.0], [0.0, 0.0]])
        >>> s = pow2_scale(x, torch.float32)
        >>> s.log2().tolist(), round((s[0] * x[0, 0]).item(), 4)
        ([-102.0, 0.0], 0.5916)
        >>> pow2_scale(x, torch.float32, l2_eps=1e-20).log2().tolist()
        [-102.0, 67.0]
    """
    if xs.numel() == 0:  # (N, C, 0): nothing to scale
        return xs.new_ones(xs.shape[0], dtype=acc)
    amax = xs.abs().amax(dim=tuple(range(1, xs.dim()))).to(acc)
    # a subnormal maximum would need a power of two beyond the dtype's range: stop at the largest
    # one (the scaled sample's maximum is then >= 2^-(mantissa bits), far inside the safe range)
    top = int(math.log2(torch.finfo(acc).max))
    sigma = torch.exp2(-torch.frexp(amax).exponent.clamp_min(-top).to(acc))
    if l2_eps is not None:
        zero = min(top, max(0, -math.floor(math.log2(l2_eps))))
        sigma = torch.where(amax == 0, torch.full_like(sigma, 2.0**zero), sigma)
    return sigma
