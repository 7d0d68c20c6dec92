"""A string-keyed model registry (timm-style)."""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

from torch import nn

from ..io import BadInput

MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable:
    """Decorator: register a builder ``f(num_classes, in_channels, norm, **kw) -> nn.Module``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = fn
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

    kw: Dict[str, object] = {}
    if name == "mlp":
        kw["in_features"] = int(math.prod(input_shape))
    if width != 1:
        if not name.startswith("resnet"):
            raise BadInput(
                f"width={width} is only supported by the CIFAR ResNets (resnet8 ... resnet110), "
                f"not {name!r}"
            )
        kw["width"] = width
    for key, val in (("bn_eps", bn_eps), ("bn_momentum", bn_momentum)):
        if val is not None:
            if not name.startswith("dcase-"):
                raise BadInput(f"{key} is only taken by the dcase-* models, not {name!r}")
            kw[key] = val
    return create_model(name, num_classes, int(input_shape[0]), canonical_norm(norm, sync), **kw)
