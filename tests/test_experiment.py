"""Experiments over grids: parsing, run planning, a sweep stopped by SIGKILL and continued with
the same command ends exactly like an uninterrupted one, and the report's per-axis section."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from l2bn.experiment import ExperimentError, parse_grid, plan_runs, run_dir
from l2bn.train.config import TrainConfig

ENV = dict(os.environ, L2BN_BACKEND="fused", OMP_NUM_THREADS="1")


def test_parse_grid_types_and_errors():
    assert parse_grid(
        ["batch_size=16,32", "lr=0.1,0.05", "nesterov=true,false", "amp=none,bf16"]
    ) == {
        "batch_size": [16, 32],
        "lr": [0.1, 0.05],
        "nesterov": [True, False],
        "amp": ["none", "bf16"],
    }
    with pytest.raises(
        ValueError, match="unknown config key 'batch_sise'.*did you mean 'batch_size'"
    ):
        parse_grid(["batch_sise=16"])
    with pytest.raises(ValueError, match="batch_size = .x.: expected an integer >= 1"):
        parse_grid(["batch_size=16,x"])
    with pytest.raises(ExperimentError, match="use --models/--norms/--seeds"):
        parse_grid(["norm=bn,l2bn"])
    with pytest.raises(ExperimentError, match="expected KEY=V1,V2"):
        parse_grid(["batch_size"])


def test_plan_is_seed_major_with_one_directory_per_cell(tmp_path):
    plan = plan_runs(
        str(tmp_path),
        ["resnet8"],
        ["bn", "l2bn"],
        [0, 1],
        "digits",
        {"epochs": 1},
        grid={"batch_size": [16, 32]},
    )
    assert len(plan) == 8
    seeds = [cfg.seed for _, cfg in plan]
    assert seeds == [0] * 4 + [1] * 4  # every cell gets seed 0 before any gets seed 1
    assert plan[1][1].out == str(run_dir(tmp_path, "resnet8", "l2bn", 0, {"batch_size": 16}))
    assert plan[1][1].out.endswith("resnet8-l2bn-batch_size=16-seed0")
    assert {cfg.batch_size for _, cfg in plan} == {16, 32} and len(
        {cfg.out for _, cfg in plan}
    ) == 8


def test_linear_lr_scaling():
    assert TrainConfig(lr=0.1, batch_size=32, lr_ref_batch=128).effective_lr() == pytest.approx(
        0.025
    )
    assert TrainConfig(lr=0.1, batch_size=32).effective_lr() == 0.1


def _cmd(out, seeds=("0",)):
    return [
        sys.executable,
        "-m",
        "l2bn",
        "compare",
        "--dataset",
        "digits",
        "--models",
        "resnet8",
        "--norms",
        "bn",
        "l2bn",
        "--seeds",
        *seeds,
        "--grid",
        "batch_size=32,64",
        "--lr-ref-batch",
        "64",
        "--epochs",
        "2",
        "--lr",
        "0.05",
        "--train-subset",
        "512",
        "--warmup-epochs",
        "0",
        "--no-analyze",
        "--threads",
        "1",
        "--out",
        str(out),
    ]


def _histories(out):
    def strip(h):
        return [{k: v for k, v in e.items() if k not in ("epoch_time_s", "throughput")} for e in h]

    return {
        p.parent.name: strip(json.loads(p.read_text())["history"])
        for p in sorted(out.glob("*/result.json"))
    }


def test_sweep_killed_and_continued_equals_uninterrupted(tmp_path):
    ref = subprocess.run(
        _cmd(tmp_path / "ref"), env=ENV, capture_output=True, text=True, timeout=900
    )
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]
    out = tmp_path / "cut"
    proc = subprocess.Popen(
        _cmd(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    second = out / "resnet8-l2bn-batch_size=32-seed0"  # the second run of the plan
    deadline = time.time() + 600
    while time.time() < deadline and not (second / "last.pt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists(), "the sweep finished before it could be killed"
    again = subprocess.run(_cmd(out), env=ENV, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "(1 finished earlier)" in again.stdout and "resuming" in again.stdout
    assert _histories(out) == _histories(tmp_path / "ref")
    s = json.loads((out / "summary.json").read_text())
    assert s["axes"] == ["batch_size"] and (out / "axis_batch_size.png").is_file()
    assert set(s["differences"]) == {
        "resnet8/l2bn/batch_size=32-bn",
        "resnet8/l2bn/batch_size=64-bn",
    }
    md = (out / "report.md").read_text()
    assert "L2BN − BN against `batch_size`" in md and "Grid axes: batch_size" in md
    # the linear scaling rule: batch 32 trains at half the reference learning rate
    r32 = json.loads((out / "resnet8-bn-batch_size=32-seed0" / "result.json").read_text())
    r64 = json.loads((out / "resnet8-bn-batch_size=64-seed0" / "result.json").read_text())
    assert (
        r32["config"]["lr_ref_batch"] == 64
        and r32["train_examples"] == r64["train_examples"] == 512
    )
    # same point of the cosine schedule after epoch 1 (16 of 32 vs 8 of 16 steps): half the lr
    assert r32["history"][0]["lr"] == pytest.approx(r64["history"][0]["lr"] / 2, rel=1e-9)
    # adding a seed later trains only the new runs
    more = subprocess.run(
        _cmd(out, seeds=("0", "1")), env=ENV, capture_output=True, text=True, timeout=900
    )
    assert more.returncode == 0 and "8 runs (4 finished earlier)" in more.stdout
    s = json.loads((out / "summary.json").read_text())
    assert all(d["n"] == 2 and d["p_value"] is not None for d in s["differences"].values())


def test_a_directory_with_another_recipe_is_refused(tmp_path):
    first = subprocess.run(
        _cmd(tmp_path / "o"), env=ENV, capture_output=True, text=True, timeout=900
    )
    assert first.returncode == 0
    cmd = _cmd(tmp_path / "o")
    cmd[cmd.index("--lr") + 1] = "0.2"
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert (
        r.returncode == 2
        and "lr: saved 0.05, given 0.2" in r.stderr
        and "keeps one recipe" in r.stderr
    )


def test_finished_runs_without_checkpoints_are_reported_not_fatal(tmp_path):
    """A sweep continued on a clone that holds committed results (result.json, no last.pt, no
    analysis.json) analyses what it can and still writes the report, instead of failing at the
    end of hours of training."""
    out = tmp_path / "o"
    first = subprocess.run(_cmd(out), env=ENV, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    kept = out / "resnet8-bn-batch_size=32-seed0"
    (kept / "last.pt").unlink()
    (kept / "best.pt").unlink(missing_ok=True)
    cmd = [a for a in _cmd(out) if a != "--no-analyze"]
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"not analysed: {kept} has a result but no checkpoint" in again.stdout
    analysed = sorted(p.parent.name for p in out.glob("*/analysis.json"))
    assert analysed == [
        "resnet8-bn-batch_size=64-seed0",
        "resnet8-l2bn-batch_size=32-seed0",
        "resnet8-l2bn-batch_size=64-seed0",
    ]
    assert json.loads((out / "summary.json").read_text())["axes"] == ["batch_size"]


def _fake_run(d, model, norm, seed, acc, layers=0, **recipe):
    """A finished run directory as `l2bn train` leaves it (result.json; analysis.json of a model
    with ``layers`` normalization layers if given)."""
    import dataclasses

    cfg = dataclasses.asdict(
        TrainConfig(dataset="fashion-mnist", model=model, norm=norm, seed=seed, epochs=2, **recipe)
    )
    d.mkdir(parents=True)
    hist = [{"epoch": e, "train_loss": 1.0 / e, "test_acc": acc - 2 + e} for e in (1, 2)]
    (d / "result.json").write_text(
        json.dumps(
            {
                "status": "complete",
                "test_acc": acc,
                "best_test_acc": acc,
                "epochs": 2,
                "wall_time_s": 1.0,
                "device": "cpu",
                "config": cfg,
                "history": hist,
            }
        )
    )
    if layers:
        spread = {
            f"{model}.bn{i}": {
                "cv": 0.1 + 0.01 * i,
                "hist_range": [-4, 4],
                "hist_log10": [0, 3, 5, 2],
            }
            for i in range(layers)
        }
        (d / "analysis.json").write_text(
            json.dumps(
                {
                    "model": model,
                    "norm": norm,
                    "seed": seed,
                    "norm_spread": spread,
                    "compactness": 0.9 + acc / 1000,
                    "discrepancy_mean_deg": 60.0,
                    "fisher_ratio": 4.0,
                    "knn_accuracy": acc,
                    "pca2d": {"x": [0.0, 1.0], "y": [1.0, 0.0], "label": [0, 1]},
                }
            )
        )
    return str(d)


def test_report_across_models_reads_shallow_to_deep(tmp_path):
    """A depth study (several models, no grid axis) gets L2BN − BN against the model, in natural
    order (resnet8, resnet20, resnet56) whatever order the directories come in; one model gets no
    such section."""
    from l2bn.report.build import build_report

    gain = {"resnet8": 0.1, "resnet20": 0.4, "resnet56": 0.9}
    dirs = []
    for m in ("resnet56", "resnet8", "resnet20"):  # neither natural nor alphabetical
        for s in range(3):
            base = 90.0 + s * 0.5
            dirs.append(_fake_run(tmp_path / f"{m}-bn-{s}", m, "bn", s, base))
            dirs.append(
                _fake_run(tmp_path / f"{m}-l2bn-{s}", m, "l2bn", s, base + gain[m] + 0.01 * s)
            )
    build_report(dirs, str(tmp_path / "rep"))
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["models"] == ["resnet8", "resnet20", "resnet56"] and summary["axes"] == []
    assert (tmp_path / "rep" / "axis_model.png").stat().st_size > 0
    md = (tmp_path / "rep" / "report.md").read_text()
    table = md.split("### L2BN − BN against `model`")[1].split("\n\n")[1].splitlines()
    assert (
        table[0]
        == "| norm | other axes | model | paired seeds | mean (pp) | 95% CI | p | p (Holm) |"
    )
    rows = [r.split(" | ") for r in table[2:]]
    assert [r[2] for r in rows] == ["resnet8", "resnet20", "resnet56"]
    assert [float(r[4]) for r in rows] == [
        pytest.approx(gain[m] + 0.01, abs=0.006) for m in ("resnet8", "resnet20", "resnet56")
    ]
    assert all(r[3] == "3" for r in rows)

    one = build_report([d for d in dirs if "/resnet20-" in d], str(tmp_path / "one"))
    assert not (tmp_path / "one" / "axis_model.png").exists()
    assert "against `model`" not in one["md"].read_text()


@pytest.mark.parametrize(
    "l2bn, survives",
    [
        ([90.3, 90.9, 89.8, 90.7], False),  # p 0.032, Holm 0.064
        ([90.3, 90.9, 89.9, 90.5], True),
    ],
)  # p 0.005, Holm 0.010
def test_report_corrects_for_several_comparisons(tmp_path, l2bn, survives):
    """Every comparison of a report gets a Holm-adjusted p-value (the family: all its accuracy
    comparisons; for the mechanism, all rows of its table), and a verdict whose own interval
    excludes 0 says whether that survives the correction."""
    from l2bn.report.build import build_report
    from l2bn.report.stats import holm, paired_difference

    bn = [90.0, 90.5, 89.7, 90.2]
    other = {"l2bn": l2bn, "l2bn-rms": [90.1, 90.4, 89.9, 90.2]}  # rms: p 0.50
    dirs = [
        _fake_run(tmp_path / f"bn-{s}", "resnet8", "bn", s, a, layers=2) for s, a in enumerate(bn)
    ]
    for norm, accs in other.items():
        dirs += [
            _fake_run(tmp_path / f"{norm}-{s}", "resnet8", norm, s, a, layers=2)
            for s, a in enumerate(accs)
        ]
    build_report(dirs, str(tmp_path / "rep"))
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    raw = {n: paired_difference(a, bn)["p_value"] for n, a in other.items()}
    want = dict(zip(raw, holm(list(raw.values()))))
    diffs = summary["differences"]
    for n in other:
        d = diffs[f"resnet8/{n}-bn"]
        assert (
            d["p_value"] == pytest.approx(raw[n])
            and d["p_holm"] == pytest.approx(want[n])
            and d["family_size"] == 2
        )
    assert (
        raw["l2bn"] < 0.05
        and (want["l2bn"] < 0.05) == survives
        and want["l2bn-rms"] == pytest.approx(raw["l2bn-rms"])
    )
    md = (tmp_path / "rep" / "report.md").read_text()
    row = next(r for r in md.splitlines() if r.startswith("| resnet8/l2bn-bn | 4 |"))
    assert row.split(" | ")[5] == f"{want['l2bn']:.3f}"
    line = next(r for r in md.splitlines() if r.startswith("- resnet8/l2bn-bn: better than BN"))
    assert line.startswith(
        "- resnet8/l2bn-bn: better than BN — "
        if survives
        else "- resnet8/l2bn-bn: better than BN without correction — "
    )
    said = "); it stays significant after" if survives else "); not significant after"
    assert f"{said} Holm's correction for 2 comparisons (adjusted p = {want['l2bn']:.3f})." in line
    assert (
        "adjusted for the 2 comparisons of this table that have a p-value" in md
        and "Rows with 4 paired seeds" in md
    )
    # the mechanism family: every metric of both comparisons (compactness, angle, Fisher, norm CV,
    # k-NN)
    mech = summary["mechanism"]
    rows = [d for m in mech.values() for d in m.values()]
    assert len(rows) == 10 and all(
        d["family_size"] == sum(r["p_value"] is not None for r in rows) for d in rows
    )
    assert [d["p_holm"] for d in rows] == pytest.approx(holm([d["p_value"] for d in rows]))
    assert "*p (Holm): adjusted for the" in md.split("## Mechanism")[1]


def test_report_with_a_nan_metric_leaves_it_out_of_the_family(tmp_path):
    """A diverged run's NaN metric (here the Fisher ratio) gives a NaN p-value: the report is still
    written, that row gets no Holm value and is not counted in the family of the others."""
    from l2bn.report.build import build_report

    dirs = []
    for s in range(3):
        dirs.append(_fake_run(tmp_path / f"bn-{s}", "resnet8", "bn", s, 90.0 + 0.3 * s, layers=2))
        d = _fake_run(tmp_path / f"l2bn-{s}", "resnet8", "l2bn", s, 90.2 + 0.25 * s, layers=2)
        a = json.loads((tmp_path / f"l2bn-{s}" / "analysis.json").read_text())
        a["fisher_ratio"] = float("nan") if s == 1 else 4.5
        (tmp_path / f"l2bn-{s}" / "analysis.json").write_text(json.dumps(a))
        dirs.append(d)
    build_report(dirs, str(tmp_path / "rep"))
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    rows = summary["mechanism"]["resnet8/l2bn-bn"]
    assert rows["fisher_ratio"]["p_holm"] is None
    finite = [d for m, d in rows.items() if m != "fisher_ratio" and d["p_value"] is not None]
    assert all(d["family_size"] == len(finite) and d["p_holm"] is not None for d in finite)


def test_report_pools_each_norm_over_the_cells(tmp_path):
    """The pooled difference: per seed, the mean of that seed's differences over every cell, then
    a paired t-interval over seeds; a seed missing from one cell is left out; a norm compared in
    one cell only is not pooled; a report of one cell has no pooled section."""
    from l2bn.report.build import build_report
    from l2bn.report.stats import paired_difference

    gain = {(16, 0): 0.1, (16, 1): 0.5, (16, 2): -0.2, (128, 0): 0.4, (128, 1): 0.0, (128, 2): 0.3}
    dirs = []
    for bs in (16, 128):
        for s in range(3):
            base = 88.0 + 0.3 * s - bs / 1000
            dirs.append(
                _fake_run(tmp_path / f"bn-{bs}-{s}", "resnet8", "bn", s, base, batch_size=bs)
            )
            dirs.append(
                _fake_run(
                    tmp_path / f"l2bn-{bs}-{s}",
                    "resnet8",
                    "l2bn",
                    s,
                    base + gain[bs, s],
                    batch_size=bs,
                )
            )
    dirs.append(
        _fake_run(tmp_path / "bn-128-3", "resnet8", "bn", 3, 90.0, batch_size=128)
    )  # seed 3: one cell only
    dirs.append(_fake_run(tmp_path / "l2bn-128-3", "resnet8", "l2bn", 3, 95.0, batch_size=128))
    dirs.append(_fake_run(tmp_path / "rms-16-0", "resnet8", "l2bn-rms", 0, 88.0, batch_size=16))
    dirs.append(_fake_run(tmp_path / "rms-16-1", "resnet8", "l2bn-rms", 1, 88.2, batch_size=16))
    build_report(dirs, str(tmp_path / "rep"))
    pooled = json.loads((tmp_path / "rep" / "summary.json").read_text())["pooled"]
    assert set(pooled) == {"l2bn-bn"}  # l2bn-rms was compared at batch 16 only
    want = paired_difference([(gain[16, s] + gain[128, s]) / 2 for s in range(3)], [0.0] * 3)
    d = pooled["l2bn-bn"]
    assert d["cells"] == 2 and d["seeds"] == [0, 1, 2] and d["n"] == 3
    for k in ("mean", "ci_low", "ci_high", "p_value"):
        assert d[k] == pytest.approx(want[k], abs=1e-9)
    assert (
        d["over"] == {"batch_size": [16, 128]}
        and d["not_in_every_cell"] == [3]
        and d["not_finite"] == []
    )
    md = (tmp_path / "rep" / "report.md").read_text()
    assert (
        f"- l2bn-bn over 2 cells (batch_size ∈ {{16, 128}}), seeds 0, 1, 2: {want['mean']:+.2f} "
        f"pp, 95% CI "
        f"[{want['ci_low']:+.2f}, {want['ci_high']:+.2f}], p = "
    ) in md
    assert "Left out: seed(s) 3 not in every cell." in md
    one = build_report([x for x in dirs if "-16-" in x and "rms" not in x], str(tmp_path / "one"))
    assert "Pooled over the cells" not in one["md"].read_text()


def test_pooled_difference_edge_cases(tmp_path):
    """Pooled over models: labelled with the models; a seed whose difference is NaN (a diverged
    run) is named and left out, not averaged into NaN; cells without a common seed give no
    interval instead of an error."""
    from l2bn.report.build import build_report
    from l2bn.report.stats import paired_difference

    dirs, gain = (
        [],
        {
            ("resnet8", 0): 0.2,
            ("resnet8", 1): 0.4,
            ("resnet8", 2): 0.1,
            ("resnet20", 0): 0.0,
            ("resnet20", 1): 0.6,
            ("resnet20", 2): 0.3,
        },
    )
    for (m, s), g in gain.items():
        dirs.append(_fake_run(tmp_path / f"{m}-bn-{s}", m, "bn", s, 90.0 + s))
        dirs.append(
            _fake_run(
                tmp_path / f"{m}-l2bn-{s}",
                m,
                "l2bn",
                s,
                float("nan") if (m, s) == ("resnet20", 1) else 90.0 + s + g,
            )
        )
    # l2bn-rms: resnet8 has seeds 0-1, resnet20 seed 2: no seed in every cell
    for m, seeds in (("resnet8", (0, 1)), ("resnet20", (2,))):
        for s in seeds:
            dirs.append(_fake_run(tmp_path / f"{m}-rms-{s}", m, "l2bn-rms", s, 90.0 + s))
    build_report(dirs, str(tmp_path / "rep"))
    pooled = json.loads((tmp_path / "rep" / "summary.json").read_text())["pooled"]
    d = pooled["l2bn-bn"]
    assert (
        d["over"] == {"model": ["resnet8", "resnet20"]}
        and d["seeds"] == [0, 2]
        and d["not_finite"] == [1]
    )
    want = paired_difference(
        [(gain["resnet8", s] + gain["resnet20", s]) / 2 for s in (0, 2)], [0.0, 0.0]
    )
    assert d["mean"] == pytest.approx(want["mean"]) and d["ci_low"] == pytest.approx(want["ci_low"])
    rms = pooled["l2bn-rms-bn"]
    assert rms["seeds"] == [] and rms["ci_low"] is None and rms["not_in_every_cell"] == [0, 1, 2]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "- l2bn-bn over 2 cells (model ∈ {resnet8, resnet20}), seeds 0, 2: " in md
    assert "Left out: seed(s) 1 with a non-finite difference." in md
    assert (
        "- l2bn-rms-bn over 2 cells (model ∈ {resnet8, resnet20}): 0 usable seed(s), no interval."
        in md
    )


def test_report_figures_for_models_of_different_depths(tmp_path):
    """The mechanism figures of a depth study: each model is drawn with its own layers (a deeper
    model listed first once made the norm histograms index past a shallower model's layers)."""
    from l2bn.report.build import build_report

    dirs = [
        _fake_run(tmp_path / f"{m}-{n}-{s}", m, n, s, 90.0 + s + (n != "bn"), layers=depth)
        for m, depth in (("resnet56", 57), ("resnet8", 9))
        for n in ("l2bn", "bn")
        for s in range(2)
    ]
    paths = build_report(dirs, str(tmp_path / "rep"))
    for f in ("norm_cv.png", "norm_hist.png", "metrics.png", "pca.png", "axis_model.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 0, f
    md = paths["md"].read_text()
    assert "resnet8/l2bn-bn | 2 | +1.00" in md and "resnet56/l2bn-bn | 2 | +1.00" in md
    # cells read shallow to deep, BN first, whatever order the directories came in
    rows = [
        r.split(" | ")[:2]
        for r in md.split("## Test accuracy")[1].split("\n\n")[1].splitlines()[2:]
    ]
    assert rows == [
        ["| resnet8", "bn"],
        ["| resnet8", "l2bn"],
        ["| resnet56", "bn"],
        ["| resnet56", "l2bn"],
    ]


def test_model_order_is_natural():
    from l2bn.report.runs import model_order

    names = ["resnet56", "mlp", "resnet8", "dcase-fcnn", "resnet110", "resnet20"]
    assert sorted(names, key=model_order) == [
        "dcase-fcnn",
        "mlp",
        "resnet8",
        "resnet20",
        "resnet56",
        "resnet110",
    ]


def test_report_cli_note_goes_under_the_title(tmp_path, capsys):
    """`l2bn report --note` prints the paragraph under the title (how the runs were made, what
    was decided after seeing them)."""
    from l2bn.cli import main

    dirs = [
        _fake_run(tmp_path / f"{n}-{s}", "resnet8", n, s, 90.0 + s + (0.2 if n == "l2bn" else 0))
        for n in ("bn", "l2bn")
        for s in range(2)
    ]
    assert (
        main(
            [
                "report",
                *dirs,
                "-o",
                str(tmp_path / "rep"),
                "--title",
                "T",
                "--note",
                "Made on a laptop.",
            ]
        )
        == 0
    )
    md = (tmp_path / "rep" / "report.md").read_text().splitlines()
    assert md[:3] == ["# T", "", "Made on a laptop."]
