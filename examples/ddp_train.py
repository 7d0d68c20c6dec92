"""Data-parallel training with synchronised L2BN on CPU (gloo) or GPU (NCCL).

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py --steps 20

Every BatchNorm of a torchvision ResNet-18 becomes a SyncL2BatchNorm (``l2bn.convert(...,
sync=True)``), so batch statistics are those of the global batch across all processes.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import l2bn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    torch.manual_seed(0)  # same initial weights on every rank

    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model = l2bn.convert(model, sync=True).to(device)
    n_sync = sum(isinstance(m, l2bn.SyncL2BatchNorm) for m in model.modules())
    ddp = DDP(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)

    g = torch.Generator().manual_seed(1000 + rank)  # each rank sees different data
    for step in range(args.steps):
        x = torch.randn(args.batch_size, 3, 32, 32, generator=g).to(device)
        y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
        loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"rank 0 of {world}: step {step} loss {loss.item():.4f}", flush=True)
    if rank == 0:
        print(f"trained with {n_sync} SyncL2BatchNorm layers on {world} processes")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
