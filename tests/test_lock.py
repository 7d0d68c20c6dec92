"""One writer per run directory: a run trained by a live process is refused to every other one
(train, resume, compare), the lock goes with its process however that ends, and two ``compare``
calls whose grids overlap share the work instead of training the same run twice."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from l2bn.train.lock import LOCK_NAME, RunDirBusy, lock_owner, run_lock

ENV = dict(os.environ, L2BN_BACKEND="fused", OMP_NUM_THREADS="1")
HOLD = (
    "import sys, time; from l2bn.train.lock import run_lock\n"
    "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(float(sys.argv[2]))"
)
# holds the lock without writing an owner record (as in the instant between flock and write)
RAW = (
    "import fcntl, os, sys, time; fd = os.open(os.path.join(sys.argv[1], '.lock'), os.O_RDWR | "
    "os.O_CREAT)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"
)
OWNER = (
    "import json, sys; from l2bn.train.lock import lock_owner; "
    "print(json.dumps(lock_owner(sys.argv[1])))"
)


@pytest.fixture
def holder():
    """Start a process holding the lock of a directory (``seconds``, or until the test ends)."""
    procs = []

    def start(d, seconds=600.0, code=HOLD):
        os.makedirs(d, exist_ok=True)
        p = subprocess.Popen(
            [sys.executable, "-c", code, str(d), str(seconds)],
            env=ENV,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout.readline().strip() == "held"
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def owner_seen_by_another_process(d):
    r = subprocess.run(
        [sys.executable, "-c", OWNER, str(d)], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_lock_is_held_for_the_block_and_released_after(tmp_path):
    d = tmp_path / "R"
    assert lock_owner(d) is None
    with run_lock(d):
        seen = owner_seen_by_another_process(d)
        assert seen["pid"] == os.getpid() and seen["host"] == socket.gethostname()
        assert abs(seen["started"] - time.time()) < 120
        assert lock_owner(d) == seen  # in this process: its own record
        with run_lock(d):  # re-entrant within the process
            pass
        assert owner_seen_by_another_process(d)["pid"] == os.getpid(), (
            "the inner block released the outer lock"
        )
    assert owner_seen_by_another_process(d) is None and lock_owner(d) is None


def test_lock_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(KeyError):
        with run_lock(tmp_path):
            raise KeyError("x")
    assert lock_owner(tmp_path) is None
    with run_lock(tmp_path):  # and can be taken again
        pass


def test_a_live_owner_is_refused_with_its_pid(tmp_path, holder):
    p = holder(tmp_path)
    assert lock_owner(tmp_path)["pid"] == p.pid
    with pytest.raises(
        RunDirBusy,
        match=f"{tmp_path} is being trained by another process \\(pid {p.pid} on "
        f"{socket.gethostname()}, since 20",
    ):
        with run_lock(tmp_path):
            pytest.fail("entered a directory another live process holds")
    assert lock_owner(tmp_path)["pid"] == p.pid and p.poll() is None  # its lock is untouched


def test_an_owner_that_has_not_written_its_record_is_still_an_owner(tmp_path, holder):
    holder(tmp_path, code=RAW)
    assert lock_owner(tmp_path) == {}
    with pytest.raises(RunDirBusy, match="pid \\? on \\?, since \\?"):
        with run_lock(tmp_path):
            pass


def test_the_lock_goes_with_its_process_however_it_ends(tmp_path, holder):
    """SIGKILL leaves the file and its record behind, but not the lock: no stale-lock guessing
    from pids (which containers reuse)."""
    p = holder(tmp_path)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == p.pid  # the record stays
    assert lock_owner(tmp_path) is None
    with run_lock(tmp_path):
        assert owner_seen_by_another_process(tmp_path)["pid"] == os.getpid()


@pytest.mark.parametrize(
    "content", ["", "not json", "[1, 2]", json.dumps({"pid": 1, "host": socket.gethostname()})]
)
def test_an_unlocked_file_is_free_whatever_it_says(tmp_path, content):
    (tmp_path / LOCK_NAME).write_text(content)
    assert lock_owner(tmp_path) is None
    with run_lock(tmp_path):
        pass


def test_a_failed_start_leaves_no_directory_behind(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    old.mkdir()
    for d in (new, old):
        with pytest.raises(FileNotFoundError):
            with run_lock(d):
                raise FileNotFoundError("no data")
    assert not new.exists()  # created for the lock only: removed
    assert old.is_dir()  # existed before: kept
    with run_lock(new):
        (new / "result.json").write_text("{}")
    assert sorted(p.name for p in new.iterdir()) == [LOCK_NAME, "result.json"]  # work written: kept


def test_wait_blocks_until_the_owner_lets_go(tmp_path, holder):
    holder(tmp_path, seconds=3)
    t = time.time()
    with run_lock(tmp_path, wait=True):
        waited = time.time() - t
        assert lock_owner(tmp_path)["pid"] == os.getpid()
    assert waited > 0.5


@pytest.mark.parametrize(
    "env,takes",
    [
        ({}, True),
        ({"RANK": "0", "WORLD_SIZE": "2"}, True),
        ({"RANK": "1", "WORLD_SIZE": "2"}, False),
        ({"RANK": "3", "WORLD_SIZE": "1"}, True),
    ],
)
def test_which_process_of_a_job_holds_the_lock(monkeypatch, env, takes):
    from l2bn.train.config import TrainConfig
    from l2bn.train.trainer import _takes_lock

    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert _takes_lock(TrainConfig()) is takes
    assert _takes_lock(TrainConfig(test_only=True)) is False


def _train(out, *extra):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "l2bn",
            "train",
            "--dataset",
            "digits",
            "--model",
            "resnet8",
            "--norm",
            "bn",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--train-subset",
            "256",
            "--threads",
            "1",
            "--no-tensorboard",
            "--out",
            str(out),
            *extra,
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_train_refuses_a_run_another_process_trains_but_test_only_may_read_it(tmp_path, holder):
    d = tmp_path / "R"
    p = holder(d)
    r = _train(d)
    assert r.returncode == 2, r.stdout[-1000:] + r.stderr[-2000:]
    assert f"l2bn train: error: {d} is being trained by another process (pid {p.pid}" in r.stderr
    assert sorted(x.name for x in d.iterdir()) == [LOCK_NAME]  # nothing written
    p.kill()
    p.wait()
    ok = _train(d)  # the holder is gone, and its lock with it
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads((d / "result.json").read_text())["status"] == "complete"
    holder(d)
    t = subprocess.run(
        [sys.executable, "-m", "l2bn", "train", "--out", str(d), "--test-only"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert t.returncode == 0, t.stderr[-2000:]
    assert json.loads((d / "test_result.json").read_text())["checkpoint"] == "best.pt"


def _compare(out, *seeds):
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
        "--seeds",
        *seeds,
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--train-subset",
        "256",
        "--warmup-epochs",
        "0",
        "--no-analyze",
        "--threads",
        "1",
        "--out",
        str(out),
    ]


def test_compare_skips_a_run_another_process_trains(tmp_path, holder):
    out = tmp_path / "o"
    busy = out / "resnet8-bn-seed0"
    holder(busy)
    r = subprocess.run(
        _compare(out, "0", "1"), env=ENV, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (
        f"[1/2] resnet8 bn seed 0: skipped, {busy} is being trained by another process" in r.stdout
    )
    assert "1 run(s) left out of this report, still being trained by another process" in r.stdout
    assert not (busy / "result.json").exists()
    s = json.loads((out / "summary.json").read_text())
    assert [run["dir"] for run in s["cells"]["resnet8/bn"]["runs"]] == ["resnet8-bn-seed1"]


def _finish(cfg):
    """What a finished run leaves for compare's state check: its recipe and a complete result."""
    from pathlib import Path

    d = Path(cfg.out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    (d / "result.json").write_text(json.dumps({"status": "complete", "epochs": cfg.epochs}))


def _in_process_compare(tmp_path, monkeypatch, lock, trained, seeds=(0, 1)):
    """compare with training replaced by a recorder that finishes the run, and the report by one
    that records which runs compare leaves out."""
    import l2bn.experiment as E
    import l2bn.train as T

    monkeypatch.setattr(E, "run_lock", lock)

    def train(cfg):
        trained.append((cfg.seed, cfg.resume))
        _finish(cfg)

    monkeypatch.setattr(T, "train", train)

    def report(plan, out_p, *a):
        training, stopped = E._left_out(plan)
        (out_p / "summary.json").write_text(json.dumps({"training": training, "stopped": stopped}))

    monkeypatch.setattr(E, "_analyze_and_report", report)
    return E.compare(str(tmp_path / "o"), ["resnet8"], ["bn"], list(seeds), "digits", {"epochs": 1})


def test_compare_checks_a_run_again_under_its_lock(tmp_path, monkeypatch, capsys):
    """A run another process finished between compare's first look and taking its lock is not
    trained again."""
    from l2bn.experiment import plan_runs

    real = run_lock
    first = plan_runs(str(tmp_path / "o"), ["resnet8"], ["bn"], [0], "digits", {"epochs": 1})[0][1]

    @contextlib.contextmanager
    def lock(d, wait=False):
        with real(d, wait):
            if str(d) == first.out:
                _finish(first)  # the other process finished it just now
            yield

    trained = []
    s = _in_process_compare(tmp_path, monkeypatch, lock, trained)
    assert trained == [(1, False)] and s == {"training": [], "stopped": []}
    assert "[1/2] resnet8 bn seed 0: finished by another process" in capsys.readouterr().out


def test_compare_retries_runs_whose_owner_let_go_and_reports_the_others(
    tmp_path, monkeypatch, capsys, holder
):
    """Of two runs skipped because other processes held them, the one whose owner stopped before
    this call ended is trained after all; the one still held is reported as being trained."""
    real, refused = run_lock, []
    held = tmp_path / "o" / "resnet8-bn-seed1"
    holder(held)

    @contextlib.contextmanager
    def lock(d, wait=False):
        if str(d).endswith("seed0") and not refused:
            refused.append(d)
            raise RunDirBusy(d, {"pid": 4242, "host": "h"})
        with real(d, wait):
            yield

    trained = []
    s = _in_process_compare(tmp_path, monkeypatch, lock, trained, seeds=(0, 1, 2))
    assert trained == [(2, False), (0, False)]
    out = capsys.readouterr().out
    assert "seed 0: skipped" in out and "seed 1: skipped" in out
    assert s == {"training": [str(held)], "stopped": []}


def test_two_compares_over_one_grid_share_the_runs(tmp_path):
    """The same command started twice: every run is trained exactly once, and the report
    written last covers them all."""
    out = tmp_path / "o"
    cmd = _compare(out, "0", "1", "2")
    a = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    b = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (oa, ea), (ob, eb) = a.communicate(timeout=900), b.communicate(timeout=900)
    assert a.returncode == 0 and b.returncode == 0, ea[-2000:] + eb[-2000:]
    trained = [line for line in (oa + ob).splitlines() if ": training ->" in line]
    assert sorted(trained) == sorted(set(trained)) and len(trained) == 3, oa + ob
    for s in range(3):
        assert (
            json.loads((out / f"resnet8-bn-seed{s}" / "result.json").read_text())["status"]
            == "complete"
        )
    s = json.loads((out / "summary.json").read_text())
    assert sorted(r["dir"] for r in s["cells"]["resnet8/bn"]["runs"]) == [
        f"resnet8-bn-seed{k}" for k in range(3)
    ]
    assert all(lock_owner(p.parent) is None for p in out.glob("**/" + LOCK_NAME))


def test_analyze_warns_about_a_run_that_is_still_training(tmp_path, holder):
    d = tmp_path / "R"
    assert _train(d).returncode == 0
    p = holder(d)
    r = subprocess.run(
        [sys.executable, "-m", "l2bn", "analyze", str(d), "--max-examples", "200", "--no-knn"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (
        f"{d} is being trained by another process (pid {p.pid}): analysing its checkpoint of "
        f"epoch 1 of 1" in r.stderr
    )
    assert json.loads((d / "analysis.json").read_text())["epoch"] == 1


def test_compare_redoes_an_analysis_taken_before_the_run_ended(tmp_path):
    out = tmp_path / "o"
    cmd = [a for a in _compare(out, "0") if a != "--no-analyze"]
    first = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0 and "analysing" in first.stdout, first.stderr[-2000:]
    same = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert same.returncode == 0 and "analysing" not in same.stdout  # up to date: kept
    a = out / "resnet8-bn-seed0" / "analysis.json"
    early = json.loads(a.read_text())
    early["epoch"] = 0  # as if analysed mid-training, after the checkpoint it read
    a.write_text(json.dumps(early))
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "analysing" in again.stdout, again.stdout[-2000:]
    assert json.loads(a.read_text())["epoch"] == 1


FORK_THEN_DIE = """import os, signal, sys, time
from l2bn.train.lock import run_lock
with run_lock(sys.argv[1]):
    if os.fork() == 0:  # a worker that outlives its parent (as DataLoader workers briefly do)
        time.sleep(15)
        os._exit(0)
    print('held', flush=True)
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_forked_child_does_not_keep_a_killed_parents_lock(tmp_path):
    p = subprocess.Popen(
        [sys.executable, "-c", FORK_THEN_DIE, str(tmp_path)],
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "held"
    assert lock_owner(tmp_path)["pid"] == p.pid
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert lock_owner(tmp_path) is None, (
        "the lock outlived its killed owner, held by its forked child"
    )
