"""Reports that know when a statistic means nothing: zero-spread differences, runs that cannot
be paired, reports without a BN baseline, recipe lines true for every run, readable norm
histograms, whole-number epoch ticks and names that do not wrap."""

import json
import warnings

import pytest
import torch
from test_experiment import _fake_run

from l2bn.analysis.probes import HIST_BINS, _Stream
from l2bn.report.build import build_report
from l2bn.report.stats import paired_difference


def test_zero_spread_is_no_test_not_a_tiny_p_value():
    """Two seeds with identical differences (up to rounding) gave CI [-0.2817, -0.2817] and
    p = 1.6e-14: now no interval and no p-value, and the note says why."""
    d = paired_difference([90.1, 91.3], [90.1 + 0.2817, 91.3 + 0.2817])
    assert d["p_value"] is None and d["ci_low"] is None and "no spread" in d["note"]
    ok = paired_difference([90.1, 91.3, 90.7], [90.0, 91.0, 90.65])  # real spread: tested as before
    assert ok["p_value"] is not None and ok["ci_low"] < ok["mean"] < ok["ci_high"]


def _report(tmp_path, dirs, name="rep"):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no matplotlib "No artists with labels found" and the like
        paths = build_report(dirs, str(tmp_path / name))
    return paths["md"].read_text(), json.loads(paths["summary"].read_text())


def test_report_of_runs_that_cannot_be_paired_says_why(tmp_path):
    dirs = [
        _fake_run(tmp_path / "a", "resnet8", "bn", 0, 90.0),
        _fake_run(tmp_path / "b", "resnet8", "l2bn", 1, 91.0),
    ]  # different seeds: no pair
    md, summary = _report(tmp_path, dirs)
    assert all(d["n"] == 0 for d in summary["differences"].values())
    assert (
        "*No paired comparison: no other run has a BN run with the same model, recipe and seed"
        in md
    )
    assert "| comparison |" not in md  # no empty table


def test_report_without_a_bn_baseline_has_an_honest_title(tmp_path):
    dirs = [
        _fake_run(tmp_path / "a", "resnet8", "l2bn", 0, 90.0),
        _fake_run(tmp_path / "b", "resnet8", "l2bn", 0, 91.0),
    ]
    r = json.loads(
        (tmp_path / "b" / "result.json").read_text()
    )  # fake runs are fashion-mnist: one is digits
    r["config"]["dataset"] = "digits"
    (tmp_path / "b" / "result.json").write_text(json.dumps(r))
    md, _ = _report(tmp_path, dirs)
    assert md.startswith("# L2BN on digits, fashion-mnist\n")
    assert "there is no BN run among them" in md
    assert "dataset=" not in md.split("\n")[2]  # the recipe line holds only what every run shares


def test_recipe_line_leaves_out_a_subset_larger_than_the_data(tmp_path):
    dirs = []
    for norm in ("bn", "l2bn"):
        d = _fake_run(tmp_path / norm, "resnet8", norm, 0, 90.0, train_subset=20000)
        r = json.loads((tmp_path / norm / "result.json").read_text())
        r["train_examples"] = 1437  # digits: 20000 had no effect
        (tmp_path / norm / "result.json").write_text(json.dumps(r))
        dirs.append(d)
    md, _ = _report(tmp_path, dirs)
    assert "train_subset" not in md
    dirs2 = [
        _fake_run(tmp_path / f"x{norm}", "resnet8", norm, 0, 90.0, train_subset=500)
        for norm in ("bn", "l2bn")
    ]
    md2, _ = _report(tmp_path, dirs2, "rep2")
    assert "train_subset=500" in md2


def test_norm_histogram_range_comes_from_the_data():
    """Sample norms in a narrow band (log10 1.28-1.32) fill the histogram's bins instead of
    one bin of a fixed -4 ... 4 range."""
    s = _Stream()
    s.update(10 ** (1.3 + 0.02 * (torch.rand(500) * 2 - 1)))
    h = s.summary()
    lo, hi = h["hist_range"]
    assert 1.28 > lo > 1.0 and 1.32 < hi < 1.6 and len(h["hist_log10"]) == HIST_BINS
    assert sum(b > 0 for b in h["hist_log10"]) > HIST_BINS // 4 and sum(h["hist_log10"]) == 500
    same = _Stream()
    same.update(torch.full((10,), 3.0))  # equal norms: a histogram of some width, centred on them
    lo, hi = same.summary()["hist_range"]
    assert lo < 0.477 < hi and hi - lo == pytest.approx(0.01)


def test_learning_curves_tick_whole_epochs(tmp_path, monkeypatch):
    import matplotlib.axis

    ticks = []
    orig = matplotlib.axis.Axis.set_major_locator

    def spy(self, locator):
        ticks.append(locator)
        return orig(self, locator)

    monkeypatch.setattr(matplotlib.axis.Axis, "set_major_locator", spy)
    from l2bn.report.plots import learning_curves

    learning_curves(
        [
            json.loads(
                open(_fake_run(tmp_path / "a", "resnet8", "bn", 0, 90.0) + "/result.json").read()
            )
            | {"norm": "bn"}
        ],
        tmp_path / "c.png",
    )
    assert any(getattr(t, "_integer", False) for t in ticks)


def test_html_keeps_comparison_names_on_one_line(tmp_path):
    dirs = [
        _fake_run(tmp_path / f"{n}{s}", "resnet8", n, s, 90.0 + s + (n == "l2bn") * 0.1 * (s + 1))
        for n in ("bn", "l2bn")
        for s in range(2)
    ]
    build_report(dirs, str(tmp_path / "rep"))
    assert "td:first-child{white-space:nowrap" in (tmp_path / "rep" / "report.html").read_text()
