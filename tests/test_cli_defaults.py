"""Every CLI command and dataset family end to end with the CLI's default flags (TensorBoard and
progress on, default model/norm/recipe except the few flags that make a fixture small), and bad
input through every command: one clear line on stderr, exit code 2, nothing half-written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures import make_cifar, make_imagefolder

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "l2bn", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=cwd,
    )


def _ok(r):
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


def _one_line_error(r, *needles):
    assert r.returncode == 2, r.stdout[-1000:] + r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _trained(out: Path):
    res = json.loads((out / "result.json").read_text())
    assert res["status"] == "complete"
    assert list((out / "tb").glob("events.out.tfevents.*")), "TensorBoard is on by default"
    return res


def test_train_defaults_fashion_mnist(tmp_path):
    # the default dataset (Fashion-MNIST from Debian), model, norm, recipe; one short epoch
    _ok(cli("train", "--epochs", "1", "--train-subset", "512", "--out", str(tmp_path / "R")))
    res = _trained(tmp_path / "R")
    assert res["config"]["dataset"] == "fashion-mnist" and res["config"]["norm"] == "l2bn"
    assert res["train_examples"] == 512 and len(res["history"]) == 1
    # evaluated on the full 10,000-image test set: a whole number of hits, logged identically
    hits = res["test_acc"] * 100
    assert abs(hits - round(hits)) < 1e-6 and res["history"][0]["test_acc"] == res["test_acc"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "R" / "tb"))
    ea.Reload()
    assert ea.Scalars("test_acc")[0].value == pytest.approx(res["test_acc"], rel=1e-6)


def test_train_defaults_digits(tmp_path):
    _ok(cli("train", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / "R")))
    assert _trained(tmp_path / "R")["train_examples"] > 1000


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_train_defaults_cifar(tmp_path, which):
    make_cifar(tmp_path / "c", which, n_per_batch=20)
    r = cli(
        "train",
        "--dataset",
        which,
        "--data-dir",
        str(tmp_path / "c"),
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "R"),
    )
    _one_line_error(r, "not the official", "--no-verify-data")  # the default verifies the checksums
    assert not (tmp_path / "R").exists()
    _ok(
        cli(
            "train",
            "--dataset",
            which,
            "--data-dir",
            str(tmp_path / "c"),
            "--no-verify-data",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--out",
            str(tmp_path / "R"),
        )
    )
    _trained(tmp_path / "R")


def test_train_defaults_imagefolder(tmp_path):
    make_imagefolder(tmp_path / "imgs", classes=3, per_class=6, size=40)
    _ok(
        cli(
            "train",
            "--dataset",
            "imagefolder",
            "--data-dir",
            str(tmp_path / "imgs"),
            "--epochs",
            "1",
            "--batch-size",
            "6",
            "--out",
            str(tmp_path / "R"),
        )
    )
    assert _trained(tmp_path / "R")["train_examples"] == 18


def test_train_defaults_dcase_logs_per_device_accuracy(tmp_path):
    """Default flags on the official TAU layout: TensorBoard receives the per-device accuracy
    (a dict) as one scalar per device instead of crashing after the first epoch."""
    from test_audio import make_dcase

    make_dcase(tmp_path / "tau", seconds=1.5)
    _ok(
        cli(
            "train",
            "--dataset",
            "dcase2020-1a",
            "--data-dir",
            str(tmp_path / "tau"),
            "--model",
            "dcase-resnet",
            "--norm",
            "l2bn",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--max-steps-per-epoch",
            "2",
            "--out",
            str(tmp_path / "R"),
        )
    )
    res = _trained(tmp_path / "R")
    assert set(res["per_group_acc"]) == {"a", "c", "s4"} and set(res["best_per_group_acc"]) == set(
        res["per_group_acc"]
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "R" / "tb"))
    ea.Reload()
    assert {"per_group_acc/a", "per_group_acc/s4", "test_acc"} <= set(ea.Tags()["scalars"])


def test_train_defaults_audio_folder(tmp_path):
    import csv

    import soundfile as sf

    root = tmp_path / "af"
    (root / "clips").mkdir(parents=True)
    rows = []
    for i in range(24):
        f0 = 300 if i % 2 else 900
        t = np.arange(32000) / 16000
        y = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.02 * np.random.default_rng(i).standard_normal(
            32000
        )
        sf.write(root / f"clips/{i}.wav", y.astype(np.float32), 16000)
        rows.append((f"clips/{i}.wav", "low" if i % 2 else "high"))
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        w.writerows(rows)
    _ok(
        cli(
            "train",
            "--dataset",
            "audio-folder",
            "--data-dir",
            str(root),
            "--model",
            "audio-cnn",
            "--sample-rate",
            "16000",
            "--clip-seconds",
            "2",
            "--n-mels",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--out",
            str(tmp_path / "R"),
        )
    )
    _trained(tmp_path / "R")


def test_compare_defaults_small(tmp_path):
    """The main job's command (preset quick: Fashion-MNIST, ResNet-8, BN vs L2BN, analysis and
    report on), shortened to one seed, one epoch and 600 images."""
    out = tmp_path / "cmp"
    _ok(cli("compare", "--epochs", "1", "--train-subset", "600", "--seeds", "0", "--out", str(out)))
    s = json.loads((out / "summary.json").read_text())
    assert set(s["cells"]) == {"resnet8/bn", "resnet8/l2bn"} and s["mechanism"]
    for f in ("report.md", "report.html", "curves.png", "norm_cv.png"):
        assert (out / f).is_file(), f
    assert list((out / "resnet8-l2bn-seed0" / "tb").glob("events.*"))


def test_bench_quick(tmp_path):
    r = cli("bench", "--quick", "--reps", "2", "--json", str(tmp_path / "b.json"))
    _ok(r)
    assert "| L2BN/BN |" in r.stdout and "resnet-cifar s1 128x16x32x32 |" in r.stdout
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [row["name"] for row in rows] == ["resnet-cifar s1", "mlp"]
    for row in rows:
        # saved bytes are exact (not timings): L2BN saves what BN saves, the composite ~3x
        assert (
            row["saved"]["l2bn"] <= 1.05 * row["saved"]["bn"]
            and row["saved"]["naive"] >= 2.5 * row["saved"]["bn"]
        )
        for mode in ("train", "eval"):
            assert (
                row["ratio_q25"][mode]["l2bn"]
                <= row["ratio_median"][mode]["l2bn"]
                <= row["ratio_q75"][mode]["l2bn"]
            )


def test_compare_bad_input_is_one_line(tmp_path):
    _one_line_error(
        cli("compare", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")),
        "config file not found",
        "missing.yaml",
    )
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    _one_line_error(
        cli("compare", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o")),
        "unknown config key 'epochz'",
        "did you mean 'epochs'",
    )
    _one_line_error(
        cli("compare", "--grid", "batch_sise=16,32", "--out", str(tmp_path / "o")),
        "unknown config key 'batch_sise'",
    )
    _one_line_error(
        cli("compare", "--grid", "batch_size=16,abc", "--out", str(tmp_path / "o")),
        "batch_size = 'abc': expected an integer >= 1",
    )
    assert not (tmp_path / "o").exists()
    # a corrupt checkpoint in an unfinished run that compare would resume
    args = (
        "compare",
        "--dataset",
        "digits",
        "--models",
        "resnet8",
        "--norms",
        "bn",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--no-analyze",
        "--out",
        str(tmp_path / "c2"),
    )
    _ok(cli(*args))
    run = tmp_path / "c2" / "resnet8-bn-seed0"
    (run / "result.json").unlink()  # as if killed after its last checkpoint
    (run / "last.pt").write_bytes(b"\x80\x02garbage")
    _one_line_error(cli(*args), "last.pt: corrupt or unreadable checkpoint")


def test_train_bad_data_dir_names_it(tmp_path):
    r = cli(
        "train",
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        str(tmp_path / "nonexistent"),
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "R"),
    )
    _one_line_error(r, str(tmp_path / "nonexistent"), "does not exist")
    assert not (tmp_path / "R").exists()
    r = cli("analyze", str(tmp_path / "nope"))
    _one_line_error(r, "run directory not found")


def test_corrupt_checkpoint_through_train_resume_and_analyze(tmp_path):
    """A damaged last.pt met by `train --resume` and by `analyze`: one line naming the file,
    exit 2, and the damaged file left as it was (nothing overwritten)."""
    out = tmp_path / "R"
    args = ("train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--out", str(out))
    _ok(cli(*args))
    (out / "result.json").unlink()  # as if killed after its last checkpoint
    (out / "last.pt").write_bytes(b"\x80\x02garbage")
    _one_line_error(cli(*args, "--resume"), "last.pt", "corrupt or unreadable checkpoint")
    _one_line_error(cli("analyze", str(out)), "last.pt")
    assert (out / "last.pt").read_bytes() == b"\x80\x02garbage"
    assert not (out / "result.json").exists()


@pytest.mark.parametrize("net", ["resnet", "fcnn", "fsfcnn"])
def test_compare_dcase_recipes_on_the_official_layout(tmp_path, net):
    """`l2bn compare --config dcase2020-1a-<net>` (a shipped recipe, by name) end to end with
    default flags on a fixture in the official TAU layout (epochs and steps cut to fit a test)."""
    from test_audio import make_dcase

    make_dcase(tmp_path / "tau", seconds=1.5)
    cfg = f"dcase2020-1a-{net}"
    out = tmp_path / "cmp"
    _ok(
        cli(
            "compare",
            "--config",
            str(cfg),
            "--dataset",
            "dcase2020-1a",
            "--data-dir",
            str(tmp_path / "tau"),
            "--models",
            f"dcase-{net}",
            "--seeds",
            "0",
            "--epochs",
            "1",
            "--max-steps-per-epoch",
            "2",
            "--batch-size",
            "4",
            *([] if net == "resnet" else ["--norms", "l2bn-rms"]),
            "--out",
            str(out),
        )
    )
    s = json.loads((out / "summary.json").read_text())
    # the recipe's norm (l2bn-rms) against BN by default; one cell per norm given otherwise
    assert set(s["cells"]) == (
        {"dcase-resnet/bn", "dcase-resnet/l2bn-rms"}
        if net == "resnet"
        else {f"dcase-{net}/l2bn-rms"}
    )
    r = json.loads(next(out.glob("*-seed0/result.json")).read_text())
    assert r["config"]["mixup_mode"] == "pairs" and set(r["best_per_group_acc"]) == {"a", "c", "s4"}
    assert "Accuracy per group" in (out / "report.md").read_text()
