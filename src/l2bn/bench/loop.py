"""The main job's own loop, BN vs L2BN: what ``l2bn train`` runs, timed interleaved.

The model rows of :mod:`~l2bn.bench.models` time a bare step on a fixed batch. This one runs
the trainer's own functions — :func:`l2bn.train.loop.train_one_epoch` (the loader with its
augmentation, the loss, backward, the optimizer and schedule step, the running totals) and
:func:`l2bn.train.loop.evaluate` (the test pass) — on the main job's data and recipe
(Fashion-MNIST, ResNet-8, :data:`l2bn.experiment.MAIN_JOB_RECIPE`), ``steps`` training batches
and ``eval_batches`` test batches (of 256) per sample. Each round times BN and L2BN back to back in
alternating order; the ratios are per round, summarised by their median and 25th–75th
percentile, so the machine's drift cancels.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List, Optional

import torch

from .models import norm_pair_summary


def bench_main_job(
    rounds: int = 10,
    steps: int = 20,
    eval_batches: int = 20,
    data_dir: Optional[str] = None,
    dataset: str = "fashion-mnist",
    model: str = "resnet8",
    progress: Callable[[str], None] = lambda s: None,
) -> Dict[str, Dict[str, object]]:
    """Time the training loop (images per second) and the evaluation pass (seconds) of the main
    job for BN and L2BN. Returns ``{"train": ..., "eval": ...}`` as :func:`bench_model` does,
    ``ratio`` being L2BN/BN of time (so below 1 L2BN is faster in both rows)."""
    from ..data import load_dataset
    from ..data.loaders import make_loaders
    from ..experiment import MAIN_JOB_RECIPE
    from ..train.config import TrainConfig
    from ..train.distributed import DistEnv
    from ..train.loop import evaluate, train_one_epoch
    from ..train.optim import make_optimizer, make_scheduler
    from ..train.trainer import model_for_config

    dev, env = torch.device("cpu"), DistEnv()
    recipe = {k: v for k, v in MAIN_JOB_RECIPE.items() if k != "epochs"}
    base = TrainConfig(
        dataset=dataset,
        model=model,
        data_dir=data_dir,
        epochs=10**6,
        max_steps_per_epoch=steps,
        progress=False,
        **recipe,
    )
    data = load_dataset(dataset, data_dir).subset_train(base.train_subset, seed=0)
    n_test = eval_batches * max(256, base.batch_size)  # the test loader's batch (make_loaders)
    data = dataclasses.replace(data, test_x=data.test_x[:n_test], test_y=data.test_y[:n_test])
    runs = {}
    for norm in ("bn", "l2bn"):
        cfg = dataclasses.replace(base, norm=norm)
        torch.manual_seed(0)
        net = model_for_config(cfg, data).to(dev)
        train_b, test_b = make_loaders(data, dev, cfg.batch_size, seed=0, max_steps=steps)
        opt = make_optimizer(cfg, net)
        sched = make_scheduler(cfg, opt, len(train_b))
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        runs[norm] = (cfg, net, train_b, test_b, opt, sched, scaler)
    progress(f"{model} on {dataset}: {steps} training steps and {n_test} test images per sample")
    t: Dict[str, Dict[str, List[float]]] = {p: {"bn": [], "l2bn": []} for p in ("train", "eval")}
    for r in range(rounds + 1):  # r = 0 warms up (first steps, allocator, caches)
        for norm in ("bn", "l2bn") if r % 2 else ("l2bn", "bn"):
            cfg, net, train_b, test_b, opt, sched, scaler = runs[norm]
            t0 = time.perf_counter()
            train_one_epoch(net, train_b, opt, sched, scaler, cfg, dev, env, r, r * steps)
            t1 = time.perf_counter()
            evaluate(net, test_b, cfg, dev, env)
            t2 = time.perf_counter()
            if r:
                t["train"][norm].append(t1 - t0)
                t["eval"][norm].append(t2 - t1)
    return {phase: norm_pair_summary(times) for phase, times in t.items()}
