"""Matplotlib figures (Agg backend, PNG files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from ..factory import NORMS

COLORS = {name: norm.color for name, norm in NORMS.items()}


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
        axes[1].plot(
            [h["epoch"] for h in hist], [h["train_loss"] for h in hist], color=c, ls=ls, alpha=0.8
        )
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("train loss")
    axes[1].set_yscale("log")
    if seen:
        axes[0].legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    fig.suptitle("Learning curves (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def axis_value(d: Dict[str, Any], axis: str) -> Any:
    """The value of ``axis`` for a difference record: a grid axis, or ``"model"``."""
    return d["model"] if axis == "model" else d["axes"][axis]


def axis_plot(summary: Dict[str, Any], axis: str, path: Path) -> Path:
    """Paired difference against BN (mean, 95% CI) against the values of ``axis`` — a grid axis,
    or ``"model"`` for a study across models (models in natural order: resnet8, resnet20, ...);
    one line per norm, setting of the other axes and (for a grid axis) model."""
    from .runs import model_order

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    lines: Dict[str, List[Any]] = {}
    for d in summary["differences"].values():
        others = ", ".join(f"{k}={v}" for k, v in d["axes"].items() if k != axis)
        who = f"{d['norm']}−bn" if axis == "model" else f"{d['model']} {d['norm']}−bn"
        lines.setdefault(who + (f" ({others})" if others else ""), []).append(d)

    def order(d: Dict[str, Any]) -> Any:
        v = axis_value(d, axis)
        if axis == "model":
            return model_order(v)
        return (0, v) if isinstance(v, (int, float)) else (1, str(v))

    seen = {
        repr(axis_value(d, axis)): axis_value(d, axis) for ds in lines.values() for d in ds
    }  # values may be lists
    xs_all = sorted(seen.values(), key=lambda v: order({"model": v, "axes": {axis: v}}))
    pos = {repr(v): j for j, v in enumerate(xs_all)}
    for i, (label, ds) in enumerate(sorted(lines.items())):
        ds = sorted(ds, key=order)
        ys = [d["mean"] if d["mean"] is not None else float("nan") for d in ds]
        lo = [y - d["ci_low"] if d["ci_low"] is not None else 0 for y, d in zip(ys, ds)]
        hi = [d["ci_high"] - y if d["ci_high"] is not None else 0 for y, d in zip(ys, ds)]
        norm = ds[0]["norm"]
        ax.errorbar(
            [pos[repr(axis_value(d, axis))] + 0.08 * i for d in ds],
            ys,
            yerr=[lo, hi],
            marker="o",
            capsize=3,
            color=COLORS.get(norm),
            label=label,
            alpha=0.9,
        )
    ax.set_xticks(range(len(xs_all)), [str(v) for v in xs_all])
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


def accuracy_vs_axis(
    summary: Dict[str, Any], axis: str, path: Path, chosen: Optional[Dict[str, Any]] = None
) -> Path:
    """Test accuracy (and held-out accuracy, where the runs have it) against a numeric grid axis:
    per model and norm, the mean over seeds with its 95% t-interval; a log x axis when the
    values span a factor of 8 or more (learning rates); ``chosen`` (from
    :func:`l2bn.report.tuned.tuned_comparison`) rings each norm's choice."""
    from .stats import mean_std, t_quantile

    plt = _plt()
    cells = [c for c in summary["cells"].values() if axis in c["axes"]]
    fields = ["test_acc"] + (
        ["val_acc"] if all("val_acc" in r for c in cells for r in c["runs"]) else []
    )
    fig, axes = plt.subplots(1, len(fields), figsize=(5.5 * len(fields), 3.8), squeeze=False)
    lines: Dict[str, List[Dict[str, Any]]] = {}
    for c in cells:
        others = ", ".join(f"{k}={v}" for k, v in c["axes"].items() if k != axis)
        lines.setdefault(
            f"{c['model']} {c['norm']}" + (f" ({others})" if others else ""), []
        ).append(c)
    picks = [  # (model, norm, the cell's axis values) of each choice
        (ch["model"], ch["norm"], {**ch["others"], axis: ch["value"]})
        for ch in (chosen or {}).get("choices", {}).values()
    ]
    for ax, field in zip(axes[0], fields):
        for label, cs in sorted(lines.items()):
            cs = sorted(cs, key=lambda c: c["axes"][axis])
            xs, ys, err = [], [], []
            for c in cs:
                vals = [r[field] for r in c["runs"]]
                m, s = mean_std(vals)
                xs.append(c["axes"][axis])
                ys.append(m)
                err.append(t_quantile(0.975, len(vals) - 1) * s / len(vals) ** 0.5 if s else 0.0)
            color = COLORS.get(cs[0]["norm"])
            ax.errorbar(
                xs, ys, yerr=err, marker="o", capsize=3, color=color, label=label, alpha=0.9
            )
            for x, y, c in zip(xs, ys, cs):
                if (c["model"], c["norm"], c["axes"]) in picks:
                    ax.plot([x], [y], "o", ms=13, mfc="none", mec=color, mew=1.5)
        xs_all = sorted({c["axes"][axis] for c in cells})
        if xs_all and xs_all[0] > 0 and xs_all[-1] / xs_all[0] >= 8:
            ax.set_xscale("log")
            ax.set_xticks(xs_all, [f"{v:g}" for v in xs_all])
            ax.minorticks_off()
        ax.set_xlabel(axis)
        ax.set_ylabel(("test" if field == "test_acc" else "held-out") + " accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Accuracy against {axis} (mean and 95% CI over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
