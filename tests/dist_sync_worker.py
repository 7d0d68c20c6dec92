"""Run under torchrun (2 processes, gloo): SyncL2BatchNorm vs one-process L2BatchNorm."""

import os
import sys

import torch
import torch.distributed as dist

import l2bn


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    sizes = [3, 5][:world] if world == 2 else [2] * world  # uneven batches
    n = sum(sizes)
    results = {}
    for shape_tail, unit_rms in (((4, 5, 6), False), ((4, 5, 6), True), ((4,), False)):
        c = shape_tail[0]
        x_full = torch.randn((n,) + shape_tail, dtype=torch.float64)
        x_full[1] *= 30
        g_full = torch.randn_like(x_full)
        w0, b0 = torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)
        # reference: one process, full batch
        ref = (l2bn.L2BatchNorm2d if len(shape_tail) == 3 else l2bn.L2BatchNorm1d)(
            c, dtype=torch.float64, unit_rms=unit_rms
        )
        sync = l2bn.SyncL2BatchNorm(c, dtype=torch.float64, unit_rms=unit_rms)
        with torch.no_grad():
            for m in (ref, sync):
                m.weight.copy_(w0)
                m.bias.copy_(b0)
        lo = sum(sizes[:rank])
        hi = lo + sizes[rank]
        for step in range(2):
            xr = x_full.clone().requires_grad_()
            yr = ref(xr)
            (yr * g_full).sum().backward()
            xs = x_full[lo:hi].clone().requires_grad_()
            ys = sync(xs)
            (ys * g_full[lo:hi]).sum().backward()
            wg = sync.weight.grad.clone()
            bg = sync.bias.grad.clone()
            dist.all_reduce(wg)
            dist.all_reduce(bg)
            errs = [
                (ys - yr[lo:hi]).abs().max(),
                (xs.grad - xr.grad[lo:hi]).abs().max(),
                (wg - ref.weight.grad).abs().max(),
                (bg - ref.bias.grad).abs().max(),
                (sync.running_mean - ref.running_mean).abs().max(),
                (sync.running_var - ref.running_var).abs().max(),
            ]
            results[f"{shape_tail}-{unit_rms}-{step}"] = max(float(e) for e in errs)
            for m in (ref, sync):
                m.zero_grad()
        sync.eval()
        ref.eval()
        results[f"{shape_tail}-{unit_rms}-eval"] = float(
            (sync(x_full[lo:hi]) - ref(x_full)[lo:hi]).abs().max()
        )
    # evaluation without running statistics is local, as in nn.SyncBatchNorm: ranks may run a
    # different number of evaluation batches without a collective hanging
    c = 4
    sync = l2bn.SyncL2BatchNorm(c, track_running_stats=False, dtype=torch.float64).eval()
    local = l2bn.L2BatchNorm2d(c, track_running_stats=False, dtype=torch.float64).eval()
    err = 0.0
    for _ in range(rank + 1):  # rank 0: one batch, rank 1: two
        xe = torch.randn(2 + rank, c, 3, 3, dtype=torch.float64)
        err = max(err, float((sync(xe) - local(xe)).abs().max()))
    results["eval-no-running-stats-local"] = err
    dist.barrier()
    if rank == 0:
        with open(out_path, "w") as f:
            for k, v in results.items():
                f.write(f"{k}\t{v:.3e}\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
