"""Convert whole models between BatchNorm and L2BN: :func:`convert` and :func:`revert`.

Handles ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, subclasses that keep BN's forward, and
timm's norm-act layers (``BatchNormAct2d``, ``SyncBatchNormAct``: BN followed by ``drop`` and
``act`` submodules). Any other BN subclass with its own forward is refused with an error rather
than half-converted.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import L2BatchNorm1d, L2BatchNorm2d, L2BatchNorm3d, _L2NormBase
from .norm_act import L2BatchNormAct2d, SyncL2BatchNormAct
from .sync import SyncL2BatchNorm

__all__ = ["convert", "revert", "L2BatchNormAct2d", "SyncL2BatchNormAct"]

Selector = Union[str, Sequence[str], Callable[[str, nn.Module], bool], None]


_PLAIN = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_TIMM_NORM_ACT = {"BatchNormAct2d": False, "SyncBatchNormAct": True}  # class name -> is sync


def _is_timm_norm_act(m: nn.Module) -> bool:
    t = type(m)
    return t.__module__.startswith("timm.") and t.__name__ in _TIMM_NORM_ACT


def _bn_dim(m: _BatchNorm) -> Optional[int]:
    """1/2/3 for BatchNormNd (or a subclass keeping BN's forward), 0 for SyncBatchNorm-like,
    None for a subclass with its own forward (unsafe to convert)."""
    if isinstance(m, nn.SyncBatchNorm):
        return 0 if type(m).forward is nn.SyncBatchNorm.forward else None
    for cls, dim in _PLAIN.items():
        if isinstance(m, cls):
            return dim if type(m).forward is _BatchNorm.forward else None
    return None


def _matches(selector: Selector, name: str, module: nn.Module) -> bool:
    if callable(selector):
        return bool(selector(name, module))
    patterns = [selector] if isinstance(selector, str) else list(selector or [])
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


_RUNNING_STATS = ("reset", "keep")


def _has_statistics(m: nn.Module) -> bool:
    """Whether a layer's running statistics hold data (tracked batches or values other than the
    prior mean 0, variance 1) rather than a fresh layer's prior."""
    rm, rv, nbt = (
        getattr(m, b, None) for b in ("running_mean", "running_var", "num_batches_tracked")
    )
    if rm is None or rv is None or rm.is_meta:  # a meta model holds no values to lose
        return False
    return bool((nbt is not None and nbt > 0) or (rm != 0).any() or (rv != 1).any())


def _copy_state(src: nn.Module, dst: nn.Module, running_stats: str) -> nn.Module:
    """Copy (never alias) parameters, requires_grad flags and train/eval mode; the running
    statistics too with ``running_stats="keep"``, else ``dst`` keeps its fresh prior."""
    with torch.no_grad():
        for pname in ("weight", "bias"):
            sp, dp = getattr(src, pname, None), getattr(dst, pname, None)
            if sp is not None and dp is not None:
                dp.copy_(sp)
                dp.requires_grad_(sp.requires_grad)
        if running_stats == "keep":
            for bname in ("running_mean", "running_var", "num_batches_tracked"):
                sb = getattr(src, bname, None)
                if sb is not None:
                    setattr(dst, bname, sb.detach().clone())
    dst.train(src.training)
    return dst


def _check_running_stats(fn: str, running_stats: str) -> None:
    if running_stats not in _RUNNING_STATS:
        raise ValueError(f"{fn}: running_stats must be 'reset' or 'keep', got {running_stats!r}")


def _warn_reset(fn: str, names: list, what: str) -> None:
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        warnings.warn(
            f"l2bn.{fn}: reset the running statistics of {len(names)} layer(s) ({shown}): {what} "
            "Recalibrate before evaluating — l2bn.update_bn(loader, model) on a few batches, or "
            "train — or pass running_stats='keep' to copy them as they are.",
            stacklevel=3,
        )


def _ref_tensor(m: nn.Module) -> Optional[Tensor]:
    for t in (getattr(m, "weight", None), getattr(m, "running_mean", None)):
        if t is not None:
            return t
    return None


def _build(cls: type, src: _BatchNorm, extra: dict) -> nn.Module:
    ref = _ref_tensor(src)
    kw: dict = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
    if src.affine and getattr(src, "bias", None) is None:
        kw["bias"] = False  # torch >= 2.14 BN(affine=True, bias=False)
    return cls(
        src.num_features,
        src.eps,
        src.momentum,
        src.affine,
        src.track_running_stats,
        **kw,
        **extra,
    )


def convert(
    module: nn.Module,
    *,
    sync: bool = False,
    include: Selector = None,
    exclude: Selector = None,
    process_group: Any = None,
    unit_rms: bool = False,
    l2_eps: float = 1e-12,
    running_stats: str = "reset",
) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` by the matching L2BN layer.

    ``BatchNorm1d/2d/3d`` become ``L2BatchNorm1d/2d/3d`` (``SyncL2BatchNorm`` with
    ``sync=True``); ``SyncBatchNorm`` always becomes ``SyncL2BatchNorm``; timm's
    ``BatchNormAct2d`` / ``SyncBatchNormAct`` become :class:`L2BatchNormAct2d` /
    :class:`SyncL2BatchNormAct`, keeping their ``drop`` and ``act``. Weight and bias are copied
    (not aliased); device, dtype, ``requires_grad`` flags and train/eval mode are kept; the
    state-dict keys do not change.

    **Running statistics are reset** by default: BN's running mean and variance describe the
    layer's input :math:`x`, an L2BN layer's describe the l2-normalized :math:`u` (about
    :math:`1/\\sqrt{D}` and :math:`1/D` as large, :math:`D` entries per sample), so copied
    values would make evaluation wrong until well over a hundred training steps had replaced
    them. A warning names the layers whose accumulated statistics were dropped; recalibrate
    with :func:`l2bn.update_bn` (one pass over a few batches) or train before evaluating.

    Args:
        module: a model, or a single BN layer (then the new layer is returned).
        sync: produce :class:`l2bn.SyncL2BatchNorm` layers.
        include: only convert layers whose qualified name matches one of these
            :mod:`fnmatch` patterns (``"layer4.*"``), or for which ``include(name, module)`` is
            True. ``None``: all.
        exclude: never convert layers matching these patterns / this predicate.
        process_group: process group of the synced layers (``None``: world).
        unit_rms, l2_eps: passed to the new layers.
        running_stats: ``"reset"`` (default: the new layers start from the prior with
            ``num_batches_tracked = 0``, so their first training step sets the statistics) or
            ``"keep"`` (copy BN's values and count as they are — only meaningful if they were
            computed on L2BN's scale, e.g. to undo :func:`revert`).

    Returns:
        The converted module (converted in place; the root object is returned unless it is
        itself a BN layer).

    Raises:
        ValueError: a layer is matched by both ``include`` and ``exclude``.
        TypeError: a BN subclass with a custom forward that cannot be converted faithfully.

    Example:
        >>> import torchvision, l2bn
        >>> net = l2bn.convert(torchvision.models.resnet18())
        >>> type(net.bn1).__name__
        'L2BatchNorm2d'
    """
    _check_running_stats("convert", running_stats)
    found = [0]
    dropped: list = []

    def visit(mod: nn.Module, name: str) -> nn.Module:
        if isinstance(mod, _BatchNorm):
            inc = include is None or _matches(include, name, mod)
            exc = exclude is not None and _matches(exclude, name, mod)
            if include is not None and inc and exc:
                raise ValueError(
                    f"convert: layer {name or '<root>'!r} is matched by both include and exclude"
                )
            if inc and not exc:
                new = _convert_one(mod, name, sync, process_group, unit_rms, l2_eps, running_stats)
                if running_stats == "reset" and _has_statistics(mod):
                    dropped.append(name or "<root>")
                found[0] += 1
                return new
            found[0] += 1  # a BN that was deliberately kept still counts as present
            return mod
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            new_child = visit(child, full)
            if new_child is not child:
                setattr(mod, child_name, new_child)
        return mod

    out = visit(module, "")
    _warn_reset("convert", dropped, "BN's statistics describe x, L2BN's the l2-normalized x.")
    if found[0] == 0:
        warnings.warn(
            f"l2bn.convert: no BatchNorm layer found in {type(module).__name__}; "
            "returned unchanged",
            stacklevel=2,
        )
    return out


def _convert_one(
    mod: _BatchNorm,
    name: str,
    sync: bool,
    process_group: Any,
    unit_rms: bool,
    l2_eps: float,
    running_stats: str,
) -> nn.Module:
    extra: dict = dict(unit_rms=unit_rms, l2_eps=l2_eps)
    if _is_timm_norm_act(mod):
        is_sync = _TIMM_NORM_ACT[type(mod).__name__] or sync
        cls = SyncL2BatchNormAct if is_sync else L2BatchNormAct2d
        extra.update(drop=copy.deepcopy(mod.drop), act=copy.deepcopy(mod.act))
    else:
        dim = _bn_dim(mod)
        if dim is None:
            raise TypeError(
                f"convert: {name or '<root>'} is a {type(mod).__module__}.{type(mod).__name__}, a "
                "BatchNorm subclass with its own forward; converting it would drop that forward. "
                "Exclude it (exclude=...) or convert it by hand."
            )
        cls = (
            SyncL2BatchNorm
            if (sync or dim == 0)
            else {1: L2BatchNorm1d, 2: L2BatchNorm2d, 3: L2BatchNorm3d}[dim]
        )
    if cls in (SyncL2BatchNorm, SyncL2BatchNormAct):
        extra["process_group"] = process_group
    new = _copy_state(mod, _build(cls, mod, extra), running_stats)
    new._l2bn_source = type(mod)  # remembered for revert()
    return new


_REVERT_DEFAULT = {
    L2BatchNorm1d: nn.BatchNorm1d,
    L2BatchNorm2d: nn.BatchNorm2d,
    L2BatchNorm3d: nn.BatchNorm3d,
    SyncL2BatchNorm: nn.SyncBatchNorm,
}


def revert(module: nn.Module, *, running_stats: str = "reset") -> nn.Module:
    """Turn L2BN layers back into BatchNorm layers with their parameters (inverse of
    :func:`convert`).

    A layer made by :func:`convert` becomes its original class again (including timm's
    norm-act layers, with their ``drop``/``act``); a layer built directly becomes the matching
    ``nn.BatchNorm*d`` (``nn.SyncBatchNorm`` for :class:`l2bn.SyncL2BatchNorm`). As in
    :func:`convert`, running statistics (on the l2-normalized scale) are reset unless
    ``running_stats="keep"``, with a warning naming the layers whose statistics were dropped.

    Example:
        >>> import torch, l2bn
        >>> net = l2bn.revert(l2bn.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(4))))
        >>> type(net[0]).__name__
        'BatchNorm2d'
    """
    _check_running_stats("revert", running_stats)
    dropped: list = []
    out = _revert(module, "", running_stats, dropped)
    _warn_reset("revert", dropped, "L2BN's statistics describe the l2-normalized x, BN's x.")
    return out


def _revert(module: nn.Module, name: str, running_stats: str, dropped: list) -> nn.Module:
    if isinstance(module, _L2NormBase):
        if running_stats == "reset" and _has_statistics(module):
            dropped.append(name or "<root>")
        src = getattr(module, "_l2bn_source", None)
        if src is None:
            src = next(b for a, b in _REVERT_DEFAULT.items() if isinstance(module, a))
        extra: dict = {}
        if isinstance(module, SyncL2BatchNorm) and issubclass(src, nn.SyncBatchNorm):
            extra["process_group"] = module.process_group
        new = _build(src, module, extra)
        if hasattr(module, "act") and hasattr(new, "act"):
            new.drop = copy.deepcopy(module.drop)
            new.act = copy.deepcopy(module.act)
        return _copy_state(module, new, running_stats)
    for child_name, child in list(module.named_children()):
        new_child = _revert(
            child, f"{name}.{child_name}" if name else child_name, running_stats, dropped
        )
        if new_child is not child:
            setattr(module, child_name, new_child)
    return module
