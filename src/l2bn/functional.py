"""Functional L2BN: :func:`l2_batch_norm`, the one entry point every layer calls.

It mirrors :func:`torch.nn.functional.batch_norm` and picks a backend:

* ``"fused"`` — one-pass statistics and fused backward (:mod:`l2bn.kernels.fused`); saves only
  the input plus ``O(N*C)`` statistics. The default.
* ``"reference"`` — the plain composite ``F.batch_norm(F.normalize(x))``, the specification
  (:mod:`l2bn.kernels.reference`); use it for debugging.

The backend is chosen by the ``backend=`` argument, else the ``L2BN_BACKEND`` environment
variable, else automatically.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import backends
from .kernels.fused import fused_l2_batch_norm
from .kernels.reference import accumulate_dtype, l2_batch_norm_reference, l2_normalize_samples

__all__ = ["l2_batch_norm", "l2_normalize_samples", "available_backends"]

available_backends = backends.available_backends


def _check(input: Tensor, running_mean: Optional[Tensor], weight: Optional[Tensor]) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"l2_batch_norm: expected a Tensor input, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(
            f"l2_batch_norm: expected an input of shape (N, C, *) with at least 2 dims, got {input.dim()}D input of shape {tuple(input.shape)}"
        )
    if not input.is_floating_point():
        raise TypeError(
            f"l2_batch_norm: expected a floating-point input (float16, bfloat16, float32, float64), got {input.dtype}"
        )
    c = input.shape[1]
    for name, t in (("running_mean", running_mean), ("weight", weight)):
        if t is not None and t.numel() != c:
            raise ValueError(
                f"l2_batch_norm: input has {c} channels (dim 1 of shape {tuple(input.shape)}) but {name} has {t.numel()} elements"
            )


def l2_batch_norm(
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
    backend: Optional[str] = None,
    process_group: Any = None,
) -> Tensor:
    r"""L2 batch normalization: per-sample l2 normalization, then batch normalization.

    .. math::
        u_n = s \cdot \frac{x_n}{\max(\lVert x_n \rVert_2, \epsilon_2)}, \qquad
        y = \frac{u - \mathrm{E}[u]}{\sqrt{\mathrm{Var}[u] + \epsilon}} \cdot \gamma + \beta

    The norm :math:`\lVert x_n \rVert_2` runs over all non-batch dimensions of sample
    :math:`n` (for a conv map, :math:`C \times H \times W`); :math:`s = 1` (the paper) or
    :math:`\sqrt{D}` with ``unit_rms=True``, :math:`D` the number of entries per sample.
    Mean and variance are per channel over batch and spatial dims, exactly as
    :func:`torch.nn.functional.batch_norm`; with ``training=True`` the running statistics are
    updated in place (unbiased variance), otherwise they are used.

    Args:
        input: tensor of shape ``(N, C, *)``, floating point.
        running_mean, running_var: ``(C,)`` buffers, or ``None`` (then ``training`` must be True).
        weight, bias: optional affine ``(C,)`` parameters :math:`\gamma, \beta`.
        training: use batch statistics (and update the running ones) if True.
        momentum: running-statistics update factor.
        eps: added to the variance, as in BN.
        l2_eps: lower bound on each sample's norm (as in :func:`torch.nn.functional.normalize`),
            so an all-zero sample gives zeros, not NaN.
        unit_rms: scale the normalized sample to unit RMS instead of unit l2 norm (see
            :class:`l2bn.L2BatchNorm2d` for the trade-off).
        backend: ``"fused"``, ``"reference"`` or ``None`` (automatic; env ``L2BN_BACKEND``).
        process_group: if given (training only), batch statistics are synchronised across it.

    Returns:
        Tensor of the input's shape, dtype and memory format.

    Example:
        >>> import torch
        >>> from l2bn.functional import l2_batch_norm
        >>> x = torch.randn(8, 4, 5, 5)
        >>> rm, rv = torch.zeros(4), torch.ones(4)
        >>> y = l2_batch_norm(x, rm, rv, training=True)
        >>> y.shape, rm.abs().sum() > 0
        (torch.Size([8, 4, 5, 5]), tensor(True))
    """
    _check(input, running_mean, weight)
    if training:
        if process_group is None:
            F._verify_batch_size(input.size())
    elif running_mean is None or running_var is None:
        raise ValueError(
            "l2_batch_norm: running_mean and running_var are required when training=False "
            "(pass training=True to use batch statistics)"
        )
    name = backends.select(backend, input)
    if name == "reference":
        if process_group is not None:
            raise ValueError("l2_batch_norm: the 'reference' backend does not support process_group")
        return _reference_with_stats(
            input, running_mean, running_var, weight, bias, training, momentum, eps, l2_eps, unit_rms
        )
    fn = fused_l2_batch_norm if name == "fused" else backends.get(name)
    if training:
        y, mean, var, count = fn(
            input, weight, bias, None, None, eps, l2_eps, unit_rms, process_group
        )
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                unbiased = var * (count / (count - 1).clamp_min(1))
                running_mean.copy_(running_mean * (1 - momentum) + mean * momentum)
                running_var.copy_(running_var * (1 - momentum) + unbiased * momentum)
        return y
    y, _, _, _ = fn(input, weight, bias, running_mean, running_var, eps, l2_eps, unit_rms, None)
    return y


def _reference_with_stats(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    l2_eps: float,
    unit_rms: bool,
) -> Tensor:
    """The reference path, with parameters/buffers cast to the accumulation dtype if needed."""
    acc = accumulate_dtype(input.dtype)
    rm = running_mean.to(acc) if running_mean is not None else None
    rv = running_var.to(acc) if running_var is not None else None
    w = weight.to(acc) if weight is not None else None
    b = bias.to(acc) if bias is not None else None
    y = l2_batch_norm_reference(
        input, rm, rv, w, b, training, momentum, eps, l2_eps=l2_eps, unit_rms=unit_rms
    )
    if training and running_mean is not None and rm is not running_mean:
        with torch.no_grad():
            running_mean.copy_(rm)
            running_var.copy_(rv)
    return y


