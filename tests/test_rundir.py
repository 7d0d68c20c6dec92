"""A run directory remembers its recipe: --resume, --test-only and analyze take it from the
run's config.json; recipe flags that contradict it are refused, run-control flags are not."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ENV = dict(os.environ, L2BN_BACKEND="fused", OMP_NUM_THREADS="1")
BASE = [
    "--dataset",
    "digits",
    "--model",
    "resnet8",
    "--epochs",
    "1",
    "--batch-size",
    "64",
    "--lr",
    "0.05",
    "--threads",
    "1",
]


def cli(*args, torchrun=False):
    pre = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "l2bn",
        ]
        if torchrun
        else [sys.executable, "-m", "l2bn"]
    )
    return subprocess.run([*pre, *args], env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module", params=["bn", "l2bn"])
def run(request, tmp_path_factory):
    """A finished 1-epoch digits run (default flags otherwise: TensorBoard and progress on)."""
    d = tmp_path_factory.mktemp(f"rd-{request.param}") / "R"
    r = cli("train", *BASE, "--norm", request.param, "--out", str(d))
    assert r.returncode == 0, r.stderr[-2000:]
    return request.param, d


def _copy(run, tmp_path):
    norm, d = run
    dst = tmp_path / "R"
    shutil.copytree(d, dst)
    return norm, dst


@pytest.mark.parametrize("torchrun", [False, True])
def test_test_only_uses_the_saved_recipe(run, tmp_path, torchrun):
    norm, d = _copy(run, tmp_path)
    r = cli("train", "--out", str(d), "--test-only", torchrun=torchrun)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-2500:]
    res = json.loads((d / "result.json").read_text())
    t = json.loads((d / "test_result.json").read_text())
    assert t["dataset"] == "digits" and t["config"]["norm"] == norm and t["checkpoint"] == "best.pt"
    assert t["test_acc"] == pytest.approx(
        res["best_test_acc"], abs=1e-9
    )  # not 10% on Fashion-MNIST
    assert f"test acc {t['test_acc']:.2f}%" in r.stdout


@pytest.mark.parametrize("torchrun", [False, True])
def test_resume_extends_the_same_run(run, tmp_path, torchrun):
    norm, d = _copy(run, tmp_path)
    r = cli(
        "train",
        "--out",
        str(d),
        "--resume",
        "--epochs",
        "2",
        "--no-tensorboard",
        "--threads",
        "1",
        torchrun=torchrun,
    )
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-2500:]
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    res = json.loads((d / "result.json").read_text())
    # the run's training time covers both processes' epochs; wall_time_s only the resumed one
    assert res["train_time_s"] == pytest.approx(sum(x["epoch_time_s"] for x in lines))
    assert res["train_time_s"] > lines[1]["epoch_time_s"] > 0
    assert (
        res["config"]["dataset"] == "digits"
        and res["config"]["norm"] == norm
        and res["epochs"] == 2
    )
    assert res["train_examples"] < 2000  # digits, not Fashion-MNIST's 60,000
    assert json.loads((d / "config.json").read_text())["dataset"] == "digits"


@pytest.mark.parametrize("mode", ["--resume", "--test-only"])
def test_conflicting_recipe_flags_are_refused(run, tmp_path, mode):
    norm, d = _copy(run, tmp_path)
    other = "bn" if norm == "l2bn" else "l2bn-rms"
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    r = cli(
        "train",
        "--out",
        str(d),
        mode,
        "--dataset",
        "fashion-mnist",
        "--lr",
        "0.2",
        "--norm",
        other,
        "--batch-size",
        "32",
        "--threads",
        "1",
        "--no-tensorboard",
    )
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "keeps one recipe" in err[0], r.stderr
    for key in (
        "dataset: saved 'digits', given 'fashion-mnist'",
        "lr: saved 0.05, given 0.2",
        f"norm: saved '{norm}', given '{other}'",
        "batch_size: saved 64, given 32",
    ):
        assert key in err[0], err[0]
    assert "threads" not in err[0] and "tensorboard" not in err[0]  # run control may change
    after = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    assert after == before  # nothing written into R


def test_analyze_uses_the_saved_recipe(run, tmp_path):
    norm, d = _copy(run, tmp_path)
    r = cli("analyze", str(d))
    assert r.returncode == 0, r.stderr[-2000:]
    a = json.loads((d / "analysis.json").read_text())
    assert a["dataset"] == "digits" and a["norm"] == norm
    assert a["test_acc_recomputed"] == pytest.approx(
        json.loads((d / "result.json").read_text())["test_acc"], abs=1e-6
    )


def test_resume_cannot_shorten(run, tmp_path):
    _, d = _copy(run, tmp_path)
    assert cli("train", "--out", str(d), "--resume", "--epochs", "2").returncode == 0
    r = cli("train", "--out", str(d), "--resume", "--epochs", "1")
    assert r.returncode == 2 and "would not extend the run" in r.stderr


def test_extending_epochs_replans_the_schedule(tmp_path):
    """Resume with more epochs == a run configured with that many epochs from the start? No: the
    completed epochs keep their old schedule; from the resume point on the learning rate follows
    the longer schedule (documented in l2bn.train.optim)."""
    import torch

    from l2bn.train.config import TrainConfig
    from l2bn.train.optim import fast_forward, make_scheduler

    def lrs(epochs, start, steps):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=0.1)
        s = make_scheduler(TrainConfig(epochs=epochs, warmup_epochs=0.5), opt, 10)
        fast_forward(s, start)
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            s.step()
        return out

    long_run = lrs(4, 0, 40)
    assert (
        lrs(4, 20, 20) == long_run[20:]
    )  # resumed at epoch 2 of 4: exactly the uninterrupted values
    assert lrs(2, 0, 20) != long_run[:20]
