"""Forward hooks that record what the paper's argument is about, with bounded memory.

:class:`NormInputProbe` records, for every normalization layer, the l2 norm of each sample of
the layer's *input* (before any l2 step), as streaming statistics: count, mean, std, min, max
and a histogram of log10(norm). :class:`FeatureProbe` captures the penultimate features (the
input of the classifier, or of a named layer). Both remove their hooks on exit.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from ..io import BadInput

HIST_RANGE = (-4.0, 4.0)  # log10(norm)
HIST_BINS = 80
MIN_HIST_SPAN = 0.01  # log10 units: a histogram of equal norms still has a width


def norm_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """All batch-norm-like layers (BN, SyncBN, L2BN, timm norm-act) in forward-definition order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _NormBase)]


class _Stream:
    """Streaming moments (float64, Chan's merge) plus a log10 histogram whose range is that of
    the data (the log norms are kept: one float per sample)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.logs: List[Tensor] = []

    def update(self, v: Tensor) -> None:
        v = v.detach().double().cpu()
        nb = v.numel()
        if nb == 0:
            return
        mb = float(v.mean())
        m2b = float(((v - mb) ** 2).sum())
        delta = mb - self.mean
        tot = self.n + nb
        self.mean += delta * nb / tot
        self.m2 += m2b + delta * delta * self.n * nb / tot
        self.n = tot
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))
        self.logs.append(torch.log10(v.clamp_min(1e-30)).flatten())

    def summary(self) -> Dict[str, object]:
        std = math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0
        return {
            "count": self.n,
            "mean": self.mean,
            "std": std,
            "cv": std / self.mean if self.mean > 0 else float("nan"),
            "min": self.min,
            "max": self.max,
            "max_min_ratio": self.max / self.min if self.min > 0 else float("inf"),
            **self._histogram(),
        }

    def _histogram(self) -> Dict[str, object]:
        """``HIST_BINS`` bins over the data's log10 range widened by 5 % on each side (at least
        ``MIN_HIST_SPAN`` wide, centred on the data): a narrow spike stays readable."""
        logs = torch.cat(self.logs) if self.logs else torch.zeros(0, dtype=torch.float64)
        if logs.numel() == 0:
            return {"hist_log10": [0.0] * HIST_BINS, "hist_range": list(HIST_RANGE)}
        lo, hi = float(logs.min()), float(logs.max())
        pad = max((hi - lo) * 0.05, (MIN_HIST_SPAN - (hi - lo)) / 2, 0.0)
        lo, hi = lo - pad, hi + pad
        return {"hist_log10": torch.histc(logs, HIST_BINS, lo, hi).tolist(), "hist_range": [lo, hi]}


class NormInputProbe:
    """Context manager recording per-sample input norms at every normalization layer.

    Example:
        >>> import torch, l2bn
        >>> from l2bn.models import create_model
        >>> net = create_model("resnet8", 10, 1, "l2bn").eval()
        >>> with NormInputProbe(net) as probe:
        ...     _ = net(torch.randn(4, 1, 28, 28))
        >>> s = probe.summary()
        >>> len(s) == len(norm_layers(net)), s["bn1"]["count"]
        (True, 4)
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = norm_layers(model)
        if not self.layers:
            raise BadInput(f"{type(model).__name__} has no normalization layers to probe")
        self.stats: Dict[str, _Stream] = {n: _Stream() for n, _ in self.layers}
        self.kinds = {n: type(m).__name__ for n, m in self.layers}
        self._handles: list = []

    def __enter__(self) -> NormInputProbe:
        for name, m in self.layers:
            self._handles.append(m.register_forward_pre_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def fn(mod: nn.Module, args: tuple) -> None:
            x = args[0]
            self.stats[name].update(torch.linalg.vector_norm(x.detach().float().flatten(1), dim=1))

        return fn

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def summary(self) -> Dict[str, Dict[str, object]]:
        return {n: {"layer_type": self.kinds[n], **s.summary()} for n, s in self.stats.items()}


class FeatureProbe:
    """Capture the input of ``layer`` (default: the model's last ``nn.Linear``) for each batch."""

    def __init__(
        self, model: nn.Module, layer: Optional[str] = None, max_items: int = 100_000
    ) -> None:
        mods = dict(model.named_modules())
        if layer is None:
            linears = [n for n, m in mods.items() if isinstance(m, nn.Linear)]
            if not linears:
                raise BadInput(
                    "no nn.Linear classifier found; pass layer= the name of the layer whose input "
                    "to capture"
                )
            layer = linears[-1]
        if layer not in mods:
            raise BadInput(f"no layer named {layer!r} in the model")
        self.layer, self.module, self.max_items = layer, mods[layer], max_items
        self.feats: List[Tensor] = []
        self._n = 0
        self._handle = None

    def __enter__(self) -> FeatureProbe:
        def fn(mod: nn.Module, args: tuple) -> None:
            if self._n < self.max_items:
                f = args[0].detach().float().flatten(1).cpu()
                self.feats.append(f[: self.max_items - self._n])
                self._n += len(self.feats[-1])

        self._handle = self.module.register_forward_pre_hook(fn)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def features(self) -> Tensor:
        return torch.cat(self.feats) if self.feats else torch.empty(0)
