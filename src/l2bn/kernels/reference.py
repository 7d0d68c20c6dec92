"""The L2BN formula, written the plain way. This is the specification.

Every faster path in :mod:`l2bn.kernels` is tested against :func:`l2_batch_norm_reference`.
It is also what the paper's authors ship: ``F.normalize(x.reshape(N, -1))`` followed by
batch normalization — computed here as ``F.normalize`` does (``x / max(||x||, eps)``) with the
norm over all non-batch dims at once, so there is no reshape and the output keeps the input's
memory format (channels_last in, channels_last out). Being plain ATen ops, it supports every
autograd mode and ``torch.func`` transform, and is what those run (see
:mod:`l2bn.functional`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .args import NormArgs

__all__ = [
    "l2_normalize_samples",
    "l2_batch_norm_reference",
    "reference_backend",
    "accumulate_dtype",
]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float32 for half types, else ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


def l2_normalize_samples(input: Tensor, *, l2_eps: float = 1e-12, unit_rms: bool = False) -> Tensor:
    r"""Scale each sample of ``input`` to unit l2 norm over all its non-batch dimensions.

    .. math::
        u_n = s \cdot \frac{x_n}{\max(\lVert x_n \rVert_2, \epsilon_2)}, \qquad
        s = \begin{cases} \sqrt{D} & \text{unit\_rms} \\ 1 & \text{otherwise} \end{cases}

    where :math:`D` is the number of entries of one sample. The result is returned in the
    accumulation dtype (float32 for half inputs).

    Example:
        >>> x = torch.randn(4, 3, 5, 5)
        >>> u = l2_normalize_samples(x)
        >>> torch.allclose(u.flatten(1).norm(dim=1), torch.ones(4))
        True
    """
    if input.dim() < 2:
        raise ValueError(
            f"expected an input with a batch dimension and at least one more, got {input.dim()}D"
        )
    x = input.to(accumulate_dtype(input.dtype))
    norm = torch.linalg.vector_norm(x, 2, dim=tuple(range(1, x.dim())), keepdim=True)
    # max(norm, l2_eps), written so that at norm == l2_eps no gradient flows through the norm
    # whatever the torch version (clamp_min's subgradient at the tie changed between versions)
    u = x / torch.where(norm > l2_eps, norm, l2_eps)
    if unit_rms:
        u = u * math.sqrt(max(math.prod(x.shape[1:]), 1))
    return u


def l2_batch_norm_reference(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    l2_eps: float = 1e-12,
    unit_rms: bool = False,
) -> Tensor:
    """``F.batch_norm`` applied to :func:`l2_normalize_samples` of the input (the composite).

    Arguments are those of :func:`l2bn.functional.l2_batch_norm`. The output has the input's
    dtype; statistics are computed in float32 for half inputs.

    Example:
        >>> x = torch.randn(8, 3, 4, 4)
        >>> y = l2_batch_norm_reference(x, None, None, training=True)
        >>> y.shape
        torch.Size([8, 3, 4, 4])
    """
    u = l2_normalize_samples(input, l2_eps=l2_eps, unit_rms=unit_rms)
    y = F.batch_norm(u, running_mean, running_var, weight, bias, training, momentum, eps)
    return y.to(input.dtype)


def reference_backend(input: Tensor, args: NormArgs) -> Tensor:
    """The ``"reference"`` backend (signature of :data:`l2bn.kernels.backends.BackendFn`):
    :func:`l2_batch_norm_reference` with parameters and buffers cast to the accumulation dtype
    where needed, running statistics updated in place by ``F.batch_norm``.

    Example:
        >>> x = torch.randn(8, 3, 4, 4).contiguous(memory_format=torch.channels_last)
        >>> y = reference_backend(x, NormArgs(None, None, None, None, training=True))
        >>> y.is_contiguous(memory_format=torch.channels_last)
        True
    """
    if args.process_group is not None:
        raise ValueError("l2_batch_norm: the 'reference' backend does not support process_group")
    acc = accumulate_dtype(input.dtype)
    running_mean, running_var = args.running_mean, args.running_var
    rm = running_mean.to(acc) if running_mean is not None else None
    rv = running_var.to(acc) if running_var is not None else None
    w = args.weight.to(acc) if args.weight is not None else None
    b = args.bias.to(acc) if args.bias is not None else None
    y = l2_batch_norm_reference(
        input,
        rm,
        rv,
        w,
        b,
        args.training,
        args.momentum,
        args.eps,
        l2_eps=args.l2_eps,
        unit_rms=args.unit_rms,
    )
    if args.training and rm is not None and rv is not None and rm is not running_mean:
        with torch.no_grad():
            running_mean.copy_(rm)
            running_var.copy_(rv)
    return y
