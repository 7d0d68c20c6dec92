"""The ε trap, measured: how much of each norm layer's denominator is BN's ``eps``.

After the l2 step each entry of a sample is about 1/√D (D = C·H·W), so a channel's variance is
about 1/D; with Keras's ``eps = 1e-3`` and the DCASE networks' maps of 10⁵–10⁶ entries, ``eps``
is nearly all of the squared denominator and the layer stops standardizing its channels.
:func:`measure_norm_layers` measures that share per layer; ``l2bn eps-trap`` prints it for the
DCASE networks on synthetic scenes through the real front-end (docs/acoustic.md quotes it).
"""

from __future__ import annotations

import statistics
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..kernels.reference import l2_normalize_samples
from ..models import create_model
from ..models.dcase import REFERENCE, param_counts
from .probes import norm_layers

__all__ = ["measure_norm_layers", "synthetic_scenes", "eps_trap_report"]


@torch.no_grad()
def measure_norm_layers(model: nn.Module, x: Tensor) -> List[Dict[str, Any]]:
    """Run ``model`` on ``x`` in training mode (batch statistics) and measure every norm layer.

    For each layer (in call order): ``D`` (entries per sample), ``in_std`` and ``out_std`` (std of
    its input and output), ``var_c`` (mean over channels of the batch variance of what BN
    normalizes -- the l2-normalized input for L2BN, scaled to unit RMS for ``unit_rms``) and
    ``eps_share`` (mean over channels of ``eps / (var_c + eps)``: the fraction of the squared
    denominator that is ``eps``; near 1 the layer divides by ``sqrt(eps)`` instead of by the
    channel's spread). Running statistics are restored afterwards.

    Example:
        >>> import torch, l2bn
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), l2bn.L2BatchNorm2d(8, eps=1e-2))
        >>> row = measure_norm_layers(net, torch.randn(4, 3, 10, 10))[0]
        >>> row["D"], row["eps_share"] > 0.5   # D = 8 * 8 * 8 entries: var_c <= 1/512 < eps
        (512, True)
    """
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    rows: List[Dict[str, Any]] = []

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple, out: Tensor) -> None:
            inp = args[0].detach().float()
            u = inp
            if hasattr(mod, "unit_rms"):  # an L2BN layer: its own l2 step first
                u = l2_normalize_samples(inp, l2_eps=mod.l2_eps, unit_rms=mod.unit_rms)
            var = u.transpose(0, 1).flatten(1).var(dim=1, unbiased=False)
            rows.append(
                {
                    "layer": name,
                    "type": type(mod).__name__,
                    "C": int(inp.shape[1]),
                    "D": int(inp[0].numel()),
                    "in_std": float(inp.std()),
                    "var_c": float(var.mean()),
                    "eps_share": float((mod.eps / (var + mod.eps)).mean()),
                    "out_std": float(out.detach().float().std()),
                }
            )

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in norm_layers(model)]
    try:
        model.train()
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.load_state_dict(saved)
        model.train(was_training)
    return rows


def synthetic_scenes(n: int, frames: int, seed: int = 0) -> Tensor:
    """``(n, 3, 128, frames)`` features of synthetic 10-s "scenes" (tones, chirps, noise bursts)
    through the real front-end (:func:`l2bn.data.audio.logmel`, deltas)."""
    import math

    from ..data.audio.features import FrontEnd, logmel, stack_deltas

    fe = FrontEnd()
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(fe.n_samples, dtype=torch.float64) / fe.sample_rate
    waves = []
    for i in range(n):
        f0 = 100.0 + 3000.0 * float(torch.rand(1, generator=g))
        y = 0.2 * torch.sin(2 * math.pi * (f0 + 40.0 * i * t) * t)
        noise = torch.randn(len(t), generator=g, dtype=torch.float64)
        y = y + 0.05 * noise * (1 + torch.sin(2 * math.pi * 0.3 * (i + 1) * t))
        waves.append(y.float())
    feats = stack_deltas(logmel(torch.stack(waves), fe))
    return feats[..., :frames]


def _spread(rows: List[Dict[str, Any]], key: str) -> Tuple[float, float, float]:
    vals = [r[key] for r in rows]
    return statistics.median(vals), min(vals), max(vals)


def eps_trap_report(
    models: Sequence[str] = tuple(REFERENCE),
    norms: Sequence[str] = ("bn", "l2bn", "l2bn-rms"),
    batch: int = 8,
    frames: int = 400,
    per_layer: bool = False,
) -> str:
    """Markdown: the networks' parameter counts against the Keras reference, then the ε share
    and output spread of their switchable norm layers (all but ``final_bn``) per model and norm,
    at initialisation, on ``batch`` synthetic scenes of ``frames`` frames."""
    lines = ["| model | trainable (ours / Keras) | running stats (ours / Keras) |", "|---|---|---|"]
    for name in models:
        tr, nt = param_counts(create_model(name, 10, 3, "l2bn"))
        lines.append(
            f"| {name} | {tr:,} / {REFERENCE[name][0]:,} | {nt:,} / {REFERENCE[name][1]:,} |"
        )
    x = synthetic_scenes(batch, frames)
    lines += [
        "",
        f"eps trap: {batch} synthetic 10-s scenes through the front-end, T = {frames}, "
        f"training-mode "
        f"batch statistics, at initialisation; the switchable norm layers (all but final_bn)",
        "",
        "| model | norm | layers | D (min-max) | var_c median | eps share: median (min-max) | "
        "out std: median (min-max) |",
        "|---|---|---|---|---|---|---|",
    ]
    details: List[str] = []
    for name in models:
        for norm in norms:
            torch.manual_seed(0)
            net = create_model(name, 10, 3, norm)
            final = next(n for n, m in net.named_modules() if m is net.final_bn)
            rows = [r for r in measure_norm_layers(net, x) if r["layer"] != final]
            d, e, o = _spread(rows, "D"), _spread(rows, "eps_share"), _spread(rows, "out_std")
            lines.append(
                f"| {name} | {norm} | {len(rows)} | {d[1]:,}-{d[2]:,} | "
                f"{_spread(rows, 'var_c')[0]:.2e} | "
                f"{e[0]:.3f} ({e[1]:.3f}-{e[2]:.3f}) | {o[0]:.3f} ({o[1]:.3f}-{o[2]:.3f}) |"
            )
            if per_layer:
                details += [
                    "",
                    f"{name} / {norm}",
                    "",
                    "| layer | C | D | var_c | eps share | in std | out std |",
                    "|---|---|---|---|---|---|---|",
                ]
                details += [
                    f"| {r['layer']} | {r['C']} | {r['D']:,} | {r['var_c']:.2e} | "
                    f"{r['eps_share']:.3f} | "
                    f"{r['in_std']:.3g} | {r['out_std']:.3f} |"
                    for r in rows
                ]
    return "\n".join(lines + details)
