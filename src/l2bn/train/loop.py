"""One epoch of training and one evaluation pass: :func:`train_one_epoch` and :func:`evaluate`
(the two halves of torchvision's reference ``train.py``). :func:`l2bn.train.trainer.fit` calls them.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import augment as aug
from ..data.loaders import epoch_generator
from ..io import BadInput, UsageError
from .config import TrainConfig
from .distributed import DistEnv, all_reduce_sum
from .optim import inverse_time_decay

__all__ = ["train_one_epoch", "evaluate", "TrainingDiverged"]


class TrainingDiverged(UsageError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return torch.autocast(device.type, enabled=False)
    if cfg.amp not in ("bf16", "fp16"):
        raise BadInput(f"unknown amp mode {cfg.amp!r}; choose none, bf16 or fp16")
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    cfg: TrainConfig,
    device: torch.device,
    env: DistEnv,
    groups: Optional[List[str]] = None,
) -> Tuple[float, float, Dict[str, float]]:
    """(loss, accuracy %, accuracy % per group) on the test split; rank r evaluates every
    world_size-th batch. ``groups`` names a group (e.g. a recording device) per test example."""
    model.eval()
    tot = torch.zeros(3, dtype=torch.float64, device=device)
    n = len(groups) if groups else 0
    hit = torch.zeros(n, dtype=torch.float64, device=device)
    seen = torch.zeros(n, dtype=torch.float64, device=device)
    start = 0
    for i, (x, y) in enumerate(loader.batches(0)):
        lo, start = start, start + len(y)
        if i % env.world_size != env.rank:
            continue
        with _autocast(cfg, device):
            out = model(x)
        ok = out.argmax(1) == y
        tot[0] += F.cross_entropy(out.float(), y, reduction="sum")
        tot[1] += ok.sum()
        tot[2] += len(y)
        if n:
            hit[lo:start] = ok.double()
            seen[lo:start] = 1
    all_reduce_sum(tot, env)
    per_group: Dict[str, float] = {}
    if n:
        all_reduce_sum(hit, env)
        all_reduce_sum(seen, env)
        for g in sorted(set(groups)):
            idx = torch.tensor([j for j, gg in enumerate(groups) if gg == g], device=device)
            per_group[g] = float(100.0 * hit[idx].sum() / seen[idx].sum().clamp_min(1))
    return float(tot[0] / tot[2]), float(100.0 * tot[1] / tot[2]), per_group


def train_one_epoch(
    net: nn.Module,
    loader: Any,
    opt: torch.optim.Optimizer,
    sched: Any,
    scaler: Any,
    cfg: TrainConfig,
    device: torch.device,
    env: DistEnv,
    epoch: int,
    step0: int,
) -> Dict[str, float]:
    """One pass over the training batches of ``epoch``; returns loss, accuracy and throughput.

    Raises:
        TrainingDiverged: the loss became NaN or infinite.
    """
    t0 = time.time()
    torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout etc.: a function of (seed, epoch)
    net.train()
    tot = torch.zeros(3, dtype=torch.float64, device=device)
    mix_gen = epoch_generator(cfg.seed, epoch, stream=1)
    mix_rng = np.random.default_rng([cfg.seed, epoch])
    bar = _progress(cfg, env, len(loader), f"epoch {epoch + 1}/{cfg.epochs}")
    pairs = cfg.mixup > 0 and cfg.mixup_mode == "pairs"
    for step, (x, y) in enumerate(loader.batches(epoch)):
        if (
            pairs
        ):  # Hu et al.: 2B clips -> B mixes, one lambda per sample, partners from the second B
            x, y, y2, lam_n = aug.mixup_pairs(x, y, cfg.mixup, mix_gen)
        elif cfg.mixup > 0:  # mixup (Zhang et al. 2018): one lambda, partners from the same batch
            lam = float(mix_rng.beta(cfg.mixup, cfg.mixup))
            perm = torch.randperm(len(y), generator=mix_gen).to(device)
            x = lam * x + (1 - lam) * x[perm]
        with _autocast(cfg, device):
            logits = net(x)
            if pairs:
                loss = aug.mixup_cross_entropy(
                    logits.float(), y, y2, lam_n.float(), cfg.label_smoothing
                )
            else:
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            if cfg.mixup > 0 and not pairs:
                loss = lam * loss + (1 - lam) * F.cross_entropy(
                    logits.float(), y[perm], label_smoothing=cfg.label_smoothing
                )
        if not torch.isfinite(loss.detach()).item():
            if bar is not None:
                bar.close()
            raise TrainingDiverged(
                f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}: training diverged."
            )
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        with inverse_time_decay(opt, cfg.lr_decay, step0 + step):
            scaler.step(opt)
        scaler.update()
        sched.step()
        tot[0] += loss.detach() * len(y)
        pred = logits.detach().argmax(1)
        tot[1] += (
            (lam_n * (pred == y) + (1 - lam_n) * (pred == y2)).sum() if pairs else (pred == y).sum()
        )
        tot[2] += len(y)
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{float(tot[0] / tot[2]):.3f}")
    if bar is not None:
        bar.close()
    all_reduce_sum(tot, env)
    dt = time.time() - t0
    return {
        "train_loss": float(tot[0] / tot[2]),
        "train_acc": float(100 * tot[1] / tot[2]),
        "epoch_time_s": dt,
        "throughput": float(tot[2]) / max(dt, 1e-9),
    }


def _progress(cfg: TrainConfig, env: DistEnv, total: int, desc: str) -> Any:
    """A tqdm bar on an interactive terminal only (``disable=None``): logs and CI stay clean."""
    if not (cfg.progress and env.is_main):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(
        total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr, disable=None
    )
