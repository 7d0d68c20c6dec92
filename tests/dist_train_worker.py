"""Run under torchrun: train one epoch with ``l2bn.train.fit`` and save this rank's running
statistics, so a test can check that --sync-bn makes them agree across ranks, and the names of
this process's threads once ``fit`` has returned (the process group must be gone by then)."""

import sys
from pathlib import Path

import torch

from l2bn.train.config import TrainConfig
from l2bn.train.trainer import fit


def main(out: str, stats_dir: str, sync: bool) -> None:
    import os

    cfg = TrainConfig(
        dataset="digits",
        model="resnet8",
        norm="l2bn",
        epochs=1,
        batch_size=32,
        lr=0.05,
        out=out,
        sync_bn=sync,
        progress=False,
        tensorboard=False,
        threads=1,
    )
    model, _ = fit(cfg)
    stats = {k: v for k, v in model.state_dict().items() if "running_" in k}
    torch.save(stats, Path(stats_dir) / f"rank{os.environ['RANK']}.pt")
    names = sorted(
        Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")
    )
    (Path(stats_dir) / f"threads{os.environ['RANK']}.txt").write_text("\n".join(names))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "sync")
