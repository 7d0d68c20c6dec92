"""Frozen L2BN: :class:`FrozenL2BatchNorm` and :func:`freeze`, for frozen backbones.

Detection and fine-tuning code freezes BN layers into a fixed affine map
(``torchvision.ops.FrozenBatchNorm2d``, timm's ``freeze_batch_norm_2d``, detectron2's
``FrozenBatchNorm2d``); those helpers recognise BN by type, so L2BN layers would keep training
and updating their statistics. :func:`freeze` is the same operation for L2BN: the per-sample l2
step stays (it has no state), the batch normalization uses the stored statistics in every mode,
and nothing is trainable.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

from .functional import l2_batch_norm
from .modules import _L2NormBase

__all__ = ["FrozenL2BatchNorm", "freeze"]


class FrozenL2BatchNorm(nn.Module):
    r"""L2BN with fixed statistics and affine parameters (all buffers), in train and eval mode:

    .. math::
        y = \frac{u - \mu}{\sqrt{\sigma^2 + \epsilon}} \gamma + \beta, \qquad
        u_n = s \cdot x_n / \max(\lVert x_n \rVert_2, \epsilon_2)

    with the running statistics :math:`\mu, \sigma^2`; the L2BN layer's evaluation-mode output.
    Buffers ``weight``, ``bias``, ``running_mean``, ``running_var`` (the state-dict keys of
    ``torchvision.ops.FrozenBatchNorm2d``). Input: ``(N, C, *)``.

    Example:
        >>> import torch, l2bn
        >>> layer = l2bn.L2BatchNorm2d(4)
        >>> frozen = l2bn.freeze(layer)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> torch.equal(frozen.train()(x), layer.eval()(x))
        True
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        unit_rms: bool = False,
        l2_eps: float = 1e-12,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.num_features, self.eps, self.unit_rms, self.l2_eps = (
            num_features,
            eps,
            bool(unit_rms),
            float(l2_eps),
        )
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))

    def forward(self, input: Tensor) -> Tensor:
        y = l2_batch_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            False,
            0.0,
            self.eps,
            l2_eps=self.l2_eps,
            unit_rms=self.unit_rms,
        )
        if "act" in self._modules:  # frozen form of a norm-act layer (timm's FrozenBatchNormAct2d)
            y = self.act(self.drop(y))
        return y

    def extra_repr(self) -> str:
        s = f"{self.num_features}, eps={self.eps}"
        return s + (", unit_rms=True" if self.unit_rms else "")


def _frozen_copy(layer: _L2NormBase) -> FrozenL2BatchNorm:
    ref = layer.weight if layer.weight is not None else layer.running_mean
    kw = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
    new = FrozenL2BatchNorm(
        layer.num_features, layer.eps, unit_rms=layer.unit_rms, l2_eps=layer.l2_eps, **kw
    )
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(layer, name)
            if src is not None:
                getattr(new, name).copy_(src)
    if hasattr(layer, "act"):
        new.drop, new.act = copy.deepcopy(layer.drop), copy.deepcopy(layer.act)
    return new


def freeze(module: nn.Module) -> nn.Module:
    """Replace every L2BN layer of ``module`` (plain, Sync and norm-act) by a
    :class:`FrozenL2BatchNorm` holding its current values; other layers are untouched (freeze
    BN layers with torchvision's or timm's helpers). Converted in place; a bare L2BN layer is
    returned frozen. A layer without affine parameters freezes with ``weight = 1``,
    ``bias = 0``; one without running statistics, with the prior (mean 0, variance 1).

    Example:
        >>> import torch, l2bn
        >>> net = l2bn.freeze(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), l2bn.L2BatchNorm2d(4)))
        >>> type(net[1]).__name__, sum(p.numel() for p in net[1].parameters())
        ('FrozenL2BatchNorm', 0)
    """
    if isinstance(module, _L2NormBase):
        return _frozen_copy(module)
    for name, child in list(module.named_children()):
        new = freeze(child)
        if new is not child:
            setattr(module, name, new)
    return module
