"""Matplotlib figures (Agg backend, PNG files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

COLORS = {"bn": "tab:blue", "l2bn": "tab:red", "l2bn-rms": "tab:orange", "none": "tab:gray"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(runs: List[Dict[str, Any]], path: Path) -> Path:
    """Test accuracy and train loss per epoch, one line per run, colour per norm."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    models = list(dict.fromkeys(r["config"]["model"] for r in runs))
    seen = set()
    for r in runs:
        key = f"{r['config']['model']}/{r['norm']}"
        hist = r.get("history", [])
        ep = [h["epoch"] for h in hist if "test_acc" in h]
        acc = [h["test_acc"] for h in hist if "test_acc" in h]
        label = key if key not in seen else None
        seen.add(key)
        c = COLORS.get(r["norm"])
        ls = "-" if r["config"]["model"] == models[0] else "--"
        axes[0].plot(ep, acc, color=c, ls=ls, alpha=0.8, label=label)
        axes[1].plot([h["epoch"] for h in hist], [h["train_loss"] for h in hist], color=c, ls=ls, alpha=0.8)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("train loss")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("BN vs L2BN: learning curves (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def axis_plot(summary: Dict[str, Any], axis: str, path: Path) -> Path:
    """Paired difference against BN (mean, 95% CI) against the values of grid axis ``axis``;
    one line per model, norm and setting of the other axes."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    lines: Dict[str, List[Any]] = {}
    for d in summary["differences"].values():
        others = ", ".join(f"{k}={v}" for k, v in d["axes"].items() if k != axis)
        lines.setdefault(f"{d['model']} {d['norm']}−bn" + (f" ({others})" if others else ""), []).append(d)
    for i, (label, ds) in enumerate(sorted(lines.items())):
        ds = sorted(ds, key=lambda d: (0, d["axes"][axis]) if isinstance(d["axes"][axis], (int, float)) else (1, str(d["axes"][axis])))
        xs = [str(d["axes"][axis]) for d in ds]
        ys = [d["mean"] if d["mean"] is not None else float("nan") for d in ds]
        lo = [y - d["ci_low"] if d["ci_low"] is not None else 0 for y, d in zip(ys, ds)]
        hi = [d["ci_high"] - y if d["ci_high"] is not None else 0 for y, d in zip(ys, ds)]
        norm = ds[0]["norm"]
        ax.errorbar([j + 0.08 * i for j in range(len(xs))], ys, yerr=[lo, hi], marker="o", capsize=3,
                    color=COLORS.get(norm), label=label, alpha=0.9)
        ax.set_xticks(range(len(xs)), xs)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel(axis)
    ax.set_ylabel("test accuracy difference (pp)")
    ax.set_title(f"Paired difference against BN vs {axis} (95% CI)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
