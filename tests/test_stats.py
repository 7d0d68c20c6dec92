"""The report's statistics against independent computations: scipy's tests and intervals, and a
Monte-Carlo simulation of the paired t-test for the power calculations."""

import math
import statistics

import numpy as np
import pytest
from scipy import stats as sps

from l2bn.report.stats import (
    fmt_pm,
    holm,
    mean_std,
    min_detectable_effect,
    paired_difference,
    paired_t_pvalue,
    power,
    seeds_needed,
    t_quantile,
)


def test_mean_std():
    assert mean_std([]) == (None, None)
    assert mean_std([2.5]) == (2.5, None)
    xs = [1.0, 4.0, 2.0, 8.5]
    m, s = mean_std(xs)
    assert m == pytest.approx(statistics.mean(xs), abs=1e-15)
    assert s == pytest.approx(statistics.stdev(xs), abs=1e-15)  # ddof = 1


def test_t_quantile_known_values():
    assert t_quantile(0.975, 4) == pytest.approx(2.7764451051977987, abs=1e-12)
    assert t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-12)
    assert t_quantile(0.05, 2) == pytest.approx(-2.919985580355516, abs=1e-9)


@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_paired_difference_equals_scipy(confidence):
    a = [88.1, 87.4, 88.9, 87.0, 88.2]
    b = [87.5, 87.6, 88.0, 86.1, 87.9]
    r = paired_difference(a, b, confidence)
    d = [x - y for x, y in zip(a, b)]
    assert r["n"] == 5 and r["diffs"] == pytest.approx(d) and r["confidence"] == confidence
    assert r["mean"] == pytest.approx(np.mean(d)) and r["std"] == pytest.approx(np.std(d, ddof=1))
    lo, hi = sps.t.interval(confidence, 4, loc=np.mean(d), scale=sps.sem(d))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi), abs=1e-12)
    assert r["p_value"] == pytest.approx(sps.ttest_rel(a, b).pvalue, abs=1e-12)
    assert r["mde_80"] == pytest.approx(min_detectable_effect(r["std"], 5))
    assert r["seeds_for_0_5"] == seeds_needed(0.5, r["std"])
    assert r["note"] == ""


def test_paired_difference_small_samples():
    one = paired_difference([1.0], [0.5])
    assert one["n"] == 1 and one["mean"] == 0.5 and one["ci_low"] is None and one["ci_high"] is None
    assert one["p_value"] is None
    assert "only 1 paired seed(s)" in one["note"]
    three = paired_difference([1.0, 2.0, 3.0], [0.0, 1.0, 2.5])
    assert "3 seeds" in three["note"] and three["ci_low"] < three["mean"] < three["ci_high"]
    same = paired_difference([1.0, 2.0], [0.0, 1.0])  # identical differences: no spread, so no test
    assert (
        same["std"] == 0
        and "mde_80" not in same
        and same["p_value"] is None
        and "no spread" in same["note"]
    )


def test_paired_t_pvalue():
    d = np.array([0.3, -0.1, 0.8, 0.5, 0.2, 0.9])
    expect = sps.ttest_1samp(d, 0.0).pvalue
    assert paired_t_pvalue(float(d.mean()), float(d.std(ddof=1)), 6) == pytest.approx(
        expect, abs=1e-12
    )
    assert paired_t_pvalue(-float(d.mean()), float(d.std(ddof=1)), 6) == pytest.approx(
        expect, abs=1e-12
    )
    assert paired_t_pvalue(0.0, 0.0, 3) == 1.0 and paired_t_pvalue(0.2, 0.0, 3) == 0.0
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_t_pvalue(1.0, 1.0, 1)


def _simulated_power(effect, std, n, alpha=0.05, sims=40000, seed=0):
    rng = np.random.default_rng(seed)
    d = rng.normal(effect, std, size=(sims, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    return float((np.abs(t) > sps.t.ppf(1 - alpha / 2, n - 1)).mean())


@pytest.mark.parametrize(
    "effect,std,n,alpha", [(1.0, 1.0, 10, 0.05), (0.5, 0.8, 6, 0.05), (-0.7, 1.0, 8, 0.1)]
)
def test_power_matches_simulation(effect, std, n, alpha):
    assert power(effect, std, n, alpha) == pytest.approx(
        _simulated_power(effect, std, n, alpha), abs=0.01
    )


def test_power_edges():
    assert power(0.0, 1.0, 10) == pytest.approx(0.05, abs=1e-12)  # no effect: rejects at rate alpha
    assert power(0.0, 1.0, 10, alpha=0.1) == pytest.approx(0.1, abs=1e-12)
    assert power(1.0, 1.0, 1) == 0.0
    assert power(100.0, 1.0, 10) == 1.0
    assert power(0.6, 1.0, 12) < power(0.6, 1.0, 20) < power(0.9, 1.0, 20)


def test_min_detectable_effect():
    e = min_detectable_effect(1.0, 10)
    assert power(e, 1.0, 10) == pytest.approx(0.8, abs=1e-6)
    assert min_detectable_effect(2.0, 10) == pytest.approx(
        2 * e, rel=1e-6
    )  # scales with the spread
    assert min_detectable_effect(1.0, 10, target=0.9) > e
    assert min_detectable_effect(1.0, 10, alpha=0.01) > e
    assert min_detectable_effect(1.0, 1) == math.inf
    two = min_detectable_effect(1.0, 2)  # two pairs: one degree of freedom, finite
    assert math.isfinite(two) and power(two, 1.0, 2) == pytest.approx(0.8, abs=1e-6)
    # the root bracket scales with the spread: tiny and huge spreads work the same
    for std in (1e-5, 1e-3, 100.0):
        assert min_detectable_effect(std, 10) == pytest.approx(std * e, rel=1e-6)


def test_seeds_needed_is_the_smallest_sufficient_n():
    for effect, std in ((1.0, 1.0), (0.5, 0.6), (0.5, 1.3), (0.7, 1.0)):
        n = seeds_needed(effect, std)
        assert power(effect, std, n) >= 0.8 > power(effect, std, n - 1)
        n = seeds_needed(effect, std, alpha=0.01)
        assert power(effect, std, n, alpha=0.01) >= 0.8 > power(effect, std, n - 1, alpha=0.01)
    assert seeds_needed(0.7, 1.0) == 19  # odd: the search steps one seed at a time
    assert seeds_needed(1.0, 1.0) == 10
    assert seeds_needed(1.0, 1.0, target=0.9) > 10
    assert seeds_needed(0.001, 10.0, limit=50) == 50
    assert seeds_needed(100.0, 1.0) == 2


def test_fmt_pm():
    assert fmt_pm(None, None) == "–"
    assert fmt_pm(1.23456, None) == "1.23"
    assert fmt_pm(1.23456, 0.5, digits=1) == "1.2 ± 0.5"


def _holm_rejects(ps, alpha):
    """Holm's procedure as he defined it (1979): test the sorted p-values in turn, the k-th
    (k from 0) at level alpha / (m - k), and stop at the first that fails."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    rejected = set()
    for k, i in enumerate(order):
        if ps[i] > alpha / (len(ps) - k):
            break
        rejected.add(i)
    return rejected


def test_holm_adjusted_values_reproduce_holms_procedure():
    """Rejecting where the adjusted p-value is at most alpha is Holm's sequential procedure, at
    every level; and known values: Bonferroni for the smallest, never below the raw p-value,
    order kept, capped at 1."""
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.3, 0.8]) == pytest.approx(
        [0.6, 0.8]
    )  # running maximum, capped at 1 where it would exceed
    assert holm([0.7, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([0.02]) == [0.02] and holm([]) == []
    assert holm([0.0, 1.0]) == [0.0, 1.0]  # the ends of the range are p-values too
    assert holm([None, 0.01, None, 0.02]) == [None, pytest.approx(0.02), None, pytest.approx(0.02)]
    rng = np.random.default_rng(0)
    for trial in range(300):
        m = int(rng.integers(1, 9))
        ps = [float(x) for x in rng.uniform(0, 0.2, m) ** 2]
        if trial % 3 == 0 and m > 1:
            ps[1] = ps[0]  # ties
        adj = holm(ps)
        assert all(a >= p for a, p in zip(adj, ps)) and all(a <= 1 for a in adj)
        order = sorted(range(m), key=lambda i: ps[i])
        assert all(adj[order[j]] <= adj[order[j + 1]] for j in range(m - 1))
        for alpha in (0.001, 0.01, 0.05, 0.1):
            assert {i for i, a in enumerate(adj) if a <= alpha} == _holm_rejects(ps, alpha)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        holm([0.5, 1.5])
