"""The one table of L2BN backends used by :func:`l2bn.functional.l2_batch_norm`.

Every backend is a callable with one signature, that of :data:`BackendFn` — the arguments of
:func:`l2bn.functional.l2_batch_norm` after validation; it returns the output and updates the
running statistics in place as BN does:

* ``"reference"`` — the composite ``F.batch_norm(F.normalize(x))``
  (:func:`l2bn.kernels.reference.reference_backend`);
* ``"fused"`` — one-pass statistics and fused backward with ATen ops
  (:func:`l2bn.kernels.fused.l2_batch_norm_fast`);
* ``"compiled"`` — the fused algorithm compiled by ``torch.compile``; registers itself from
  :mod:`l2bn.kernels.compiled`.

Each entry also says whether it can run on a given input and, for automatic selection, whether
it should.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from .fused import l2_batch_norm_fast
from .reference import reference_backend

__all__ = ["Backend", "BackendFn", "register", "available_backends", "select", "get"]

#: ``fn(input, running_mean, running_var, weight, bias, training, momentum, eps, l2_eps,
#: unit_rms, process_group) -> output``
BackendFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Backend:
    """A registered backend: the function, why it cannot run on an input (``None``: it can),
    and optionally whether automatic selection should use it for an input."""

    fn: BackendFn
    unavailable: Callable[[Tensor], Optional[str]]
    prefer: Optional[Callable[[Tensor], bool]] = None


def _always(x: Any) -> Optional[str]:
    return None


_REGISTRY: Dict[str, Backend] = {
    "reference": Backend(reference_backend, _always),
    "fused": Backend(l2_batch_norm_fast, _always),
}
_AUTO_ORDER: List[str] = ["fused"]
_warned: set = set()


def register(
    name: str,
    fn: BackendFn,
    unavailable_reason: Callable[[Tensor], Optional[str]] = _always,
    *,
    auto_priority: Optional[int] = None,
    prefer: Optional[Callable[[Tensor], bool]] = None,
) -> None:
    """Register backend ``name``; with ``auto_priority`` automatic selection tries it at that
    position, for the inputs where ``prefer(x)`` is true."""
    _REGISTRY[name] = Backend(fn, unavailable_reason, prefer)
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


def get(name: str) -> BackendFn:
    """The function of backend ``name`` (``KeyError`` if there is none).

    Example:
        >>> get("fused").__name__
        'l2_batch_norm_fast'
    """
    return _REGISTRY[name].fn


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
        reason = _REGISTRY[name].unavailable(x)
        if reason is not None:
            raise RuntimeError(f"L2BN backend {name!r} is not available: {reason}")
        return name
    for cand in _AUTO_ORDER:
        entry = _REGISTRY[cand]
        if entry.prefer is not None and not entry.prefer(x):
            continue
        reason = entry.unavailable(x)
        if reason is None:
            return cand
        key = (cand, reason)
        if key not in _warned and not torch.compiler.is_compiling():  # dynamo cannot trace warn
            _warned.add(key)
            warnings.warn(
                f"L2BN backend {cand!r} unavailable ({reason}); falling back", stacklevel=3
            )
    return "fused"
