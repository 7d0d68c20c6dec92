"""Small, exact statistics for seed-level results."""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple


def mean_std(xs: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (ddof=1; ``None`` for fewer than 2 values)."""
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t distribution (scipy)."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Dict[str, object]:
    """Mean of ``a[i] - b[i]`` with a two-sided t confidence interval over the pairs.

    With fewer than 2 pairs there is no interval; the result says so in ``note``.

    >>> r = paired_difference([1.0, 2.0, 3.0], [0.0, 1.0, 2.5])
    >>> round(r["mean"], 4), r["n"]
    (0.8333, 3)
    """
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    m, s = mean_std(d)
    out: Dict[str, object] = {"n": n, "mean": m, "std": s, "diffs": d, "confidence": confidence}
    if n < 2 or s is None:
        out.update(ci_low=None, ci_high=None, note=f"only {n} paired seed(s): no confidence interval")
        return out
    half = t_quantile(0.5 + confidence / 2, n - 1) * s / math.sqrt(n)
    out.update(ci_low=m - half, ci_high=m + half)
    if n < 5:
        out["note"] = f"{n} seeds: the t-interval is wide; use more seeds for a firm conclusion"
    else:
        out["note"] = ""
    return out


def fmt_pm(m: Optional[float], s: Optional[float], digits: int = 2) -> str:
    if m is None:
        return "–"
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"
