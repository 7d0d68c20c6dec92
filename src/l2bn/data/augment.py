"""Batch augmentation on the training device (airbench style): no per-item workers.

``crop{P}-flip``: random crop after ``P``-pixel reflect padding, plus horizontal flip;
``none``: nothing. All randomness comes from the ``generator`` passed in, so a run is
reproducible and resumable epoch by epoch.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop(x: Tensor, pad: int, generator: Optional[torch.Generator]) -> Tensor:
    """Random ``pad``-pixel translation of each image (reflect padding, then crop)."""
    if pad <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(x.device)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # (n, h)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # (n, w)
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


def random_flip(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    flip = torch.rand(x.shape[0], generator=generator, device="cpu").to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_time_crop(x: Tensor, frames: int, generator: Optional[torch.Generator]) -> Tensor:
    """One random window of ``frames`` along the last (time) axis, per batch (Hu et al.)."""
    t = x.shape[-1]
    if frames >= t:
        return x
    start = int(torch.randint(0, t - frames + 1, (1,), generator=generator))
    return x[..., start:start + frames]


def transform(name: str, x: Tensor) -> Tensor:
    """Deterministic input transform applied to training and test batches."""
    if name == "none":
        return x
    if name == "deltas":
        from ..audio.features import stack_deltas

        return stack_deltas(x)
    raise ValueError(f"unknown input transform {name!r}; expected 'none' or 'deltas'")


def apply(name: str, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Apply augmentation ``name`` to a float batch ``x`` (N, C, H, W)."""
    if name == "none":
        return x
    t = re.fullmatch(r"tcrop(\d+)", name)
    if t:
        return random_time_crop(x, int(t.group(1)), generator)
    m = re.fullmatch(r"crop(\d+)(-flip)?", name)
    if not m:
        raise ValueError(f"unknown augmentation {name!r}; expected 'none', 'crop<P>[-flip]' or 'tcrop<F>'")
    x = random_crop(x, int(m.group(1)), generator)
    if m.group(2):
        x = random_flip(x, generator)
    return x
