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
all go through :func:`canonical_norm` / :func:`get_norm_layer`, and a new name is one entry of
:data:`NORMS` (layer, defaults, twin, aliases, plot colour).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

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
    "NORMS",
    "Norm",
]


@dataclass(frozen=True)
class Norm:
    """One norm name: its layer class for an input dim (1, 2, 3), default keyword arguments, the
    synchronised twin, the other spellings accepted, and its colour in the reports' plots."""

    layer: Callable[[int], Callable[..., nn.Module]]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    sync: Optional[str] = None
    aliases: Tuple[str, ...] = ()
    color: str = "tab:gray"


def _identity(num_features: int, **kwargs: Any) -> nn.Module:
    return nn.Identity()


_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_RMS = {"unit_rms": True}

#: The norm names, in the order the CLI and the reports list them: the one place a norm is added.
NORMS: Dict[str, Norm] = {
    "bn": Norm(
        _BN.__getitem__, sync="syncbn", aliases=("batchnorm", "batch_norm"), color="tab:blue"
    ),
    "l2bn": Norm(
        l2_layer_for_dim, sync="sync-l2bn", aliases=("l2", "l2_bn", "l2batchnorm"), color="tab:red"
    ),
    "l2bn-rms": Norm(
        l2_layer_for_dim, _RMS, sync="sync-l2bn-rms", aliases=("l2bn_rms",), color="tab:orange"
    ),
    "syncbn": Norm(lambda d: nn.SyncBatchNorm, aliases=("sync-bn",), color="tab:blue"),
    "sync-l2bn": Norm(
        lambda d: SyncL2BatchNorm, aliases=("syncl2bn", "sync_l2bn"), color="tab:red"
    ),
    "sync-l2bn-rms": Norm(
        lambda d: SyncL2BatchNorm, _RMS, aliases=("sync_l2bn_rms",), color="tab:orange"
    ),
    "none": Norm(lambda d: _identity, aliases=("identity",)),
}
_ALIASES = {a: name for name, n in NORMS.items() for a in (name, *n.aliases)}
NORM_NAMES = tuple(NORMS)
#: every accepted spelling (case-insensitive), canonical names first
NORM_ALIASES = NORM_NAMES + tuple(a for a in _ALIASES if a not in NORM_NAMES)
_SYNC = {name: n.sync for name, n in NORMS.items() if n.sync}
_BASE = {v: k for k, v in _SYNC.items()}


def canonical_norm(name: str, sync: bool = False) -> str:
    """The canonical name of norm ``name`` (aliases resolved), its synchronised twin if ``sync``.

    Example:
        >>> canonical_norm("L2BN"), canonical_norm("l2bn-rms", sync=True)
        ('l2bn', 'sync-l2bn-rms')
        >>> canonical_norm("bn", sync=True)
        'syncbn'
    """
    low = str(name).lower()
    key = low if low in NORMS else _ALIASES.get(low)
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
    norm = NORMS[key]
    cls = norm.layer(dim)
    kwargs = {**norm.kwargs, **kwargs}
    return functools.partial(cls, **kwargs) if kwargs else cls


def create_norm(name: str, num_features: int, dim: int = 2, **kwargs: Any) -> nn.Module:
    """Build the norm layer ``name`` for ``num_features`` channels (see :func:`get_norm_layer`).

    Example:
        >>> from l2bn import create_norm
        >>> type(create_norm("bn", 8)).__name__
        'BatchNorm2d'
    """
    return get_norm_layer(name, dim, **kwargs)(num_features)
