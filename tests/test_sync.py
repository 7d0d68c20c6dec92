"""SyncL2BatchNorm under torchrun (2 CPU processes, gloo) equals L2BatchNorm on the whole batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
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
    assert len(lines) == 10
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


def test_eval_without_running_stats_never_communicates(monkeypatch):
    """As nn.SyncBatchNorm: evaluation with track_running_stats=False normalizes each rank's
    batch on its own (it used to all-gather, and uneven eval batch counts could hang)."""
    import torch.distributed as dist

    calls = []

    def collective(*args, **kwargs):
        calls.append(args)
        raise AssertionError("collective called")

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_gather", collective)
    monkeypatch.setattr(dist, "all_reduce", collective)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    group = object()  # stands for a process group of two ranks
    sync = l2bn.SyncL2BatchNorm(
        3, track_running_stats=False, process_group=group, dtype=torch.float64
    ).eval()
    local = l2bn.L2BatchNorm2d(3, track_running_stats=False, dtype=torch.float64).eval()
    y = sync(x)
    torch.testing.assert_close(y, local(x))
    y.backward(torch.randn_like(y))
    assert calls == []
    # with running statistics evaluation does not communicate either; training does
    tracked = l2bn.SyncL2BatchNorm(3, process_group=group, dtype=torch.float64).eval()
    tracked(x)
    assert calls == []
    with pytest.raises(AssertionError, match="collective called"):
        tracked.train()(x)
    assert len(calls) == 1


def _mirror_world(monkeypatch):
    """A fake process group of two ranks where the other rank holds exactly this rank's batch:
    all_gather returns the local statistics twice and all_reduce doubles."""
    import torch.distributed as dist

    group = object()

    def world_size(g=None):
        assert g is group
        return 2

    def all_gather(out, local, group=None):
        assert group is not None and len(out) == world_size(group)
        for t in out:
            t.copy_(local)

    def all_reduce(t, group=None):
        world_size(group)
        t.mul_(2)

    # dist.is_initialized() stays False: torch.compile consults it, and would then look for a
    # real default group; the layer is told its group directly (training only, as the real
    # SyncL2BatchNorm._process_group, tested above)
    monkeypatch.setattr(
        l2bn.SyncL2BatchNorm, "_process_group", lambda self: group if self.training else None
    )
    monkeypatch.setattr(dist, "get_world_size", world_size)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return group


@pytest.mark.parametrize("backend", ["fused", "compiled", "native"])
@pytest.mark.parametrize("shape", [(5, 3, 4, 4), (6, 4), (0, 3, 2)])
def test_sync_training_equals_the_union_batch(backend, shape, monkeypatch):
    """Synchronised statistics, gradient all-reduce and running statistics (in-process, with a
    mirrored fake second rank): equal to one process on the batch concatenated with itself;
    an empty batch on every rank leaves the running statistics untouched."""
    monkeypatch.setenv("L2BN_BACKEND", backend)
    group = _mirror_world(monkeypatch)
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    g = torch.randn(shape, dtype=torch.float64)
    sync = l2bn.SyncL2BatchNorm(c, process_group=group, dtype=torch.float64, unit_rms=True)
    local = (l2bn.L2BatchNorm1d if len(shape) < 4 else l2bn.L2BatchNorm2d)(
        c, dtype=torch.float64, unit_rms=True
    )
    with torch.no_grad():
        for m in (sync, local):
            m.weight.copy_(torch.linspace(0.5, 1.5, c))
            m.bias.copy_(torch.linspace(-1, 1, c))
            m.running_mean.fill_(0.3)
    xs = x.clone().requires_grad_()
    xl = torch.cat([x, x]).requires_grad_()
    ys, yl = sync(xs), local(xl)
    ys.backward(g)
    yl.backward(torch.cat([g, g]))
    n = shape[0]
    torch.testing.assert_close(ys, yl[:n])
    torch.testing.assert_close(xs.grad, xl.grad[:n])
    torch.testing.assert_close(sync.weight.grad * 2, local.weight.grad)  # local: DDP sums them
    torch.testing.assert_close(sync.bias.grad * 2, local.bias.grad)
    torch.testing.assert_close(sync.running_mean, local.running_mean)
    torch.testing.assert_close(sync.running_var, local.running_var)
    if n == 0:
        assert torch.equal(sync.running_mean, torch.full((c,), 0.3, dtype=torch.float64))
        assert torch.equal(sync.running_var, torch.ones(c, dtype=torch.float64))


def test_forward_ad_and_double_backward_through_sync_are_refused(monkeypatch):
    """Neither has a differentiable collective here: both raise, nothing is silently detached."""
    import torch.autograd.forward_ad as fwad

    group = _mirror_world(monkeypatch)
    m = l2bn.SyncL2BatchNorm(3, process_group=group, dtype=torch.float64)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(
        NotImplementedError,
        match=r"^l2_batch_norm: double backward \(create_graph=True\) "
        r"through synchronised batch statistics \(process_group\) is not supported$",
    ):
        torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
    with fwad.dual_level():
        with pytest.raises(
            NotImplementedError,
            match=r"^l2_batch_norm: forward-mode AD through "
            r"synchronised batch statistics \(process_group\) is not supported$",
        ):
            m(fwad.make_dual(x.detach(), torch.ones_like(x)))


@pytest.mark.parametrize("backend", ["fused", "native"])
@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_sync_rescales_extreme_inputs_before_the_collective(backend, scale, monkeypatch):
    """Synchronised training with sample norms out of float32's safe range (squares overflow at
    1e20; entries' squares are subnormal at 1e-25 with a smaller l2_eps): the statistics are
    taken of the exactly rescaled input, so output, gradient and running statistics equal the
    float64 reference on the union batch (in-process mirrored second rank)."""
    monkeypatch.setenv("L2BN_BACKEND", backend)
    group = _mirror_world(monkeypatch)
    g0 = torch.Generator().manual_seed(11)
    x64 = (torch.randn(4, 3, 5, generator=g0, dtype=torch.float64) + 0.5) * scale
    x = x64.float()
    gy = torch.randn(4, 3, 5, generator=g0)
    sync = l2bn.SyncL2BatchNorm(3, process_group=group, l2_eps=1e-40)
    xs = x.clone().requires_grad_()
    ys = sync(xs)
    ys.backward(gy)
    xr = torch.cat([x, x]).double().requires_grad_()
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    # a fresh layer's first tracked batch sets its running statistics (factor 1, l2bn.running)
    yr = l2bn.functional.l2_batch_norm(
        xr, rm, rv, None, None, True, 1.0, 1e-5, l2_eps=1e-40, backend="reference"
    )
    yr.backward(torch.cat([gy, gy]).double())
    assert torch.isfinite(ys).all() and torch.isfinite(xs.grad).all()
    torch.testing.assert_close(ys.double(), yr[:4].detach(), rtol=1e-4, atol=1e-4)
    rel = (xs.grad.double() - xr.grad[:4]).abs().max() / xr.grad[:4].abs().max()
    assert rel < 1e-3
    torch.testing.assert_close(sync.running_var.double(), rv, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sync.running_mean.double(), rm, rtol=1e-4, atol=1e-6)
