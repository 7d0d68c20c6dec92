"""Norm + activation layers in timm's form (``timm/layers/norm_act.py``): L2BN followed by
``drop`` and ``act`` submodules, with the same state-dict keys as timm's ``BatchNormAct2d`` /
``SyncBatchNormAct``. :func:`l2bn.convert` turns timm's layers into these and :func:`l2bn.revert`
turns them back.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from .modules import L2BatchNorm2d
from .sync import SyncL2BatchNorm

__all__ = ["L2BatchNormAct2d", "SyncL2BatchNormAct"]


class _NormActMixin:
    """BN forward followed by ``drop`` then ``act`` (timm's norm-act contract, same keys)."""

    def __init__(
        self,
        num_features: int,
        *args: Any,
        drop: Optional[nn.Module] = None,
        act: Optional[nn.Module] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, *args, **kwargs)  # type: ignore[call-arg]
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))  # type: ignore[misc]


class L2BatchNormAct2d(_NormActMixin, L2BatchNorm2d):
    """:class:`L2BatchNorm2d` followed by ``drop`` and ``act`` — the L2 form of timm's
    ``BatchNormAct2d`` (same state-dict keys). Made by :func:`convert`.

    Example:
        >>> import torch
        >>> m = L2BatchNormAct2d(8, act=torch.nn.ReLU())
        >>> bool((m(torch.randn(4, 8, 3, 3)) >= 0).all())
        True
    """


class SyncL2BatchNormAct(_NormActMixin, SyncL2BatchNorm):
    """:class:`SyncL2BatchNorm` followed by ``drop`` and ``act`` (timm's ``SyncBatchNormAct``).

    Example:
        >>> import torch
        >>> m = SyncL2BatchNormAct(8, act=torch.nn.ReLU())
        >>> m(torch.randn(4, 8, 3, 3)).shape
        torch.Size([4, 8, 3, 3])
    """
