"""Files from others never run code: crafted checkpoints and CIFAR batches are refused with one
clear error line, through every command that reads them; mismatch errors stay short."""

import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from fixtures import make_cifar

from l2bn.train import TrainConfig, train
from l2bn.train.checkpoint import CheckpointError, load_checkpoint, load_model_state

ENV = dict(os.environ, L2BN_BACKEND="fused", OMP_NUM_THREADS="1")


class Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "l2bn", *args], env=ENV, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("safe") / "run"
    train(
        TrainConfig(
            dataset="digits",
            model="resnet8",
            norm="l2bn",
            epochs=1,
            batch_size=64,
            lr=0.05,
            out=str(d),
            progress=False,
            tensorboard=False,
            threads=1,
        )
    )
    return d


def _poison(src, dst, marker):
    shutil.copytree(src, dst)
    state = torch.load(src / "last.pt", weights_only=True)
    state["history"].append(Evil(marker))
    for name in ("last.pt", "best.pt"):
        torch.save(state, dst / name)
    return dst


def test_current_checkpoints_hold_only_safe_types(run_dir):
    state = torch.load(
        run_dir / "last.pt", weights_only=True
    )  # raises if anything unsafe were inside
    assert state["rng"]["torch"].dtype == torch.uint8 and state["rng"]["torch"].device.type == "cpu"
    assert load_checkpoint(run_dir / "best.pt")["epoch"] == 0


@pytest.mark.parametrize("command", ["resume", "test-only", "analyze", "compare"])
def test_crafted_checkpoint_runs_no_code(tmp_path, run_dir, command):
    marker = tmp_path / "PWNED"
    bad = _poison(run_dir, tmp_path / "bad", marker)
    if command == "resume":
        r = cli("train", "--out", str(bad), "--resume", "--epochs", "2", "--no-progress")
    elif command == "test-only":
        r = cli("train", "--out", str(bad), "--test-only")
    elif command == "analyze":
        r = cli("analyze", str(bad))
    else:  # compare meets the crafted file in an unfinished run it would resume
        cmp_dir = tmp_path / "cmp"
        cmp_dir.mkdir()
        shutil.move(str(bad), cmp_dir / "resnet8-l2bn-seed0")
        (cmp_dir / "resnet8-l2bn-seed0" / "result.json").unlink()
        r = cli(
            "compare",
            "--dataset",
            "digits",
            "--models",
            "resnet8",
            "--norms",
            "l2bn",
            "--seeds",
            "0",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--lr",
            "0.05",
            "--train-subset",
            "0",
            "--warmup-epochs",
            "0",
            "--out",
            str(cmp_dir),
        )
    assert not marker.exists(), "the crafted checkpoint executed its command"
    assert r.returncode == 2, r.stdout[-1500:] + r.stderr[-1500:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "refused" in err[0] and "unsafe unpickling" in err[0], r.stderr[-1500:]


def test_crafted_cifar_batch_runs_no_code(tmp_path):
    marker = tmp_path / "PWNED"
    make_cifar(tmp_path / "c", "cifar10", n_per_batch=10)
    with open(tmp_path / "c" / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": Evil(marker), b"labels": [0]}, f, protocol=2)
    r = cli(
        "train",
        "--dataset",
        "cifar10",
        "--data-dir",
        str(tmp_path / "c"),
        "--no-verify-data",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "run"),
    )
    assert not marker.exists(), "the crafted CIFAR batch executed its command"
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "data_batch_2: refused" in err[0] and "system" in err[0], r.stderr
    assert not (tmp_path / "run").exists(), "nothing is written when the data cannot be read"


def test_object_array_in_cifar_batch_refused(tmp_path):
    import numpy as np

    from l2bn.data import load_dataset
    from l2bn.data.integrity import DataIntegrityError

    make_cifar(tmp_path, "cifar10", n_per_batch=10)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump(
            {b"data": np.array([object()] * 3, dtype=object), b"labels": [0, 1, 2]}, f, protocol=2
        )
    with pytest.raises(DataIntegrityError, match="test_batch: refused"):
        load_dataset("cifar10", str(tmp_path), verify_data=False)


def test_mismatch_error_is_short(run_dir):
    from l2bn.models import create_model

    state = load_checkpoint(run_dir / "last.pt")
    other = create_model("resnet20", 10, 1, "bn")
    with pytest.raises(CheckpointError) as e:
        load_model_state(
            other, state, run_dir / "last.pt", want={"model": "resnet20", "norm": "bn"}
        )
    msg = str(e.value)
    assert (
        "saved for model 'resnet8' norm 'l2bn'" in msg
        and "asks for model 'resnet20' norm 'bn'" in msg
    )
    assert "missing keys" in msg and "(+" in msg and len(msg) < 600 and "\n" not in msg


def test_resume_loads_the_rng_state_on_the_cpu(run_dir, tmp_path, monkeypatch):
    """On a GPU, mapping a checkpoint to the device moved the CPU RNG state there and
    torch.set_rng_state refused it. Simulated without a GPU: a load mapped anywhere but the CPU
    hands back an RNG state that set_rng_state rejects, as a CUDA tensor would be."""
    import l2bn.train.checkpoint as ck

    real = torch.load

    def load(*a, map_location=None, **kw):
        state = real(*a, map_location="cpu", **kw)
        if map_location != "cpu" and isinstance(state, dict) and "rng" in state:
            state["rng"]["torch"] = state["rng"]["torch"].float()  # what set_rng_state cannot take
        return state

    monkeypatch.setattr(ck.torch, "load", load)
    d = tmp_path / "R"
    shutil.copytree(run_dir, d)
    res = train(
        TrainConfig(
            dataset="digits",
            model="resnet8",
            norm="l2bn",
            epochs=2,
            batch_size=64,
            lr=0.05,
            out=str(d),
            progress=False,
            tensorboard=False,
            threads=1,
            resume=True,
        )
    )
    assert res["epochs"] == 2 and len(res["history"]) == 2
