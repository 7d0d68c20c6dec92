"""String-keyed norm-layer factory, so model code can take ``norm="bn" | "l2bn" | ...``.

======================  ===========================================================
name                    layer
======================  ===========================================================
``"bn"``                ``nn.BatchNorm{1,2,3}d``
``"l2bn"``              :class:`l2bn.L2BatchNorm{1,2,3}d` (the paper's formula)
``"l2bn-rms"``          L2BN with ``unit_rms=True``
``"syncbn"``            ``nn.SyncBatchNorm``
``"sync-l2bn"``         :class:`l2bn.SyncL2BatchNorm`
``"sync-l2bn-rms"``     :class:`l2bn.SyncL2BatchNorm` with ``unit_rms=True``
``"none"``              ``nn.Identity`` (no normalization)
======================  ===========================================================

``sync=True`` maps each per-process name to its synchronised twin (``bn`` → ``syncbn``,
``l2bn`` → ``sync-l2bn``, ``l2bn-rms`` → ``sync-l2bn-rms``). This module is the only place
that interprets norm names: models, torchvision builders, the training engine and the reports
all go through :func:`canonical_norm` / :func:`get_norm_layer`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn

from .io import BadInput
from .modules import l2_layer_for_dim
from .sync import SyncL2BatchNorm

__all__ = [
    "get_norm_layer",
    "create_norm",
    "canonical_norm",
    "is_l2_norm",
    "base_norm",
    "NORM_NAMES",
]

_ALIASES = {
    "bn": "bn",
    "batchnorm": "bn",
    "batch_norm": "bn",
    "l2bn": "l2bn",
    "l2": "l2bn",
    "l2_bn": "l2bn",
    "l2batchnorm": "l2bn",
    "l2bn-rms": "l2bn-rms",
    "l2bn_rms": "l2bn-rms",
    "syncbn": "syncbn",
    "sync-bn": "syncbn",
    "sync-l2bn": "sync-l2bn",
    "syncl2bn": "sync-l2bn",
    "sync_l2bn": "sync-l2bn",
    "sync-l2bn-rms": "sync-l2bn-rms",
    "sync_l2bn_rms": "sync-l2bn-rms",
    "none": "none",
    "identity": "none",
}
NORM_NAMES = ("bn", "l2bn", "l2bn-rms", "syncbn", "sync-l2bn", "sync-l2bn-rms", "none")
#: every accepted spelling (case-insensitive), canonical names first
NORM_ALIASES = NORM_NAMES + tuple(a for a in _ALIASES if a not in NORM_NAMES)
_SYNC = {"bn": "syncbn", "l2bn": "sync-l2bn", "l2bn-rms": "sync-l2bn-rms"}
_BASE = {v: k for k, v in _SYNC.items()}


def canonical_norm(name: str, sync: bool = False) -> str:
    """The canonical name of norm ``name`` (aliases resolved), its synchronised twin if ``sync``.

    Example:
        >>> canonical_norm("L2BN"), canonical_norm("l2bn-rms", sync=True)
        ('l2bn', 'sync-l2bn-rms')
        >>> canonical_norm("bn", sync=True)
        'syncbn'
    """
    key = _ALIASES.get(str(name).lower())
    if key is None:
        raise BadInput(f"unknown norm layer {name!r}; choose one of {', '.join(NORM_NAMES)}")
    if sync:
        if key == "none":
            raise BadInput("norm 'none' has no synchronised version (drop --sync-bn)")
        key = _SYNC.get(key, key)
    return key


def base_norm(name: str) -> str:
    """The per-process name of a (possibly synchronised) norm: ``sync-l2bn`` → ``l2bn``."""
    key = canonical_norm(name)
    return _BASE.get(key, key)


def is_l2_norm(name: str) -> bool:
    """Whether norm ``name`` is an L2BN variant (synchronised or not)."""
    return base_norm(name).startswith("l2bn")


def _identity(num_features: int, **kwargs: Any) -> nn.Module:
    return nn.Identity()


def get_norm_layer(
    name: str, dim: int = 2, sync: bool = False, **kwargs: Any
) -> Callable[..., nn.Module]:
    """Return a constructor ``f(num_features) -> nn.Module`` for norm ``name`` and input ``dim``.

    Args:
        name: one of ``bn``, ``l2bn``, ``l2bn-rms``, ``syncbn``, ``sync-l2bn``,
            ``sync-l2bn-rms``, ``none`` (case-insensitive; common aliases accepted).
        dim: 1, 2 or 3, as in ``BatchNorm{dim}d``.
        sync: the synchronised twin of ``name`` (for DDP under ``torchrun``).
        **kwargs: default keyword arguments of the layer (``eps``, ``momentum``, ...).

    Example:
        >>> from l2bn import get_norm_layer
        >>> norm = get_norm_layer("l2bn")
        >>> type(norm(16)).__name__
        'L2BatchNorm2d'
    """
    key = canonical_norm(name, sync)
    if dim not in (1, 2, 3):
        raise ValueError(f"norm layer dim must be 1, 2 or 3, got {dim}")
    if key == "bn":
        cls: Callable[..., nn.Module] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[
            dim
        ]
    elif key == "l2bn":
        cls = l2_layer_for_dim(dim)
    elif key == "l2bn-rms":
        cls = l2_layer_for_dim(dim)
        kwargs = {"unit_rms": True, **kwargs}
    elif key == "syncbn":
        cls = nn.SyncBatchNorm
    elif key == "sync-l2bn":
        cls = SyncL2BatchNorm
    elif key == "sync-l2bn-rms":
        cls = SyncL2BatchNorm
        kwargs = {"unit_rms": True, **kwargs}
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
