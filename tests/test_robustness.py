"""The robustness studies (presets ``lr`` and ``stability``): the held-out split they choose on,
the failed-run rule and its counts, each norm at its own best learning rate, diverged runs as
outcomes of a sweep, and the presets themselves (the stability study reuses the depth study's
runs)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l2bn.data.registry import DataBundle
from l2bn.experiment import PRESETS, _status, plan_compare, plan_runs
from l2bn.io import BadInput
from l2bn.report.failures import FAILURE_RULE, failure_summary, judge_cell
from l2bn.report.tuned import tuned_comparison
from l2bn.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, L2BN_BACKEND="fused", OMP_NUM_THREADS="1")


def _bundle(per_class=30, classes=5):
    """Example i has pixel value i, so examples can be told apart after any split."""
    n = per_class * classes
    y = torch.arange(n) % classes
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    return DataBundle("toy", classes, (1, 1, 1), train_x=x, train_y=y, test_x=x[:5], test_y=y[:5])


def _ids(x):
    return x.flatten().long().tolist()


# ----------------------------------------------------------------------------- held-out split


def test_held_out_split_keeps_the_training_subset_and_is_disjoint_and_balanced():
    b = _bundle()
    plain = b.subset_train(40)
    s = b.split_train(40, 60)
    # training is exactly the subset a run without a held-out split trains on, in the same order
    assert _ids(s.train_x) == _ids(plain.train_x) and torch.equal(s.train_y, plain.train_y)
    assert plain.val_x is None
    held = _ids(s.val_x)
    assert len(held) == 60 and not set(held) & set(_ids(s.train_x))
    assert torch.bincount(s.val_y, minlength=5).tolist() == [12] * 5
    # labels travel with their examples
    assert torch.equal(s.val_y, torch.tensor(held) % 5)
    # the same split every time (every seed of a comparison)
    assert _ids(b.split_train(40, 60).val_x) == held


def test_held_out_split_of_the_whole_training_set():
    b = _bundle()
    s = b.split_train(0, 25)
    assert len(s.val_y) == 25 and len(s.train_y) == 125
    assert sorted(_ids(s.train_x) + _ids(s.val_x)) == list(range(150))
    assert torch.bincount(s.val_y, minlength=5).tolist() == [5] * 5


def test_held_out_split_errors():
    b = _bundle()
    with pytest.raises(BadInput, match=r"train_subset 100 \+ val_size 60 = 160 examples.*150"):
        b.split_train(100, 60)
    folders = dataclasses.replace(b, train_x=None, train_y=None, train_set=[0], test_set=[0])
    with pytest.raises(BadInput, match="val_size 10: a held-out split needs an in-memory"):
        folders.split_train(0, 10)
    assert folders.split_train(5, 0) is folders


def test_train_scores_the_held_out_split_after_the_last_epoch(tmp_path):
    """`l2bn train` with its default flags plus --val-size: val_acc after the last epoch only,
    in the result and the metrics."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "l2bn", "train", "--dataset", "digits", "--epochs", "2"]
    cmd += ["--train-subset", "600", "--val-size", "300", "--max-steps-per-epoch", "3"]
    r = subprocess.run(
        [*cmd, "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((out / "result.json").read_text())
    assert 0.0 <= res["val_acc"] <= 100.0 and res["train_examples"] == 600
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert ["val_acc" in h for h in hist] == [False, True]
    assert hist[-1]["val_acc"] == res["val_acc"] and "val " in r.stdout
    # scored on the 300 held-out images, not on the test set
    assert res["val_examples"] == 300 and hist[-1]["val_loss"] != hist[-1]["test_loss"]


# ----------------------------------------------------------------------------- failed runs


def _runs(pairs):
    return [
        {"seed": i, "final_train_loss": loss, "test_acc": acc}
        for i, (loss, acc) in enumerate(pairs)
    ]


def test_failure_rule_by_loss_by_accuracy_and_diverged():
    normal = [(0.27, 89.7), (0.26, 89.9), (0.28, 89.4), (0.27, 89.6)]
    assert judge_cell(_runs(normal)) == [None] * 4
    # loss alone: 0.36 > 1.3 x 0.27 = 0.351, accuracy within 3 points
    assert judge_cell(_runs(normal[:3] + [(0.36, 89.0)]))[3].startswith("loss 0.36 > 1.3x 0.27")
    # just under the loss factor and just inside the accuracy gap: not failed
    assert judge_cell(_runs(normal[:3] + [(0.35, 86.8)]))[3] is None
    # accuracy alone: 86.6 < 89.7 - 3
    assert judge_cell(_runs(normal[:3] + [(0.27, 86.6)]))[3] == "acc 86.60 < 89.70 - 3"
    # a diverged run failed; the others are judged against the finished ones
    diverged = {"seed": 4, "final_train_loss": None, "test_acc": None, "diverged": True}
    assert judge_cell(_runs(normal) + [diverged]) == [None] * 4 + ["diverged"]
    # a run missing a value is not judged, and is no reference for the others
    missing = {"seed": 5, "final_train_loss": None, "test_acc": 10.0}
    assert judge_cell(_runs(normal[:3]) + [missing, diverged]) == [None] * 4 + ["diverged"]
    # too few runs to judge (the median of two others is no reference)
    assert judge_cell(_runs([(0.27, 89.7), (0.26, 89.9), (0.9, 50.0)])) == [None] * 3


def _cell(model, norm, runs, **axes):
    return {"model": model, "norm": norm, "axes": axes, "runs": runs}


def test_failure_counts_and_fisher_exact_test():
    ok = [(0.27 + 0.001 * i, 89.5 + 0.01 * i) for i in range(16)]
    bad = ok[:11] + [(0.6, 80.0)] * 5
    cells = {
        "resnet56/bn": _cell("resnet56", "bn", _runs(bad)),
        "resnet56/l2bn": _cell("resnet56", "l2bn", _runs(ok)),
    }
    f = failure_summary(cells)
    assert f["rule"] == FAILURE_RULE
    assert f["cells"]["resnet56/bn"]["failed"] == 5 and f["cells"]["resnet56/l2bn"]["failed"] == 0
    c = f["comparisons"]["resnet56/l2bn"]
    assert (c["failed"], c["n"], c["bn_failed"], c["bn_n"]) == (0, 16, 5, 16)
    # hypergeometric by hand: P(0 of the 5 failures in the first 16 of 32) = C(16,5)/C(32,5),
    # and the table with all 5 there is as likely: two-sided p = 2 * 4368 / 201376
    assert c["p_fisher"] == pytest.approx(2 * 4368 / 201376, rel=1e-9)
    m, _ = f["cells"]["resnet56/bn"]["acc_without_failed"]
    assert m == pytest.approx(sum(a for _, a in ok[:11]) / 11)
    m_all, _ = f["cells"]["resnet56/bn"]["acc_all"]
    assert m_all == pytest.approx((sum(a for _, a in ok[:11]) + 5 * 80.0) / 16)


def test_diverged_runs_count_as_failed_in_their_cell():
    ok = _runs([(0.27, 89.5)] * 4)
    cells = {"m/bn": _cell("m", "bn", ok), "m/l2bn": _cell("m", "l2bn", ok)}
    dv = [{"model": "m", "norm": "bn", "axes": {}, "seed": 4}]
    f = failure_summary(cells, dv)
    assert f["cells"]["m/bn"]["n"] == 5 and f["cells"]["m/bn"]["failed"] == 1
    assert f["comparisons"]["m/l2bn"]["bn_failed"] == 1
    assert f["cells"]["m/bn"]["acc_all"][0] == pytest.approx(89.5)  # finished runs only
    # 3 finished runs and a diverged one: the cell is not judged, and not compared
    f = failure_summary({"m/bn": _cell("m", "bn", ok[:3]), "m/l2bn": cells["m/l2bn"]}, dv)
    assert not f["cells"]["m/bn"]["judged"] and f["cells"]["m/bn"]["failed"] == 1
    assert f["comparisons"] == {}


def test_stability_report_on_the_depth_study_runs(tmp_path):
    """The committed ResNet-56 runs of the depth study: BN's seed 0 (84.77 %, train loss 0.415)
    is the one failed run."""
    from l2bn.report.build import build_report

    res = ROOT / "docs" / "results" / "stability"
    dirs = [str(res / f"resnet56-{n}-seed{s}") for n in ("bn", "l2bn") for s in range(4)]
    build_report(dirs, str(tmp_path))
    s = json.loads((tmp_path / "summary.json").read_text())
    failed = {
        (c["norm"], r["seed"])
        for c in s["failures"]["cells"].values()
        for r in c["runs"]
        if r["failed"]
    }
    assert failed == {("bn", 0)}
    md = (tmp_path / "report.md").read_text()
    assert "## Failed runs" in md and "| resnet56/l2bn vs bn | 0/4 | 1/4 | 1.000 |" in md
    assert "| resnet56/bn | 0 | 0.415 | 84.77 | loss 0.415 > 1.3x 0.281" in md


# ----------------------------------------------------------------------------- best lr


def _lr_cells(spec):
    """spec: {(norm, lr): [(seed, val, test), ...]} -> summary cells."""
    cells = {}
    for (norm, lr), rs in spec.items():
        tests = [t for _, _, t in rs]
        cells[f"r/{norm}/lr={lr}"] = {
            "model": "r",
            "norm": norm,
            "axes": {"lr": lr},
            "n": len(rs),
            "final_mean": sum(tests) / len(tests),
            "final_std": None,
            "runs": [{"seed": s, "val_acc": v, "test_acc": t} for s, v, t in rs],
        }
    return {"cells": cells, "diverged": []}


def test_best_lr_is_chosen_on_held_out_accuracy_not_test():
    summary = _lr_cells(
        {
            # BN: held-out prefers 0.1, test would prefer 0.4
            ("bn", 0.1): [(0, 90.0, 88.0), (1, 90.2, 88.4)],
            ("bn", 0.4): [(0, 89.0, 89.5), (1, 89.1, 89.7)],
            # L2BN: held-out prefers 0.4
            ("l2bn", 0.1): [(0, 89.0, 88.1), (1, 89.0, 88.3)],
            ("l2bn", 0.4): [(0, 90.5, 88.9), (1, 90.7, 89.2)],
        }
    )
    t = tuned_comparison(summary, "lr")
    assert t["choices"]["r/bn"]["value"] == 0.1 and t["choices"]["r/l2bn"]["value"] == 0.4
    d = t["differences"]["r/l2bn@best-bn@best"]
    # paired by seed: (88.9 - 88.0, 89.2 - 88.4)
    assert d["diffs"] == pytest.approx([0.9, 0.8]) and (d["value"], d["bn_value"]) == (0.4, 0.1)


def test_best_lr_at_the_edge_of_the_grid_is_flagged():
    """A choice at the first/last of at least three tried values may not be the norm's best: the
    report says so; an interior choice, or a two-value grid, is not flagged."""
    from l2bn.report.tuned import tuned_lines

    spec = {
        ("bn", 0.1): [(0, 89.0, 88.0)],
        ("bn", 0.2): [(0, 90.0, 88.4)],  # interior
        ("bn", 0.4): [(0, 89.5, 88.9)],
        ("l2bn", 0.1): [(0, 89.0, 88.1)],
        ("l2bn", 0.2): [(0, 89.5, 88.3)],
        ("l2bn", 0.4): [(0, 90.5, 88.9)],  # largest
    }
    t = tuned_comparison(_lr_cells(spec), "lr")
    assert t["choices"]["r/bn"]["edge"] is None and t["choices"]["r/l2bn"]["edge"] == "largest"
    md = "\n".join(tuned_lines(t))
    assert "r/l2bn: the chosen lr = 0.4 is the largest value tried" in md
    assert "r/bn: the chosen" not in md
    spec[("bn", 0.1)] = [(0, 95.0, 88.0)]  # smallest
    assert tuned_comparison(_lr_cells(spec), "lr")["choices"]["r/bn"]["edge"] == "smallest"
    two = {k: v for k, v in spec.items() if k[1] != 0.2}
    assert tuned_comparison(_lr_cells(two), "lr")["choices"]["r/l2bn"]["edge"] is None


def test_best_lr_skips_a_value_where_a_run_diverged_and_needs_val_acc():
    summary = _lr_cells(
        {
            ("bn", 0.1): [(0, 90.0, 88.0), (1, 90.2, 88.4)],
            ("bn", 0.8): [(0, 91.0, 89.0)],  # seed 1 diverged at 0.8
        }
    )
    summary["diverged"] = [{"model": "r", "norm": "bn", "axes": {"lr": 0.8}, "seed": 1}]
    t = tuned_comparison(summary, "lr")
    assert t["choices"]["r/bn"]["value"] == 0.1
    for c in summary["cells"].values():
        for r in c["runs"]:
            del r["val_acc"]
    assert tuned_comparison(summary, "lr") is None


def test_lr_report_from_runs(tmp_path):
    """A report over an lr grid with held-out accuracy: the accuracy-vs-lr figure and the
    best-lr section; a diverged run is listed, counted as failed, and its lr not chosen."""
    from l2bn.report.build import build_report

    dirs = []
    for norm, best in (("bn", 0.1), ("l2bn", 0.4)):
        for lr in (0.1, 0.4):
            for seed in range(4):
                d = tmp_path / f"r-{norm}-{lr}-{seed}"
                cfg = dataclasses.asdict(
                    TrainConfig(
                        dataset="fashion-mnist",
                        norm=norm,
                        seed=seed,
                        epochs=2,
                        lr=lr,
                        val_size=100,
                    )
                )
                d.mkdir()
                if norm == "bn" and lr == 0.4 and seed == 3:
                    body = {
                        "status": "diverged",
                        "message": "loss is nan at epoch 1. The last good",
                        "config": cfg,
                        "epochs_done": 0,
                    }
                else:
                    acc = 89.0 + (1.0 if lr == best else 0.0) + 0.1 * seed
                    body = {
                        "status": "complete",
                        "test_acc": acc,
                        "best_test_acc": acc,
                        "final_train_loss": 0.3,
                        "val_acc": acc + 0.5,
                        "epochs": 2,
                        "wall_time_s": 1.0,
                        "device": "cpu",
                        "config": cfg,
                        "history": [{"epoch": 2, "train_loss": 0.3, "test_acc": acc}],
                    }
                (d / "result.json").write_text(json.dumps(body))
                dirs.append(str(d))
    build_report(dirs, str(tmp_path / "rep"))
    s = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert (tmp_path / "rep" / "accuracy_lr.png").stat().st_size > 0
    t = s["tuned"]["lr"]
    assert t["choices"]["resnet8/bn"]["value"] == 0.1
    assert t["choices"]["resnet8/l2bn"]["value"] == 0.4
    assert t["differences"]["resnet8/l2bn@best-bn@best"]["mean"] == pytest.approx(0.0)
    assert s["failures"]["cells"]["resnet8/bn/lr=0.4"]["failed"] == 1
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Each norm at its own best `lr`" in md and "## Diverged runs" in md
    assert "r-bn-0.4-3 (loss is nan at epoch 1.)" in md


# ----------------------------------------------------------------------------- presets, sweeps


def test_lr_preset_is_the_main_job_at_seven_learning_rates():
    p = plan_compare("lr")
    quick = plan_compare("quick")["train_kw"]
    assert p["grid"] == {"lr": [0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6]}
    assert p["norms"] == ["bn", "l2bn", "l2bn-rms"] and len(p["seeds"]) == 5
    assert p["train_kw"]["val_size"] == 10000 and p["analyze"] is False
    same = {k: v for k, v in p["train_kw"].items() if k not in ("val_size", "eval_every")}
    assert same == {k: v for k, v in quick.items() if k != "width"}
    assert plan_compare("quick")["analyze"] is True
    plan = plan_runs(
        p["out"], p["models"], p["norms"], p["seeds"], p["dataset"], p["train_kw"], p["grid"]
    )
    assert len(plan) == 105 and plan[0][1].out.endswith("resnet8-bn-lr=0.025-seed0")


def test_stability_preset_reuses_the_depth_study_runs():
    p = plan_compare("stability")
    assert p["models"] == ["resnet56"] and p["norms"] == ["bn", "l2bn"]
    assert p["seeds"] == list(range(16)) and FAILURE_RULE in p["note"]
    assert p["train_kw"] == PRESETS["depth"]["train"]
    out = str(ROOT / "docs" / "results" / "stability")
    plan = plan_runs(out, p["models"], p["norms"], p["seeds"], p["dataset"], p["train_kw"])
    first = [cfg for _, cfg in plan if cfg.seed < 4]
    assert len(first) == 8 and all(_status(cfg) == "done" for cfg in first)


def test_compare_records_a_diverged_run_and_goes_on(tmp_path):
    """A run that diverges is an outcome: the sweep trains the others, the report lists it, and
    the same command later counts it as finished instead of training it again."""
    script = (
        "import sys, l2bn.train as t\n"
        "from l2bn.cli import main\n"
        "real = t.train\n"
        "def train(cfg):\n"
        "    if cfg.norm != 'l2bn':\n"
        "        return real(cfg)\n"
        "    import json, pathlib\n"
        "    pathlib.Path(cfg.out).mkdir(parents=True, exist_ok=True)\n"
        "    (pathlib.Path(cfg.out) / 'config.json').write_text(json.dumps(cfg.to_dict()))\n"
        "    (pathlib.Path(cfg.out) / 'result.json').write_text(json.dumps({'status': 'diverged',"
        " 'message': 'loss is nan at epoch 1, step 2: training diverged.', "
        "'config': cfg.to_dict(), 'epochs_done': 0}))\n"
        "    raise t.TrainingDiverged('loss is nan at epoch 1, step 2: training diverged.')\n"
        "t.train = train\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cmd = [
        sys.executable,
        "-c",
        script,
        "compare",
        "--dataset",
        "digits",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--max-steps-per-epoch",
        "2",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    ]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resnet8 l2bn seed 0: diverged: loss is nan" in r.stdout
    # the default flags probe every run: the finished one, not the diverged one
    assert (tmp_path / "resnet8-bn-seed0" / "analysis.json").is_file()
    assert "not analysed" not in r.stdout and "analysing" in r.stdout
    md = (tmp_path / "report.md").read_text()
    assert "## Diverged runs" in md and "resnet8-l2bn-seed0" in md
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "2 runs (2 finished earlier)" in again.stdout


def test_a_true_false_axis_gets_no_accuracy_curve(tmp_path):
    """bool is an int in Python: a nesterov=true,false grid is not a numeric axis."""
    from l2bn.report.build import build_report

    dirs = []
    for norm in ("bn", "l2bn"):
        for nesterov in (True, False):
            for seed in range(2):
                d = tmp_path / f"r-{norm}-{nesterov}-{seed}"
                cfg = dataclasses.asdict(
                    TrainConfig(norm=norm, seed=seed, epochs=2, nesterov=nesterov, val_size=10)
                )
                d.mkdir()
                body = {
                    "status": "complete",
                    "test_acc": 80.0 + seed,
                    "best_test_acc": 80.0,
                    "final_train_loss": 0.3,
                    "val_acc": 70.0,
                    "epochs": 2,
                    "wall_time_s": 1.0,
                    "device": "cpu",
                    "config": cfg,
                    "history": [{"epoch": 2, "train_loss": 0.3, "test_acc": 80.0}],
                }
                (d / "result.json").write_text(json.dumps(body))
                dirs.append(str(d))
    build_report(dirs, str(tmp_path / "rep"))
    s = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert s["axes"] == ["nesterov"] and s["tuned"] == {}
    assert not list((tmp_path / "rep").glob("accuracy_*.png"))
