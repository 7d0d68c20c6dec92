"""Figures of the analysis: norm spread per layer, norm histograms, metric bars, PCA views."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from .plots import COLORS, _plt

_MODEL_STYLES = ["-", "--", ":", "-."]


def _by_norm(analyses: List[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    """Analyses grouped by ``model/norm``: models shallow to deep (natural order), BN first."""
    from .runs import NORM_ORDER, model_order

    out: Dict[str, List[Dict[str, Any]]] = {}
    for a in sorted(
        analyses,
        key=lambda a: (
            model_order(a["model"]),
            NORM_ORDER.get(a["norm"], len(NORM_ORDER)),
            a["norm"],
        ),
    ):
        out.setdefault(f"{a['model']}/{a['norm']}", []).append(a)
    return out


def _models(groups: Dict[str, List[Dict[str, Any]]]) -> List[str]:
    return list(dict.fromkeys(runs[0]["model"] for runs in groups.values()))


def norm_cv(analyses: List[Dict[str, Any]], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    groups = _by_norm(analyses)
    models = _models(groups)
    for key, runs in groups.items():
        layers = list(runs[0]["norm_spread"])
        cv = np.array([[r["norm_spread"][n]["cv"] for n in layers] for r in runs])
        x = np.arange(len(layers))
        c = COLORS.get(runs[0]["norm"])
        ls = _MODEL_STYLES[models.index(runs[0]["model"]) % len(_MODEL_STYLES)]
        ax.plot(x, cv.mean(0), marker="o", ms=3, color=c, ls=ls, label=f"{key} (n={len(runs)})")
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
    """Histograms of log sample norms at the first, middle and last normalization layer: one row
    per model (each model's own layers), one line per norm."""
    plt = _plt()
    groups = _by_norm(analyses)
    models = _models(groups)
    rows = []
    for m in models:
        layers = list(
            next(runs for runs in groups.values() if runs[0]["model"] == m)[0]["norm_spread"]
        )
        rows.append((m, layers, sorted({0, len(layers) // 2, len(layers) - 1})))
    ncols = max(len(picks) for _, _, picks in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(4 * ncols, 3.2 * len(rows)), squeeze=False)
    for (m, layers, picks), row in zip(rows, axes):
        for ax, li in zip(row, picks):
            for key, runs in groups.items():
                r = runs[0]
                if r["model"] != m:
                    continue
                s = r["norm_spread"][layers[li]]
                lo, hi = s["hist_range"]
                h = np.array(s["hist_log10"])
                edges = np.linspace(lo, hi, len(h) + 1)
                ax.stairs(h / max(h.sum(), 1), edges, color=COLORS.get(r["norm"]), label=key)
            ax.set_title(
                f"{m + ', ' if len(models) > 1 else ''}layer {li}: {layers[li]}", fontsize=9
            )
            ax.set_xlabel("log10 ‖x_n‖ (sample norm at the layer input)")
        for ax in row[len(picks) :]:
            ax.set_visible(False)
        row[0].set_ylabel("fraction of samples")
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


METRICS = [
    ("compactness", "intra-class compactness (cos to centroid)"),
    ("intra_class_angle_deg", "mean intra-class angle (deg)"),
    ("discrepancy_mean_deg", "mean angle between class centroids (deg)"),
    ("discrepancy_min_deg", "min angle between class centroids (deg)"),
    ("fisher_ratio", "Fisher ratio tr(Sb)/tr(Sw)"),
    ("knn_accuracy", "k-NN accuracy on features (%)"),
]


def metric_bars(analyses: List[Dict[str, Any]], path: Path) -> Path:
    plt = _plt()
    groups = _by_norm(analyses)
    mets = [m for m in METRICS if all(m[0] in a for a in analyses)]
    fig, axes = plt.subplots(1, len(mets), figsize=(2.6 * len(mets), 3.2))
    axes = np.atleast_1d(axes)
    for ax, (key, title) in zip(axes, mets):
        for i, runs in enumerate(groups.values()):
            vals = np.array([r[key] for r in runs])
            ax.bar(
                i,
                vals.mean(),
                yerr=vals.std(ddof=1) if len(vals) > 1 else 0,
                color=COLORS.get(runs[0]["norm"]),
                capsize=4,
            )
            ax.scatter(np.full(len(vals), i), vals, color="k", s=8, zorder=3)
        ax.set_xticks(range(len(groups)))
        several = len(_models(groups)) > 1
        ax.set_xticklabels(
            [g if several else g.split("/")[-1] for g in groups],
            fontsize=8,
            rotation=60 if several else 0,
            ha="right" if several else "center",
        )
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
    """PCA of the penultimate features of each cell's lowest seed: one row per model, one column
    per norm."""
    plt = _plt()
    groups = _by_norm(analyses)
    models = _models(groups)
    norms = list(dict.fromkeys(runs[0]["norm"] for runs in groups.values()))
    fig, axes = plt.subplots(
        len(models), len(norms), figsize=(4.2 * len(norms), 4 * len(models)), squeeze=False
    )
    sc = None
    for ax in axes.flat:
        ax.set_visible(False)
    for g, runs in groups.items():
        first = sorted(runs, key=lambda r: r["seed"])[0]
        ax = axes[models.index(first["model"]), norms.index(first["norm"])]
        ax.set_visible(True)
        p = first["pca2d"]
        sc = ax.scatter(p["x"], p["y"], c=p["label"], cmap="tab10", s=4, alpha=0.7)
        ax.set_title(f"{g}, seed {first['seed']}: penultimate features (PCA)", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(sc, ax=[a for a in axes.flat if a.get_visible()], label="class")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
