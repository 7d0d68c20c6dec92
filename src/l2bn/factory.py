"""String-keyed norm-layer factory, so model code can take ``norm="bn" | "l2bn" | ...``.

======================  ===========================================================
name                    layer
======================  ===========================================================
``"bn"``                ``nn.BatchNorm{1,2,3}d``
``"l2bn"``              :class:`l2bn.L2BatchNorm{1,2,3}d` (the paper's formula)
``"l2bn-rms"``          L2BN with ``unit_rms=True``
``"syncbn"``            ``nn.SyncBatchNorm``
``"sync-l2bn"``         :class:`l2bn.SyncL2BatchNorm`
``"none"``              ``nn.Identity`` (no normalization)
======================  ===========================================================
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn

from .modules import l2_layer_for_dim
from .sync import SyncL2BatchNorm

__all__ = ["get_norm_layer", "create_norm", "NORM_NAMES"]

_ALIASES = {
    "bn": "bn", "batchnorm": "bn", "batch_norm": "bn",
    "l2bn": "l2bn", "l2": "l2bn", "l2_bn": "l2bn", "l2batchnorm": "l2bn",
    "l2bn-rms": "l2bn-rms", "l2bn_rms": "l2bn-rms",
    "syncbn": "syncbn", "sync-bn": "syncbn",
    "sync-l2bn": "sync-l2bn", "syncl2bn": "sync-l2bn", "sync_l2bn": "sync-l2bn",
    "none": "none", "identity": "none",
}
NORM_NAMES = ("bn", "l2bn", "l2bn-rms", "syncbn", "sync-l2bn", "none")


def _identity(num_features: int, **kwargs: Any) -> nn.Module:
    return nn.Identity()


def get_norm_layer(name: str, dim: int = 2, **kwargs: Any) -> Callable[..., nn.Module]:
    """Return a constructor ``f(num_features) -> nn.Module`` for norm ``name`` and input ``dim``.

    Args:
        name: one of ``bn``, ``l2bn``, ``l2bn-rms``, ``syncbn``, ``sync-l2bn``, ``none``
            (case-insensitive; common aliases accepted).
        dim: 1, 2 or 3, as in ``BatchNorm{dim}d``.
        **kwargs: default keyword arguments of the layer (``eps``, ``momentum``, ...).

    Example:
        >>> from l2bn import get_norm_layer
        >>> norm = get_norm_layer("l2bn")
        >>> type(norm(16)).__name__
        'L2BatchNorm2d'
    """
    key = _ALIASES.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown norm layer {name!r}; choose one of {', '.join(NORM_NAMES)}")
    if dim not in (1, 2, 3):
        raise ValueError(f"norm layer dim must be 1, 2 or 3, got {dim}")
    if key == "bn":
        cls: Callable[..., nn.Module] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
    elif key == "l2bn":
        cls = l2_layer_for_dim(dim)
    elif key == "l2bn-rms":
        cls = l2_layer_for_dim(dim)
        kwargs = {"unit_rms": True, **kwargs}
    elif key == "syncbn":
        cls = nn.SyncBatchNorm
    elif key == "sync-l2bn":
        cls = SyncL2BatchNorm
    else:
        cls = _identity
    return functools.partial(cls, **kwargs) if kwargs else cls


def create_norm(name: str, num_features: int, dim: int = 2, **kwargs: Any) -> nn.Module:
    """Build the norm layer ``name`` for ``num_features`` channels (see :func:`get_norm_layer`).

    Example:
        >>> from l2bn import create_norm
        >>> type(create_norm("bn", 8)).__name__
        'BatchNorm2d'
    """
    return get_norm_layer(name, dim, **kwargs)(num_features)
