"""Bad input caught before any work, in one line (exit 2), through the real ``l2bn`` command with
its default flags: typed recipe values, whole-plan checks in ``compare``, run directories that
are files or cannot be written, Ctrl-C, a full disk, range checks, ``--help`` and the shipped
recipes."""

import errno
import json
import signal
import subprocess
import sys
import time

import pytest
from test_cli_defaults import ENV, _ok, _one_line_error, cli

from l2bn import cli as l2bn_cli


@pytest.mark.parametrize(
    "text,needle",
    [
        ('nesterov: "no"\n', "nesterov = 'no': expected true or false"),
        ("batch_size: 64.7\n", "batch_size = 64.7: expected an integer >= 1"),
        ('epochs: "two"\n', "epochs = 'two': expected an integer >= 1"),
        ("lr: -0.1\n", "lr = -0.1: expected a number > 0"),
        ("norm: l2bnn\n", "norm = 'l2bnn': expected one of bn, l2bn"),
        ("lr: [0.1\n", "not valid YAML"),
    ],
)
def test_recipe_values_are_typed_and_checked(tmp_path, text, needle):
    cfg = tmp_path / "r.yaml"
    cfg.write_text(text)
    r = cli("train", "--dataset", "digits", "--config", str(cfg), "--out", str(tmp_path / "R"))
    _one_line_error(r, str(cfg), needle)
    assert not (tmp_path / "R").exists()


def test_unambiguous_yaml_values_are_coerced(tmp_path):
    """YAML reads ``1e-2`` as a string: it is the number 0.01, saved as one."""
    cfg = tmp_path / "r.yaml"
    cfg.write_text("lr: 1e-2\nepochs: 1\nbatch_size: 64.0\n")
    _ok(cli("train", "--dataset", "digits", "--config", str(cfg), "--out", str(tmp_path / "R")))
    saved = json.loads((tmp_path / "R" / "config.json").read_text())
    assert (
        saved["lr"] == 0.01 and saved["batch_size"] == 64 and isinstance(saved["batch_size"], int)
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--epochs", "0"], "--epochs 0: expected an integer >= 1"),
        (["--train-subset", "-5"], "--train-subset -5: expected an integer >= 0"),
        (["--lr", "0"], "--lr 0.0: expected a number > 0"),
        (["--schedule", "cosin"], "--schedule 'cosin': expected one of cosine, step"),
    ],
)
def test_flag_ranges(tmp_path, args, needle):
    r = cli("train", "--dataset", "digits", *args, "--out", str(tmp_path / "R"))
    _one_line_error(r, needle)
    assert not (tmp_path / "R").exists()


def test_an_extended_run_resumes_plainly(tmp_path):
    """--resume --epochs 2 on a 1-epoch run rewrites config.json (the run's truth): a later plain
    --resume continues that run instead of blaming a flag the user never passed."""
    out = str(tmp_path / "R")
    _ok(cli("train", "--dataset", "digits", "--epochs", "1", "--out", out))
    _ok(cli("train", "--dataset", "digits", "--out", out, "--resume", "--epochs", "2"))
    assert json.loads((tmp_path / "R" / "config.json").read_text())["epochs"] == 2
    r = cli("train", "--dataset", "digits", "--out", out, "--resume")
    _ok(r)
    assert json.loads((tmp_path / "R" / "result.json").read_text())["epochs"] == 2


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--norms", "bn", "l2bnn"], "run resnet8 l2bnn seed 0: norm = 'l2bnn'"),
        (["--models", "resnet8", "resnet9"], "model = 'resnet9': expected one of"),
        (["--grid", "batch_size=32,0"], "batch_size = '0': expected an integer >= 1"),
        (["--epochs", "0"], "epochs = 0: expected an integer >= 1"),
    ],
)
def test_compare_checks_the_whole_plan_before_training(tmp_path, args, needle):
    epochs = [] if "--epochs" in args else ["--epochs", "1"]
    r = cli(
        "compare",
        "--dataset",
        "digits",
        "--seeds",
        "0",
        *epochs,
        *args,
        "--out",
        str(tmp_path / "C"),
    )
    _one_line_error(r, needle)
    assert not (tmp_path / "C").exists()  # nothing trained, nothing written


def test_out_that_is_a_file(tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("x")
    _one_line_error(cli("train", "--dataset", "digits", "--out", str(f)), f"--out {f}: is a file")


def test_an_unwritable_run_directory_is_one_line(tmp_path, monkeypatch, capsys):
    """An OS error of the machine (read-only file system, no permission, full disk) names the
    path in one line, exit 2 (root ignores permissions, so the error is injected)."""
    import pathlib

    def refuse(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", refuse)
    code = l2bn_cli.main(["train", "--dataset", "digits", "--out", str(tmp_path / "R" / "S")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Read-only file system" in err[0] and "R" in err[0], err


def test_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import torch

    from l2bn.train.checkpoint import CheckpointError, save_checkpoint

    path = tmp_path / "last.pt"
    save_checkpoint({"a": 1}, path)

    def full(*a, **k):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 170176 vs 170072"
        )

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(
        CheckpointError, match=r"could not write .*last.pt .*the previous last.pt is intact"
    ):
        save_checkpoint({"a": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_ctrl_c_says_how_to_continue(tmp_path):
    out = tmp_path / "R"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "l2bn",
            "train",
            "--dataset",
            "digits",
            "--epochs",
            "100000",
            "--out",
            str(out),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a background job or a test worker may have inherited SIGINT as ignored: give the child
        # the terminal's default, as a user's Ctrl-C meets it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (
        (out / "metrics.jsonl").is_file() and (out / "last.pt").is_file()
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [
        ln for ln in err.strip().splitlines() if ln.strip() and "%|" not in ln and "it/s" not in ln
    ]
    assert proc.returncode == 130, err[-2000:]
    assert (
        len(lines) == 1 and f"l2bn train --out {out} --resume" in lines[-1] and "saved" in lines[-1]
    ), lines
    _ok(cli("train", "--out", str(out), "--resume", "--epochs", "2"))


def test_help_describes_every_flag():
    for cmd in ("train", "compare"):
        r = subprocess.run(
            [sys.executable, "-m", "l2bn", cmd, "--help"], env=ENV, capture_output=True, text=True
        )
        assert r.returncode == 0
        flat = " ".join(r.stdout.split())
        for token in flat.split(" --")[1:]:
            name = token.split(" ", 1)[0]
            assert not token.split(" ", 2)[-1].startswith("(default"), (
                f"{cmd} --{name} has no description"
            )
    r = subprocess.run(
        [sys.executable, "-m", "l2bn", "compare", "--help"], env=ENV, capture_output=True, text=True
    )
    flat = " ".join(r.stdout.split())
    assert "(default: 5 with --preset quick" in flat  # the epochs that apply, not the field's 10
    assert "--resume" not in flat and "--test-only" not in flat
    assert "one of cosine, step, onecycle, sgdr, constant" in flat


def test_shipped_recipes_by_name(tmp_path):
    r = cli("train", "--list-configs")
    _ok(r)
    assert "dcase2020-1a-resnet" in r.stdout.split() and "cifar10-resnet56" in r.stdout.split()
    _one_line_error(
        cli("train", "--config", "cifar10-resnet57", "--out", str(tmp_path / "R")),
        "config file not found: cifar10-resnet57",
        "cifar10-resnet56",
    )


def test_an_internal_error_keeps_its_traceback(tmp_path, monkeypatch):
    """A bug (here a shape error raised inside the training step) is not bad input: the CLI lets
    the traceback through instead of one line and exit 2."""
    import l2bn.train.trainer as loop  # the trainer's own reference to the epoch function

    def broken(*a, **k):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (128x64 and 32x10)")

    monkeypatch.setattr(loop, "train_one_epoch", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        l2bn_cli.main(
            [
                "train",
                "--dataset",
                "digits",
                "--epochs",
                "1",
                "--no-progress",
                "--out",
                str(tmp_path / "R"),
            ]
        )
    for err in (
        ValueError("a value error inside torch"),
        ImportError("cannot import name 'x' from 'l2bn.models'"),
    ):
        monkeypatch.setattr(
            loop, "train_one_epoch", lambda *a, e=err, **k: (_ for _ in ()).throw(e)
        )
        with pytest.raises(type(err)):
            l2bn_cli.main(
                [
                    "train",
                    "--dataset",
                    "digits",
                    "--epochs",
                    "1",
                    "--no-progress",
                    "--out",
                    str(tmp_path / "S"),
                ]
            )


def test_deliberate_input_errors_are_usage_errors(tmp_path, capsys):
    """Every error l2bn raises for bad input derives from l2bn.io.UsageError (one line, exit 2),
    and stays the builtin type callers catch (ValueError, FileNotFoundError, ...)."""
    from l2bn.data import DataNotFoundError
    from l2bn.io import BadInput, UsageError
    from l2bn.models import create_model

    assert issubclass(DataNotFoundError, FileNotFoundError) and issubclass(
        DataNotFoundError, UsageError
    )
    with pytest.raises(BadInput, match="unknown model 'resnet9'"):
        create_model("resnet9", num_classes=10)
    assert issubclass(BadInput, ValueError)
    code = l2bn_cli.main(["analyze", str(tmp_path / "missing-run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing-run" in err[0], err


def test_a_missing_optional_package_is_one_line_but_a_missing_l2bn_module_is_not(
    tmp_path, monkeypatch, capsys
):
    """ModuleNotFoundError of a third-party package: one line naming it, exit 2; of l2bn's own
    modules (a broken install): the traceback."""
    import l2bn.train.trainer as trainer

    args = ["train", "--dataset", "digits", "--epochs", "1", "--no-progress", "--out"]
    monkeypatch.setattr(
        trainer, "train_one_epoch", _raise(ModuleNotFoundError("no yaml", name="yaml"))
    )
    code = l2bn_cli.main([*args, str(tmp_path / "R")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "optional package 'yaml'" in err[0], err
    monkeypatch.setattr(
        trainer, "train_one_epoch", _raise(ModuleNotFoundError("x", name="l2bn.gone"))
    )
    with pytest.raises(ModuleNotFoundError, match="x"):
        l2bn_cli.main([*args, str(tmp_path / "S")])


def _raise(exc):
    def fn(*a, **k):
        raise exc

    return fn
