"""Batch augmentation on the training device (airbench style): no per-item workers.

Augmentation names understood by :func:`apply` (join several with ``+``; they run left to right):

``none``                nothing
``crop{P}[-flip]``      random crop after ``P``-pixel reflect padding, plus horizontal flip (images)
``tcrop{F}``            one random window of ``F`` frames along time for the whole batch
``tcrop{F}-each``       an independent random window of ``F`` frames per sample (Hu et al.)
``specaug{Fm}x{Tm}``    SpecAugment as Hu et al.: per sample and channel one frequency mask of
                        0..``Fm`` bins and one time mask of 0..``Tm`` frames, set to 0

The DCASE 2020 recipes of Hu et al. (and of the L2BN authors' code) are, per training step:
``specaug12x39+tcrop400-each`` on ``2 x batch`` clips (FCNN, fsFCNN; ``tcrop400-each`` for the
ResNet), then :func:`mixup_pairs` (the first half mixed with the second, one lambda per sample)
and :func:`mixup_cross_entropy`; :func:`pair_batch_indices` draws the ``2 x batch`` clips.

All randomness comes from the ``generator`` passed in, so a run is reproducible and resumable
epoch by epoch.
"""

from __future__ import annotations

import re
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..io import BadInput


def random_crop(x: Tensor, pad: int, generator: Optional[torch.Generator]) -> Tensor:
    """Random ``pad``-pixel translation of each image (reflect padding, then crop)."""
    if pad <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(x.device)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)[None, :]  # (n, h)
    cols = dx[:, None] + torch.arange(w, device=x.device)[None, :]  # (n, w)
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


def random_flip(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    flip = torch.rand(x.shape[0], generator=generator, device="cpu").to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_time_crop(x: Tensor, frames: int, generator: Optional[torch.Generator]) -> Tensor:
    """One random window of ``frames`` along the last (time) axis, the same for the whole batch
    (Hu et al. crop every clip independently: :func:`per_sample_time_crop`)."""
    t = x.shape[-1]
    if frames >= t:
        return x
    start = int(torch.randint(0, t - frames + 1, (1,), generator=generator))
    return x[..., start : start + frames]


def _draw(generator: Optional[torch.Generator], *shape: int) -> Tensor:
    """Uniform [0, 1) draws on the CPU from ``generator`` (device-independent streams)."""
    return torch.rand(shape, generator=generator, device="cpu", dtype=torch.float64)


def spec_augment(
    x: Tensor,
    freq_mask_max: int,
    time_mask_max: int,
    generator: Optional[torch.Generator],
    value: float = 0.0,
) -> Tensor:
    """SpecAugment as in Hu et al.'s DCASE 2020 generator (``funcs.frequency_masking`` /
    ``time_masking``, one mask each), for every sample **and every channel** independently.

    For ``x`` of shape ``(N, C, F, T)``: a frequency mask of width ``f ~ U{0..freq_mask_max}``
    starting at ``f0 ~ U{0..F-f-1}`` and a time mask of width ``t ~ U{0..time_mask_max}`` starting
    at ``t0 ~ U{0..T-t-1}`` are set to ``value`` (Python's ``randrange(0, 13)`` and
    ``randrange(0, F - f)``: the authors' ``frequency_masking_para=13`` is ``freq_mask_max=12``,
    ``time_masking_para=40`` is ``time_mask_max=39``). Width 0 masks nothing. Returns a new tensor.

    Example:
        >>> x = torch.ones(2, 3, 128, 423)
        >>> y = spec_augment(x, 12, 39, torch.Generator().manual_seed(0))
        >>> bool((y == 0).any()), y.shape
        (True, torch.Size([2, 3, 128, 423]))
    """
    if x.dim() != 4:
        raise ValueError(f"spec_augment expects (N, C, freq, time), got shape {tuple(x.shape)}")
    n, c, nf, nt = x.shape
    if not (0 <= freq_mask_max < nf and 0 <= time_mask_max < nt):
        raise ValueError(
            f"mask widths must be in [0, {nf - 1}] bins and [0, {nt - 1}] frames, "
            f"got {freq_mask_max} and {time_mask_max}"
        )
    f = (_draw(generator, n, c) * (freq_mask_max + 1)).floor().long()
    f0 = (_draw(generator, n, c) * (nf - f)).floor().long()
    t = (_draw(generator, n, c) * (time_mask_max + 1)).floor().long()
    t0 = (_draw(generator, n, c) * (nt - t)).floor().long()
    f, f0, t, t0 = (v.to(x.device)[:, :, None] for v in (f, f0, t, t0))
    bins = torch.arange(nf, device=x.device)[None, None, :]
    frames = torch.arange(nt, device=x.device)[None, None, :]
    fmask = (bins >= f0) & (bins < f0 + f)  # (N, C, F)
    tmask = (frames >= t0) & (frames < t0 + t)  # (N, C, T)
    return x.masked_fill(fmask[..., None] | tmask[:, :, None, :], value)


def per_sample_time_crop(
    x: Tensor, frames: int, generator: Optional[torch.Generator], include_last_offset: bool = False
) -> Tensor:
    """An independent random window of ``frames`` along the last (time) axis for every sample.

    Start offsets follow Hu et al.'s ``np.random.randint(0, T - frames)``: uniform on
    ``0 .. T - frames - 1`` (the last offset is never drawn; ``include_last_offset=True`` allows
    it). Inputs with at most ``frames`` frames are returned unchanged.

    Example:
        >>> x = torch.arange(10.0).expand(3, 1, 2, 10)
        >>> per_sample_time_crop(x, 4, torch.Generator().manual_seed(0)).shape
        torch.Size([3, 1, 2, 4])
    """
    t = x.shape[-1]
    if frames >= t:
        return x
    span = t - frames + (1 if include_last_offset else 0)
    start = (_draw(generator, x.shape[0]) * span).floor().long().to(x.device)
    idx = start[:, None] + torch.arange(frames, device=x.device)[None, :]  # (N, frames)
    idx = idx.view(x.shape[0], *([1] * (x.dim() - 2)), frames).expand(*x.shape[:-1], frames)
    return torch.gather(x, -1, idx)


def _beta(alpha: float, n: int, generator: Optional[torch.Generator]) -> Tensor:
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device="cpu"))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, n))


def mixup_pairs(
    x: Tensor,
    y: Tensor,
    alpha: float,
    generator: Optional[torch.Generator],
    x2: Optional[Tensor] = None,
    y2: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mixup as in Hu et al.'s generator: partners come from a *second set of clips* and every
    sample has its own ``lambda ~ Beta(alpha, alpha)``.

    Without ``x2``/``y2``, ``x`` holds ``2B`` clips: the first ``B`` are mixed with the last ``B``
    (the authors draw 64 clips for a batch of 32). Returns ``(x_mix, y1, y2, lam)`` with
    ``x_mix = lam * x1 + (1 - lam) * x2`` (``lam`` broadcast over the non-batch dims) and ``lam``
    of shape ``(B,)``, in ``x``'s dtype; train with :func:`mixup_cross_entropy`.

    Example:
        >>> x, y = torch.randn(8, 3, 4, 5), torch.arange(8) % 3
        >>> xm, y1, y2, lam = mixup_pairs(x, y, 0.4, torch.Generator().manual_seed(0))
        >>> xm.shape, lam.shape, bool(torch.equal(y1, y[:4]) and torch.equal(y2, y[4:]))
        (torch.Size([4, 3, 4, 5]), torch.Size([4]), True)
    """
    if (x2 is None) != (y2 is None):
        raise ValueError("give both x2 and y2, or neither")
    if x2 is None:
        if x.shape[0] % 2:
            raise ValueError(
                f"mixup_pairs without partners needs an even number of clips (2 x batch), got "
                f"{x.shape[0]}"
            )
        b = x.shape[0] // 2
        x, x2, y, y2 = x[:b], x[b:], y[:b], y[b:]
    if x2.shape != x.shape or y2.shape != y.shape:
        raise ValueError(
            f"partner shapes {tuple(x2.shape)}/{tuple(y2.shape)} differ from "
            f"{tuple(x.shape)}/{tuple(y.shape)}"
        )
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    lam = _beta(alpha, x.shape[0], generator).to(
        device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32
    )
    lb = lam.view(-1, *([1] * (x.dim() - 1)))
    return lb * x + (1 - lb) * x2, y, y2, lam


def mixup_cross_entropy(
    logits: Tensor, y1: Tensor, y2: Tensor, lam: Tensor, label_smoothing: float = 0.0
) -> Tensor:
    """``mean_i [lam_i CE(logits_i, y1_i) + (1 - lam_i) CE(logits_i, y2_i)]`` -- equal to the
    cross-entropy against the soft targets ``lam * onehot(y1) + (1 - lam) * onehot(y2)`` that the
    Keras recipe trains on (Keras also clips probabilities to [1e-7, 1 - 1e-7]; not done here).

    Example:
        >>> logits = torch.randn(4, 3)
        >>> y1, y2 = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2])
        >>> lam = torch.tensor([0.2, 0.5, 1.0, 0.0])
        >>> soft = lam[:, None] * F.one_hot(y1, 3) + (1 - lam[:, None]) * F.one_hot(y2, 3)
        >>> loss = mixup_cross_entropy(logits, y1, y2, lam)
        >>> bool(torch.allclose(loss, F.cross_entropy(logits, soft)))
        True
    """
    lam = lam.to(torch.float32)
    a = F.cross_entropy(logits.float(), y1, reduction="none", label_smoothing=label_smoothing)
    b = F.cross_entropy(logits.float(), y2, reduction="none", label_smoothing=label_smoothing)
    return (lam * a + (1 - lam) * b).mean()


def pair_batch_indices(
    n: int, batch_size: int, steps: int, generator: Optional[torch.Generator]
) -> Tensor:
    """``(steps, 2 * batch_size)`` clip indices for mixup with partners from a second set of clips.

    Consecutive shuffled passes over the ``n`` clips are concatenated and cut into groups of
    ``2 * batch_size`` (row ``s``: the clips of step ``s``; :func:`mixup_pairs` mixes its first
    half with its second). With the authors' ``steps = ceil(n / batch_size)`` an epoch is about
    two passes over the training set, as in their generator (437 steps x 64 clips for 13,965).

    Example:
        >>> idx = pair_batch_indices(10, 2, 5, torch.Generator().manual_seed(0))
        >>> idx.shape, sorted(idx.flatten()[:10].tolist()) == list(range(10))
        (torch.Size([5, 4]), True)
    """
    if n <= 0 or batch_size <= 0 or steps < 0:
        raise ValueError(f"need n > 0, batch_size > 0, steps >= 0; got {n}, {batch_size}, {steps}")
    need = steps * 2 * batch_size
    passes = [torch.randperm(n, generator=generator) for _ in range(-(-need // n))]
    flat = torch.cat(passes) if passes else torch.empty(0, dtype=torch.long)
    return flat[:need].view(steps, 2 * batch_size)


def transform(name: str, x: Tensor) -> Tensor:
    """Deterministic input transform applied to training and test batches."""
    if name == "none":
        return x
    if name == "deltas":
        from .audio.features import stack_deltas

        return stack_deltas(x)
    raise BadInput(f"unknown input transform {name!r}; expected 'none' or 'deltas'")


_NAMES = (
    "'none', 'crop<P>[-flip]', 'tcrop<F>', 'tcrop<F>-each' or 'specaug<Fm>x<Tm>' (joined with '+')"
)


def apply(name: str, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Apply augmentation ``name`` (see the module docstring) to a float batch ``x`` (N, C, H, W).

    Example:
        >>> x = torch.rand(4, 3, 128, 423)
        >>> apply("specaug12x39+tcrop400-each", x, torch.Generator().manual_seed(0)).shape
        torch.Size([4, 3, 128, 400])
    """
    for part in str(name).split("+"):
        x = _apply_one(part.strip(), x, generator)
    return x


def _apply_one(name: str, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    if name == "none":
        return x
    t = re.fullmatch(r"tcrop(\d+)(-each)?", name)
    if t:
        if t.group(2):
            return per_sample_time_crop(x, int(t.group(1)), generator)
        return random_time_crop(x, int(t.group(1)), generator)
    s = re.fullmatch(r"specaug(\d+)x(\d+)", name)
    if s:
        return spec_augment(x, int(s.group(1)), int(s.group(2)), generator)
    m = re.fullmatch(r"crop(\d+)(-flip)?", name)
    if not m:
        raise BadInput(f"unknown augmentation {name!r}; expected {_NAMES}")
    x = random_crop(x, int(m.group(1)), generator)
    if m.group(2):
        x = random_flip(x, generator)
    return x
