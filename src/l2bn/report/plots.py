"""Matplotlib figures (Agg backend, PNG files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(summary: Dict[str, Any], path: Path) -> Path:
    """Test accuracy and train loss per epoch, one line per run, colour per norm."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {"bn": "tab:blue", "l2bn": "tab:red", "l2bn-rms": "tab:orange", "none": "tab:gray"}
    seen = set()
    for key, cell in summary["cells"].items():
        for run in cell["runs"]:
            res = json.loads((Path(run["dir"]) / "result.json").read_text())
            hist = res.get("history", [])
            ep = [h["epoch"] for h in hist if "test_acc" in h]
            acc = [h["test_acc"] for h in hist if "test_acc" in h]
            label = key if key not in seen else None
            seen.add(key)
            c = colors.get(cell["norm"], None)
            ls = "-" if len(summary["models"]) < 2 or cell["model"] == summary["models"][0] else "--"
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
