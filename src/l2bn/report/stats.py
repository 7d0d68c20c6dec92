"""Small, exact statistics for seed-level results: paired differences with t-intervals, the
paired t-test's p-value, Holm's correction for several comparisons in one report, and power
(minimum detectable effect, seeds needed) from the noncentral t distribution (scipy)."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple


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


def paired_difference(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> Dict[str, object]:
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
        out.update(
            ci_low=None,
            ci_high=None,
            p_value=None,
            note=f"only {n} paired seed(s): no confidence interval",
        )
        return out
    if s <= 1e-9 * max(1.0, max(abs(x) for x in d)):
        # every seed gave the same difference (to rounding): a t-interval and p-value would be
        # artefacts of the rounding (e.g. p = 1e-14), not evidence
        out.update(
            std=0.0,
            ci_low=None,
            ci_high=None,
            p_value=None,
            note=f"no spread: all {n} paired differences are equal, so no test is possible",
        )
        return out
    half = t_quantile(0.5 + confidence / 2, n - 1) * s / math.sqrt(n)
    out.update(ci_low=m - half, ci_high=m + half, p_value=paired_t_pvalue(m, s, n))
    if s > 0:
        out.update(mde_80=min_detectable_effect(s, n), seeds_for_0_5=seeds_needed(0.5, s))
    if n < 5:
        out["note"] = f"{n} seeds: the t-interval is wide; use more seeds for a firm conclusion"
    else:
        out["note"] = ""
    return out


def fmt_pm(m: Optional[float], s: Optional[float], digits: int = 2) -> str:
    if m is None:
        return "–"
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def paired_t_pvalue(mean: float, std: float, n: int) -> float:
    """Two-sided p-value of the paired t-test of ``mean == 0`` (``n`` pairs, sample std ``std``).

    >>> round(paired_t_pvalue(1.0, 1.0, 4), 4)   # t = 2, 3 degrees of freedom
    0.1393
    """
    from scipy.stats import t

    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {n}")
    if std == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * t.sf(abs(mean) / (std / math.sqrt(n)), n - 1))


def power(effect: float, std: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` to detect a true mean difference
    ``effect`` with ``n`` pairs whose differences have standard deviation ``std``.

    >>> round(power(1.0, 1.0, 10), 3)   # G*Power: 0.803
    0.803
    """
    from scipy.stats import nct, t

    if n < 2:
        return 0.0
    df = n - 1
    crit = t.ppf(1 - alpha / 2, df)
    nc = abs(effect) / (std / math.sqrt(n))
    upper, lower = float(nct.sf(crit, df, nc)), float(nct.cdf(-crit, df, nc))
    upper = 1.0 if math.isnan(upper) else upper  # far in the tail: scipy may return NaN
    lower = 0.0 if math.isnan(lower) else lower
    return min(1.0, upper + lower)


def min_detectable_effect(std: float, n: int, target: float = 0.8, alpha: float = 0.05) -> float:
    """Smallest true difference the paired t-test detects with probability ``target`` (``n`` pairs).

    >>> round(min_detectable_effect(1.0, 10), 3)
    0.996
    """
    from scipy.optimize import brentq

    if n < 2:
        return math.inf
    return float(
        brentq(lambda e: power(e, std, n, alpha) - target, 1e-9 * std, 50 * std, xtol=1e-9 * std)
    )


def seeds_needed(
    effect: float, std: float, target: float = 0.8, alpha: float = 0.05, limit: int = 10_000
) -> int:
    """Fewest paired seeds with which a true difference ``effect`` is detected with probability
    ``target`` (two-sided, level ``alpha``), for differences of standard deviation ``std``.

    >>> seeds_needed(1.0, 1.0)
    10
    """
    n = 2
    while n < limit and power(effect, std, n, alpha) < target:
        n += 1
    return n


def holm(p_values: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm's step-down adjusted p-values (family-wise error rate) for the comparisons of one
    report; ``None`` entries (no test possible) are left out of the family and stay ``None``.

    The ``i``-th smallest of ``m`` p-values is multiplied by ``m - i`` (``i`` from 0), the
    running maximum taken so that the adjusted values keep the order of the raw ones, capped at
    1. A comparison is significant at family-wise level ``alpha`` when its adjusted value is
    below ``alpha`` — stricter than each test alone, less conservative than Bonferroni.

    >>> holm([0.01, 0.04, 0.03, None])
    [0.03, 0.06, 0.06, None]
    """
    idx = sorted((i for i, p in enumerate(p_values) if p is not None), key=lambda i: p_values[i])  # type: ignore[arg-type]
    m = len(idx)
    out: List[Optional[float]] = [None] * len(p_values)
    running = 0.0
    for rank, i in enumerate(idx):
        p = p_values[i]
        if not 0.0 <= p <= 1.0:  # type: ignore[operator]
            raise ValueError(f"p-values must lie in [0, 1], got {p!r}")
        running = max(running, min(1.0, (m - rank) * p))  # type: ignore[operator]
        out[i] = running
    return out
