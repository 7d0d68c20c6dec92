"""Timing and summary statistics of the benchmarks: interleaved samples, per-round ratios
(median and 25th-75th percentile), CUDA-synchronised timers, bytes saved for backward."""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn


def quantile(xs: Sequence[float], q: float) -> float:
    """The ``q``-quantile of ``xs`` by linear interpolation (numpy's default method).

    Example:
        >>> quantile([4.0, 1.0, 3.0, 2.0], 0.5)
        2.5
    """
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(xs: Sequence[float]) -> Dict[str, float]:
    """Median and interquartile range (25th and 75th percentile) of ``xs``.

    Example:
        >>> summarize([1.0, 2.0, 3.0, 4.0, 5.0])
        {'median': 3.0, 'q25': 2.0, 'q75': 4.0}
    """
    return {"median": quantile(xs, 0.5), "q25": quantile(xs, 0.25), "q75": quantile(xs, 0.75)}


def ratio_summary(num: Sequence[float], den: Sequence[float]) -> Dict[str, float]:
    """:func:`summarize` of the per-round ratios ``num[i] / den[i]`` (same round, same index).

    Example:
        >>> ratio_summary([2.0, 3.0, 12.0], [1.0, 2.0, 4.0])
        {'median': 2.0, 'q25': 1.75, 'q75': 2.5}
    """
    if len(num) != len(den):
        raise ValueError(f"ratio_summary: {len(num)} numerators but {len(den)} denominators")
    return summarize([a / b for a, b in zip(num, den)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], None], device: torch.device, number: int = 1) -> float:
    """Seconds per call of ``fn``, over ``number`` back-to-back calls.

    CUDA: after ``torch.cuda.synchronize``, between two CUDA events (so queued work from before
    does not count and the kernels' own time does); elsewhere: ``time.perf_counter``.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / number
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def _pick_number(fn: Callable[[], None], device: torch.device) -> int:
    """Calls per sample: 1 on CPU; on CUDA enough to make a sample last ~1 ms (at most 100)."""
    if device.type != "cuda":
        return 1
    return max(1, min(100, int(1e-3 / max(time_call(fn, device), 1e-6))))


def interleaved_samples(
    fns: Dict[str, Callable[[], None]],
    device: torch.device,
    reps: int,
    number: int = 1,
    warmup: int = 0,
) -> Dict[str, List[float]]:
    """Seconds per call of each function, ``reps`` samples each, interleaved across functions."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            samples[k].append(time_call(fn, device, number))
    return samples


def saved_bytes(layer: nn.Module, x: Tensor) -> int:
    """Bytes of the tensors the autograd graph saves for backward in one training forward."""
    seen: Dict[Tuple[int, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        seen[key] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())
