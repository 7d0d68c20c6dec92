"""The model benchmark: a whole training step and an inference forward of a CIFAR ResNet, BN vs
L2BN, timed interleaved in rounds."""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from .timing import interleaved_samples, quantile, ratio_summary


def norm_pair_summary(times: Dict[str, List[float]]) -> Dict[str, object]:
    """Per-round seconds of ``bn`` and ``l2bn`` as a model row: the medians, the median and
    IQR of the per-round L2BN/BN ratios, and the rounds themselves."""
    s = ratio_summary(times["l2bn"], times["bn"])
    return {
        "bn_s": quantile(times["bn"], 0.5),
        "l2bn_s": quantile(times["l2bn"], 0.5),
        "ratio": s["median"],
        "ratio_median": s["median"],
        "ratio_q25": s["q25"],
        "ratio_q75": s["q75"],
        "rounds_s": times,
    }


def bench_model(
    model_name: str,
    in_channels: int,
    size: int,
    batch: int,
    reps: int,
    rounds: int,
    device: str = "cpu",
    infer: bool = False,
    warmup: int = 2,
    progress: Callable[[str], None] = lambda s: None,
) -> Dict[str, Dict[str, object]]:
    """BN vs L2BN in a whole model: an SGD training step (forward, cross-entropy, backward,
    update) and, with ``infer``, an eval-mode ``no_grad`` forward; interleaved, per-round ratios.

    Returns ``{"train": ..., "eval": ...}``, each with ``bn_s``, ``l2bn_s`` (medians, seconds),
    ``ratio`` (= ``ratio_median``), ``ratio_q25``, ``ratio_q75`` and ``rounds_s``.
    """
    from ..models import create_model

    dev = torch.device(device)
    x = torch.randn(batch, in_channels, size, size, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    models: Dict[str, nn.Module] = {}
    phases: Dict[str, Dict[str, Callable[[], None]]] = (
        {"train": {}, "eval": {}} if infer else {"train": {}}
    )
    for norm in ("bn", "l2bn"):
        torch.manual_seed(0)
        model = models[norm] = create_model(model_name, 10, in_channels, norm).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        def forward(model: nn.Module = model) -> None:
            with torch.no_grad():
                model(x)

        phases["train"][norm] = step
        if infer:
            phases["eval"][norm] = forward
    progress(f"{model_name} (batch {batch}, {in_channels}x{size}x{size})")
    per_round: Dict[str, Dict[str, List[float]]] = {p: {"bn": [], "l2bn": []} for p in phases}
    for r in range(rounds):
        for phase, fns in phases.items():
            for m in models.values():
                m.train(phase == "train")
            for k, v in interleaved_samples(fns, dev, reps, warmup=warmup if r == 0 else 0).items():
                per_round[phase][k].append(quantile(v, 0.5))
    return {phase: norm_pair_summary(t) for phase, t in per_round.items()}
