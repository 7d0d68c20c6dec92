"""SyncL2BatchNorm under torchrun (2 CPU processes, gloo) equals L2BatchNorm on the whole batch."""

import os
import subprocess
import sys
from pathlib import Path

import torch

import l2bn

HERE = Path(__file__).parent


def torchrun(args, cwd=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        cmd + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_sync_matches_single_process(tmp_path):
    out = tmp_path / "errs.tsv"
    proc = torchrun([str(HERE / "dist_sync_worker.py"), str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert len(lines) == 9
    for line in lines:
        key, err = line.split("\t")
        assert float(err) < 1e-10, line


def test_sync_without_process_group_is_plain_l2bn():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    a = l2bn.SyncL2BatchNorm(3, dtype=torch.float64)
    b = l2bn.L2BatchNorm2d(3, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a.running_var, b.running_var)


def test_ddp_example_runs(tmp_path):
    proc = torchrun([str(HERE.parent / "examples" / "ddp_train.py"), "--steps", "3"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0" in proc.stdout and "SyncL2BatchNorm" in proc.stdout
