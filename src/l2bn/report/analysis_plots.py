"""Figures of the analysis: norm spread per layer, norm histograms, metric bars, PCA views."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from .plots import COLORS, _plt


def _by_norm(analyses: List[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    out: Dict[str, List[Dict[str, Any]]] = {}
    for a in analyses:
        out.setdefault(f"{a['model']}/{a['norm']}", []).append(a)
    return out


def norm_cv(analyses: List[Dict[str, Any]], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for key, runs in _by_norm(analyses).items():
        layers = list(runs[0]["norm_spread"])
        cv = np.array([[r["norm_spread"][n]["cv"] for n in layers] for r in runs])
        x = np.arange(len(layers))
        c = COLORS.get(runs[0]["norm"])
        ax.plot(x, cv.mean(0), marker="o", ms=3, color=c, label=f"{key} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(x, cv.min(0), cv.max(0), color=c, alpha=0.2)
    ax.set_xlabel("normalization layer (forward order)")
    ax.set_ylabel("CV of per-sample input norm")
    ax.set_title("Spread of sample norms entering each normalization layer (before the l2 step)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def norm_histograms(analyses: List[Dict[str, Any]], path: Path) -> Path:
    plt = _plt()
    groups = _by_norm(analyses)
    first = next(iter(groups.values()))[0]
    layers = list(first["norm_spread"])
    picks = sorted({0, len(layers) // 2, len(layers) - 1})
    fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 3.2))
    axes = np.atleast_1d(axes)
    for ax, li in zip(axes, picks):
        for key, runs in groups.items():
            r = runs[0]
            s = r["norm_spread"][list(r["norm_spread"])[li]]
            lo, hi = s["hist_range"]
            h = np.array(s["hist_log10"])
            edges = np.linspace(lo, hi, len(h) + 1)
            ax.stairs(h / max(h.sum(), 1), edges, color=COLORS.get(r["norm"]), label=key)
        ax.set_title(f"layer {li}: {layers[li]}", fontsize=9)
        ax.set_xlabel("log10 ‖x_n‖ (sample norm at the layer input)")
    axes[0].set_ylabel("fraction of samples")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


METRICS = [("compactness", "intra-class compactness (cos to centroid)"),
           ("intra_class_angle_deg", "mean intra-class angle (deg)"),
           ("discrepancy_mean_deg", "mean angle between class centroids (deg)"),
           ("discrepancy_min_deg", "min angle between class centroids (deg)"),
           ("fisher_ratio", "Fisher ratio tr(Sb)/tr(Sw)"),
           ("knn_accuracy", "k-NN accuracy on features (%)")]


def metric_bars(analyses: List[Dict[str, Any]], path: Path) -> Path:
    plt = _plt()
    groups = _by_norm(analyses)
    mets = [m for m in METRICS if all(m[0] in a for a in analyses)]
    fig, axes = plt.subplots(1, len(mets), figsize=(2.6 * len(mets), 3.2))
    axes = np.atleast_1d(axes)
    for ax, (key, title) in zip(axes, mets):
        for i, runs in enumerate(groups.values()):
            vals = np.array([r[key] for r in runs])
            ax.bar(i, vals.mean(), yerr=vals.std(ddof=1) if len(vals) > 1 else 0, color=COLORS.get(runs[0]["norm"]), capsize=4)
            ax.scatter(np.full(len(vals), i), vals, color="k", s=8, zorder=3)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g.split("/")[-1] for g in groups], fontsize=8)
        ax.set_title(title, fontsize=8)
        lo = min(r[key] for r in analyses)
        hi = max(r[key] for r in analyses)
        pad = (hi - lo) * 0.6 + 1e-9
        ax.set_ylim(lo - pad, hi + pad)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pca_views(analyses: List[Dict[str, Any]], path: Path) -> Path:
    plt = _plt()
    groups = _by_norm(analyses)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4))
    axes = np.atleast_1d(axes)
    for ax, (g, runs) in zip(axes, groups.items()):
        p = sorted(runs, key=lambda r: r["seed"])[0]["pca2d"]
        sc = ax.scatter(p["x"], p["y"], c=p["label"], cmap="tab10", s=4, alpha=0.7)
        ax.set_title(f"{g}, seed {sorted(runs, key=lambda r: r['seed'])[0]['seed']}: penultimate features (PCA)", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(sc, ax=list(axes), label="class")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
