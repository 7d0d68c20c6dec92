"""``l2bn report RUN_DIR... -o DIR``: one page with accuracy (per seed, mean ± std, paired
differences with 95% CIs, p-values and power), one table and plot per grid axis, learning
curves and the mechanism analysis — as ``report.md`` (figures beside it), a self-contained
``report.html`` (figures embedded) and ``summary.json``. Each figure has a caption saying what to
look for. Loading and statistics live in :mod:`l2bn.report.runs`, tables in
:mod:`l2bn.report.markdown`; this module writes the files.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..io import write_json
from .failures import failure_lines, failure_summary, run_table
from .markdown import (
    accuracy_table,
    axis_tables,
    difference_table,
    mechanism_claims,
    mechanism_table,
    per_group_table,
    pooled_lines,
    verdict,
)
from .runs import NORM_ORDER, ReportError, load_runs, summarize_runs
from .tuned import tuned_comparison, tuned_lines

__all__ = ["build_report", "to_html", "ReportError"]

FIGURES = {
    "curves.png": (
        "Learning curves",
        "Look for: whether L2BN (red) reaches higher test accuracy than BN (blue), and whether it "
        "gets there in fewer epochs.",
    ),
    "norm_cv.png": (
        "Spread of sample norms per layer",
        "Look for: how unequal the sample norms entering each normalization layer are "
        "(coefficient of variation). L2BN removes this spread before its statistics; "
        "BN mixes it into them.",
    ),
    "norm_hist.png": (
        "Sample-norm histograms",
        "Look for: the width of each histogram — the range of magnitudes that BN's batch "
        "statistics average over.",
    ),
    "metrics.png": (
        "Feature geometry",
        "Look for: higher compactness, smaller intra-class angle, larger centroid angles and "
        "Fisher ratio with L2BN — the paper's mechanism. Dots are seeds.",
    ),
    "pca.png": (
        "Penultimate features (PCA)",
        "Look for: tighter, better separated class clusters.",
    ),
}


def _train_time(r: Dict[str, Any]) -> float:
    """A run's training time across resumes: ``train_time_s``, else the sum of its epochs'
    times (results written before it was recorded), else the last process's wall time."""
    if "train_time_s" in r:
        return float(r["train_time_s"])
    epochs = [h["epoch_time_s"] for h in r.get("history", []) if "epoch_time_s" in h]
    return float(sum(epochs)) if epochs else float(r["wall_time_s"])


def build_report(
    run_dirs: Sequence[str],
    out_dir: str,
    title: str = "",
    note: str = "",
    extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, Path]:
    """Write ``report.md``, ``report.html``, ``summary.json`` and the figures into ``out_dir``.

    Raises:
        ReportError: a run directory is missing, unfinished or corrupt.
    """
    from .analysis_plots import metric_bars, norm_cv, norm_histograms, pca_views
    from .plots import accuracy_vs_axis, axis_plot, learning_curves

    diverged: List[Dict[str, Any]] = []
    runs = load_runs(run_dirs, diverged)
    if not runs:
        raise ReportError(
            "no runs given" if not diverged else "every run given diverged: nothing to report"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize_runs(runs, rel_to=str(out), diverged=diverged)
    summary["failures"] = failure_summary(summary["cells"], summary["diverged"])
    numeric = [
        a
        for a in summary["axes"]
        if all(
            isinstance(c["axes"][a], (int, float)) and not isinstance(c["axes"][a], bool)
            for c in summary["cells"].values()
        )
        and len({c["axes"][a] for c in summary["cells"].values()}) > 1
    ]
    summary["tuned"] = {}
    tuned_md: List[str] = []
    for axis in numeric:
        held = sorted({r["recipe"].get("val_size") or 0 for r in runs})
        tuned = tuned_comparison(summary, axis, held_out=held[0] if len(held) == 1 else None)
        name = f"accuracy_{re.sub(r'[^A-Za-z0-9_]+', '_', axis)}.png"
        accuracy_vs_axis(summary, axis, out / name, tuned)
        if tuned:
            summary["tuned"][axis] = tuned
            tuned_md += tuned_lines(tuned, name)
        else:
            tuned_md += [
                f"![accuracy against {axis}]({name})",
                "",
                f"*Test accuracy against `{axis}`: mean and 95% t-interval over seeds.*",
                "",
            ]
    dataset = runs[0]["config"]["dataset"]
    learning_curves(runs, out / "curves.png")
    figs = ["curves.png"]
    analyses = [r["analysis"] for r in runs if r["analysis"]]
    if analyses:
        norm_cv(analyses, out / "norm_cv.png")
        norm_histograms(analyses, out / "norm_hist.png")
        metric_bars(analyses, out / "metrics.png")
        pca_views(analyses, out / "pca.png")
        figs += ["norm_cv.png", "norm_hist.png", "metrics.png", "pca.png"]
    axis_figs = []
    paired = any(d["n"] for d in summary["differences"].values())
    plot_axes = (
        (list(summary["axes"]) + (["model"] if len(summary["models"]) > 1 else []))
        if paired
        else []
    )
    for axis in plot_axes:
        name = f"axis_{re.sub(r'[^A-Za-z0-9_]+', '_', axis)}.png"
        axis_plot(summary, axis, out / name)
        axis_figs.append((axis, name))

    from ..train.config import TrainConfig

    cfg0 = TrainConfig.from_record(runs[0]["config"])
    recipe = {
        k: v
        for k, v in cfg0.recipe_summary().items()
        if k not in ("seed", "norm", "model", *summary["axes"])
        and all(repr(r["recipe"].get(k)) == repr(v) for r in runs)
    }  # "every run": only what they share
    if recipe.get("train_subset") and all(
        r.get("train_examples") is not None and r["train_examples"] < recipe["train_subset"]
        for r in runs
    ):
        del recipe["train_subset"]  # larger than the training set: it had no effect
    datasets = sorted({r["config"]["dataset"] for r in runs})
    norms = sorted({r["norm"] for r in runs}, key=lambda n: NORM_ORDER.get(n, len(NORM_ORDER)))
    title = title or f"{' vs '.join(n.upper() for n in norms)} on {', '.join(datasets)}"
    walls = [_train_time(r) for r in runs]
    devices = sorted({str(r.get("device")) for r in runs})
    md: List[str] = [f"# {title}", ""]
    if note:
        md += [note, ""]
    md += [
        f"Recipe (every run): {', '.join(f'{k}={v}' for k, v in recipe.items())}."
        + (f" Grid axes: {', '.join(summary['axes'])}." if summary["axes"] else ""),
        f"{len(runs)} runs, {sum(walls):.0f} s of training in total on {', '.join(devices)}"
        + (
            f"; this compare call {extra['compare_wall_time_s']:.0f} s."
            if extra and "compare_wall_time_s" in extra
            else "."
        ),
        "",
        "## Test accuracy (%) per seed (last epoch)",
        "",
        *accuracy_table(summary),
        "",
    ]
    pg = per_group_table(summary)
    if pg:
        md += ["## Accuracy per group (mean over seeds)", "", *pg, ""]
    if paired:
        md += [
            "## Paired difference against BN (same seed: same initialisation and data order)",
            "",
            *difference_table(summary),
            "",
            *verdict(summary),
            "",
            *pooled_lines(summary),
        ]
    else:
        why = (
            "there is no BN run among them"
            if "bn" not in norms
            else "no other run has a BN run with the same model, recipe and seed (different "
            "epochs, grid values or seeds?)"
        )
        md += ["## Paired difference against BN", "", f"*No paired comparison: {why}.*", ""]
    md += tuned_md
    if axis_figs:
        md += [
            "## Grid axes" if summary["axes"] else "## Across models",
            "",
            *axis_tables(summary, plot_axes),
        ]
        for axis, name in axis_figs:
            md += [
                f"![{axis}]({name})",
                "",
                f"*Paired difference against BN (mean and 95% CI over seeds) as `{axis}` varies. "
                "Look for: whether the interval leaves 0 anywhere, and a trend along the axis.*",
                "",
            ]
    md += failure_lines(summary["failures"])
    if not summary["axes"] and any(c["judged"] for c in summary["failures"]["cells"].values()):
        md += ["### Every run", "", *run_table(summary["failures"])]
    if summary["diverged"]:
        md += [
            "## Diverged runs",
            "",
            "Left out of the statistics above (counted as failed runs): "
            + "; ".join(f"{d['dir']} ({d['message']})" for d in summary["diverged"])
            + ".",
            "",
        ]
    t, c = FIGURES["curves.png"]
    md += [f"## {t}", "", "![curves](curves.png)", "", f"*{c}*", ""]
    if analyses:
        md += [
            "## Mechanism: what the paper claims, measured on the test split",
            "",
            "Norm spread is measured at the *input* of every normalization layer (before the l2 "
            "step), "
            "features at the classifier's input. Definitions: `l2bn.analysis.metrics`. "
            "Differences are paired by seed.",
            "",
            *mechanism_table(summary),
            "",
            *mechanism_claims(summary),
            "",
        ]
        for f in figs[1:]:
            t, c = FIGURES[f]
            md += [f"## {t}", "", f"![{t}]({f})", "", f"*{c}*", ""]
    else:
        md += [
            "*(No analysis.json in these runs: run `l2bn analyze RUN_DIR...` to add the mechanism "
            "section.)*",
            "",
        ]
    md_text = "\n".join(md) + "\n"
    (out / "report.md").write_text(md_text)
    (out / "report.html").write_text(to_html(md_text, out, title))
    summary.update(dataset=dataset, recipe=recipe, **(extra or {}))
    write_json(summary, out / "summary.json")
    return {"md": out / "report.md", "html": out / "report.html", "summary": out / "summary.json"}


def to_html(md_text: str, fig_dir: Path, title: str) -> str:
    """Render our markdown (python-markdown, tables) with figures embedded as data URIs."""
    import markdown

    body = markdown.markdown(md_text, extensions=["tables"])

    def embed(m: re.Match[str]) -> str:
        p = fig_dir / m.group(2)
        if p.is_file():
            return f'{m.group(1)}data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"'
        return m.group(0)

    body = re.sub(r'(<img[^>]*src=")([^"]+)"', embed, body)
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;"
        "padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child{white-space:nowrap;text-align:left}"
        "th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}em{color:#555}"
    )
    return (
        f"<!doctype html><html><head><meta "
        f"charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head>"
        f"<body>{body}</body></html>"
    )
