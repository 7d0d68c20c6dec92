"""A string-keyed model registry (timm-style)."""

from __future__ import annotations

import math
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence

from torch import nn

from ..io import BadInput

MODELS: Dict[str, Callable[..., nn.Module]] = {}
#: the options of :func:`build_model` each model takes (declared where it is registered)
TAKES: Dict[str, FrozenSet[str]] = {}
OPTIONS = ("width", "bn_eps", "bn_momentum", "in_features")


def register_model(name: str, takes: Iterable[str] = ()) -> Callable:
    """Decorator: register a builder ``f(num_classes, in_channels, norm, **kw) -> nn.Module``
    that also takes the :func:`build_model` options named in ``takes`` (of :data:`OPTIONS`:
    ``width``, ``bn_eps``, ``bn_momentum``; ``in_features``, set from the input shape)."""
    takes = frozenset(takes)
    if not takes <= set(OPTIONS):
        raise ValueError(f"model {name!r}: unknown options {sorted(takes - set(OPTIONS))}")

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = fn
        TAKES[name] = takes
        return fn

    return deco


def list_models() -> List[str]:
    """Names of all registered models."""
    return sorted(MODELS)


def create_model(
    name: str, num_classes: int = 10, in_channels: int = 3, norm: str = "bn", **kwargs
) -> nn.Module:
    """Build model ``name`` with ``norm`` layers (``"bn"``, ``"l2bn"``, ``"none"``, ...).

    Raises:
        ValueError: unknown model name (the message lists the known ones).
    """
    if name not in MODELS:
        raise BadInput(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, norm=norm, **kwargs)


def build_model(
    name: str,
    norm: str,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    width: int = 1,
    sync: bool = False,
    bn_eps: Optional[float] = None,
    bn_momentum: Optional[float] = None,
) -> nn.Module:
    """Build model ``name`` for a dataset with ``num_classes`` classes and inputs of
    ``input_shape`` (``(C, H, W)`` or ``(F,)``); ``sync`` asks the factory for the synchronised
    twin of ``norm`` (``l2bn`` → ``sync-l2bn``).

    Example:
        >>> m = build_model("mlp", "l2bn", num_classes=10, input_shape=(1, 8, 8))
        >>> type(m.body[1]).__name__
        'L2BatchNorm1d'
    """
    from ..factory import canonical_norm

    if name not in MODELS:
        raise BadInput(f"unknown model {name!r}; available: {', '.join(list_models())}")
    kw: Dict[str, object] = {}
    if "in_features" in TAKES[name]:
        kw["in_features"] = int(math.prod(input_shape))
    for key, val, default in (
        ("width", width, 1),
        ("bn_eps", bn_eps, None),
        ("bn_momentum", bn_momentum, None),
    ):
        if val == default:
            continue
        if key not in TAKES[name]:
            takers = ", ".join(m for m in list_models() if key in TAKES[m])
            raise BadInput(f"{key} is only taken by {takers}; not by {name!r}")
        kw[key] = val
    return create_model(name, num_classes, int(input_shape[0]), canonical_norm(norm, sync), **kw)
