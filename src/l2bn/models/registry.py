"""A string-keyed model registry (timm-style)."""

from __future__ import annotations

from typing import Callable, Dict, List

from torch import nn

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
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, norm=norm, **kwargs)
