"""Backend registry for :func:`l2bn.functional.l2_batch_norm`.

A backend is a callable with the signature of :func:`l2bn.kernels.fused.fused_l2_batch_norm`.
``"reference"`` and ``"fused"`` are always available; others register themselves with
:func:`register` and say whether they can run on a given input.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, List, Optional, Tuple

from torch import Tensor

__all__ = ["register", "available_backends", "select", "get"]

# name -> (function, availability check on an input; returns None if usable, else the reason)
_REGISTRY: Dict[str, Tuple[Optional[Callable], Callable[[Tensor], Optional[str]]]] = {
    "reference": (None, lambda x: None),
    "fused": (None, lambda x: None),
}
_AUTO_ORDER: List[str] = ["fused"]
# name -> whether automatic selection should use it for this input (when available)
_PREFER: Dict[str, Callable[[Tensor], bool]] = {}
_warned: set = set()


def register(
    name: str,
    fn: Callable,
    unavailable_reason: Callable[[Tensor], Optional[str]],
    *,
    auto_priority: Optional[int] = None,
    prefer: Optional[Callable[[Tensor], bool]] = None,
) -> None:
    """Register backend ``name``; with ``auto_priority`` automatic selection tries it at that
    position, for the inputs where ``prefer(x)`` is true."""
    _REGISTRY[name] = (fn, unavailable_reason)
    if prefer is not None:
        _PREFER[name] = prefer
    if auto_priority is not None and name not in _AUTO_ORDER:
        _AUTO_ORDER.insert(auto_priority, name)


def available_backends() -> List[str]:
    """Names of all registered backends (usable or not on a given device).

    Example:
        >>> from l2bn.functional import available_backends
        >>> "reference" in available_backends() and "fused" in available_backends()
        True
    """
    return list(_REGISTRY)


def get(name: str) -> Callable:
    fn = _REGISTRY[name][0]
    if fn is None:
        raise KeyError(name)
    return fn


def select(requested: Optional[str], x: Tensor) -> str:
    """Resolve the backend for input ``x``: argument, else ``$L2BN_BACKEND``, else automatic.

    An explicitly requested backend that cannot run raises ``RuntimeError`` with the reason;
    automatic selection skips unusable ones and warns once per reason.
    """
    name = requested if requested is not None else os.environ.get("L2BN_BACKEND") or None
    if name is not None and name != "auto":
        if name not in _REGISTRY:
            raise ValueError(
                f"unknown L2BN backend {name!r}; choose one of {sorted(_REGISTRY)} or 'auto'"
            )
        reason = _REGISTRY[name][1](x)
        if reason is not None:
            raise RuntimeError(f"L2BN backend {name!r} is not available: {reason}")
        return name
    for cand in _AUTO_ORDER:
        if cand in _PREFER and not _PREFER[cand](x):
            continue
        reason = _REGISTRY[cand][1](x)
        if reason is None:
            return cand
        key = (cand, reason)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"L2BN backend {cand!r} unavailable ({reason}); falling back", stacklevel=3
            )
    return "fused"
