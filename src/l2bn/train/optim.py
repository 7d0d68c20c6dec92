"""Optimizer and learning-rate schedule, from ``torch.optim`` and ``torch.optim.lr_scheduler``.

The schedule is stepped once per optimisation step (not per epoch). ``warmup_epochs`` prepends a
``LinearLR`` warm-up (factor ``(s + 1) / W`` at step ``s``) through ``SequentialLR``; then

==============  ==============================================================================
``cosine``      ``CosineAnnealingLR`` to ``min_lr`` at the last step
``step``        ``MultiStepLR``: × ``gamma`` at each milestone (a fraction of the run or an epoch)
``onecycle``    ``OneCycleLR`` (cosine up for ``warmup_epochs`` or 30 %, then down; momentum fixed)
``sgdr``        ``CosineAnnealingWarmRestarts``: cycles of ``sgdr_t0``, ``sgdr_t0·sgdr_mult``, …
                epochs from ``lr`` down to ``min_lr`` (Loshchilov & Hutter; the DCASE recipes)
``constant``    ``ConstantLR`` with factor 1
==============  ==============================================================================

``lr_decay`` > 0 adds Keras's per-iteration inverse-time decay, ``lr / (1 + lr_decay · step)``,
on top of the schedule (:func:`inverse_time_decay`).

Resuming rebuilds the schedule for the (possibly extended) number of epochs and fast-forwards it
to the resumed step, which replays exactly the floating-point steps of an uninterrupted run.
Extending ``--epochs`` therefore re-plans the schedule as if the run had been started with the new
total: the completed epochs are kept, and the learning rate continues from the longer schedule's
value at that step (for ``cosine``: higher than where the shorter run ended).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Dict, Iterator, List

import torch
from torch import nn
from torch.optim import lr_scheduler as S

from ..io import BadInput
from .config import TrainConfig

__all__ = [
    "param_groups",
    "make_optimizer",
    "make_scheduler",
    "fast_forward",
    "inverse_time_decay",
    "SCHEDULES",
]

SCHEDULES = ("cosine", "step", "onecycle", "sgdr", "constant")


def param_groups(
    model: nn.Module, weight_decay: float, on_norm_and_bias: bool
) -> List[Dict[str, Any]]:
    """Weight decay on weights of rank >= 2 only (norm scales and biases excluded by default)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if (p.ndim >= 2 or on_norm_and_bias) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW over :func:`param_groups`."""
    groups = param_groups(model, cfg.weight_decay, cfg.wd_on_norm_and_bias)
    lr = cfg.effective_lr()
    if lr <= 0:
        raise BadInput(f"lr must be positive, got {lr}")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise BadInput(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")


def make_scheduler(
    cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int
) -> S.LRScheduler:
    """The per-step schedule of ``cfg`` (see the module docstring) for a fresh optimizer.

    Example:
        >>> import torch
        >>> from l2bn.train.config import TrainConfig
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> opt = torch.optim.SGD([p], lr=0.1)
        >>> cfg = TrainConfig(schedule="sgdr", sgdr_t0=2, epochs=6, min_lr=0.0)
        >>> s = make_scheduler(cfg, opt, 10)
        >>> lrs = []
        >>> for _ in range(60):
        ...     lrs.append(opt.param_groups[0]["lr"]); opt.step(); s.step()
        >>> round(lrs[0], 6), round(lrs[10], 6), round(lrs[20], 6)   # restart after 2 epochs
        (0.1, 0.05, 0.1)
    """
    if cfg.schedule not in SCHEDULES:
        raise BadInput(f"unknown schedule {cfg.schedule!r}; choose {', '.join(SCHEDULES)}")
    lr = cfg.effective_lr()
    if lr <= 0:
        raise BadInput(f"lr must be positive, got {lr}")
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    eta_min = cfg.min_lr
    if cfg.schedule == "onecycle":
        pct = warm / total if warm > 0 else 0.3
        return S.OneCycleLR(
            opt,
            max_lr=lr,
            total_steps=total,
            pct_start=max(pct, 1e-6),
            cycle_momentum=False,
            anneal_strategy="cos",
            div_factor=25.0,
            final_div_factor=(lr / 25.0) / eta_min if eta_min > 0 else 1e4,
        )
    rest = total - warm
    if cfg.schedule == "cosine":
        main: S.LRScheduler = S.CosineAnnealingLR(opt, T_max=max(1, rest), eta_min=eta_min)
    elif cfg.schedule == "step":
        marks = sorted(
            {
                int(round((m * cfg.epochs if m < 1 else m) * steps_per_epoch)) - warm
                for m in cfg.milestones
            }
        )
        main = S.MultiStepLR(opt, milestones=[m for m in marks if m > 0], gamma=cfg.gamma)
    elif cfg.schedule == "sgdr":
        t0 = max(1, int(round(cfg.sgdr_t0 * steps_per_epoch)))
        if cfg.sgdr_mult < 1:
            raise BadInput(f"sgdr_mult must be an integer >= 1, got {cfg.sgdr_mult}")
        main = S.CosineAnnealingWarmRestarts(
            opt, T_0=t0, T_mult=int(cfg.sgdr_mult), eta_min=eta_min
        )
    else:
        main = S.ConstantLR(opt, factor=1.0, total_iters=0)
    if warm <= 1:
        return main
    ramp = S.LinearLR(opt, start_factor=1.0 / warm, end_factor=1.0, total_iters=warm - 1)
    return S.SequentialLR(opt, [ramp, main], milestones=[warm])


def fast_forward(sched: S.LRScheduler, steps: int) -> None:
    """Advance a freshly built schedule by ``steps`` optimisation steps (on resume)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        for _ in range(steps):
            sched.step()


@contextlib.contextmanager
def inverse_time_decay(opt: torch.optim.Optimizer, decay: float, step: int) -> Iterator[None]:
    """Within the block the learning rates are ``lr / (1 + decay * step)`` (Keras's ``decay``);
    the schedule's values are restored afterwards, so the schedule itself is unaffected."""
    if decay <= 0:
        yield
        return
    saved = [g["lr"] for g in opt.param_groups]
    f = 1.0 / (1.0 + decay * step)
    for g in opt.param_groups:
        g["lr"] = g["lr"] * f
    try:
        yield
    finally:
        for g, lr in zip(opt.param_groups, saved):
            g["lr"] = lr
