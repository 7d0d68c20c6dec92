"""One writer per run directory: a run trained by a live process is refused to every other one
(train, resume, compare), a lock left by a dead process is taken over, and two ``compare`` calls
whose grids overlap share the work instead of training the same run twice."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from l2bn.train.lock import LOCK_NAME, RunDirBusy, lock_owner, run_lock

ENV = dict(os.environ, L2BN_BACKEND="fused", OMP_NUM_THREADS="1")
HOLD = "import sys, time; from l2bn.train.lock import run_lock\nwith run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)"


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock of a directory until the test ends."""
    procs = []

    def start(d):
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(d)], env=ENV, stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "held"
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_is_created_and_removed(tmp_path):
    d = tmp_path / "R"
    assert lock_owner(d) is None
    with run_lock(d):
        owner = json.loads((d / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        assert abs(owner["started"] - time.time()) < 60
        assert lock_owner(d) == owner
        with run_lock(d):  # re-entrant within the process
            pass
        assert (d / LOCK_NAME).is_file(), "the inner block released the outer block's lock"
    assert not (d / LOCK_NAME).exists() and lock_owner(d) is None


def test_lock_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(KeyError):
        with run_lock(tmp_path):
            raise KeyError("x")
    assert not (tmp_path / LOCK_NAME).exists()
    with run_lock(tmp_path):  # and can be taken again
        pass


def test_a_live_owner_is_refused_with_its_pid(tmp_path, holder):
    p = holder(tmp_path)
    assert lock_owner(tmp_path)["pid"] == p.pid
    with pytest.raises(RunDirBusy, match=f"pid {p.pid} on {socket.gethostname()}.*delete {tmp_path / LOCK_NAME}"):
        with run_lock(tmp_path):
            pytest.fail("entered a directory another live process holds")
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == p.pid  # its lock is untouched


def test_a_dead_owner_is_taken_over_with_a_warning(tmp_path):
    pid = _dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": 0}))
    assert lock_owner(tmp_path) is None
    with pytest.warns(UserWarning, match=f"no longer exists \\(pid {pid}\\)"):
        with run_lock(tmp_path):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("content", ["", "not json", "[1, 2]"])
def test_an_unreadable_lock_is_refused_not_ignored(tmp_path, content):
    (tmp_path / LOCK_NAME).write_text(content)
    with pytest.raises(RunDirBusy, match="delete"):
        with run_lock(tmp_path):
            pass


def test_another_hosts_lock_is_refused(tmp_path):
    """A pid on another machine (a shared file system) cannot be checked: refused, never guessed."""
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere", "started": 0}))
    with pytest.raises(RunDirBusy, match="on elsewhere"):
        with run_lock(tmp_path):
            pass


def _train(out, *extra):
    return subprocess.run([sys.executable, "-m", "l2bn", "train", "--dataset", "digits", "--model", "resnet8", "--norm", "bn",
                           "--epochs", "1", "--batch-size", "64", "--train-subset", "256", "--threads", "1",
                           "--no-tensorboard", "--out", str(out), *extra],
                          env=ENV, capture_output=True, text=True, timeout=600)


def test_train_refuses_a_run_another_process_trains(tmp_path, holder):
    d = tmp_path / "R"
    p = holder(d)
    r = _train(d)
    assert r.returncode == 2, r.stdout[-1000:] + r.stderr[-2000:]
    assert f"l2bn train: error: {d} is being trained by another process (pid {p.pid}" in r.stderr
    assert sorted(x.name for x in d.iterdir()) == [LOCK_NAME]  # nothing written
    p.kill()
    p.wait()
    ok = _train(d)  # the holder was killed: its stale lock is taken over
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "no longer exists" in ok.stderr and json.loads((d / "result.json").read_text())["status"] == "complete"
    assert not (d / LOCK_NAME).exists()


def _compare(out, *seeds):
    return [sys.executable, "-m", "l2bn", "compare", "--dataset", "digits", "--models", "resnet8", "--norms", "bn",
            "--seeds", *seeds, "--epochs", "1", "--batch-size", "64", "--train-subset", "256", "--warmup-epochs", "0",
            "--no-analyze", "--threads", "1", "--out", str(out)]


def test_compare_skips_a_run_another_process_trains_and_retrains_nothing(tmp_path, holder):
    out = tmp_path / "o"
    busy = out / "resnet8-bn-seed0"
    holder(busy)
    r = subprocess.run(_compare(out, "0", "1"), env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"[1/2] resnet8 bn seed 0: skipped, {busy} is being trained by another process" in r.stdout
    assert "1 run(s) left out of this report" in r.stdout
    assert not (busy / "result.json").exists()
    s = json.loads((out / "summary.json").read_text())
    assert [run["dir"] for run in s["cells"]["resnet8/bn"]["runs"]] == ["resnet8-bn-seed1"]
    # a run another process finished while this one waited is not trained again
    done = json.loads((out / "resnet8-bn-seed1" / "result.json").read_text())
    again = subprocess.run(_compare(out, "1"), env=ENV, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "(1 finished earlier)" in again.stdout
    assert json.loads((out / "resnet8-bn-seed1" / "result.json").read_text()) == done


def test_two_compares_over_one_grid_share_the_runs(tmp_path):
    """The same command started twice: every run is trained exactly once, and the report of the
    one that ends last covers them all."""
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
        assert json.loads((out / f"resnet8-bn-seed{s}" / "result.json").read_text())["status"] == "complete"
    assert not list(out.glob("*/" + LOCK_NAME))
