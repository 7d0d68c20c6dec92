"""``l2bn report RUN_DIR... -o DIR``: one page with accuracy (mean ± std, paired difference with
a 95% CI), learning curves and the analysis figures — as ``report.md`` (figures beside it) and a
self-contained ``report.html`` (figures embedded), each figure with a caption saying what to
look for."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .markdown import accuracy_table, difference_table, verdict
from .stats import fmt_pm, mean_std, paired_difference


class ReportError(ValueError):
    """A run directory cannot be reported on (missing result.json, ...)."""


def load_runs(run_dirs: Sequence[str]) -> List[Dict[str, Any]]:
    runs = []
    for d in run_dirs:
        p = Path(d) / "result.json"
        if not p.is_file():
            raise ReportError(f"{d}: no result.json (is this a finished `l2bn train` run directory?)")
        r = json.loads(p.read_text())
        if r.get("status") != "complete":
            raise ReportError(f"{d}: run is not complete (status {r.get('status')!r})")
        r["dir"] = str(Path(d))
        a = Path(d) / "analysis.json"
        r["analysis"] = json.loads(a.read_text()) if a.is_file() else None
        runs.append(r)
    return runs


def summarize_runs(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per (model, norm) cell statistics and paired L2BN−BN differences (paired by seed)."""
    models = list(dict.fromkeys(r["config"]["model"] for r in runs))
    norms = list(dict.fromkeys(r["config"]["norm"] for r in runs))
    if "bn" in norms:
        norms = ["bn"] + [n for n in norms if n != "bn"]
    seeds = sorted({r["config"]["seed"] for r in runs})
    cells: Dict[str, Any] = {}
    for m in models:
        for n in norms:
            rs = sorted((r for r in runs if r["config"]["model"] == m and r["config"]["norm"] == n), key=lambda r: r["config"]["seed"])
            if not rs:
                continue
            fm, fs = mean_std([r["test_acc"] for r in rs])
            bm, bs = mean_std([r["best_test_acc"] for r in rs])
            cells[f"{m}/{n}"] = {"model": m, "norm": n, "n": len(rs), "final_mean": fm, "final_std": fs, "best_mean": bm, "best_std": bs,
                                 "runs": [{"seed": r["config"]["seed"], "test_acc": r["test_acc"], "best_test_acc": r["best_test_acc"],
                                           "wall_time_s": r["wall_time_s"], "dir": r["dir"]} for r in rs]}
    diffs: Dict[str, Any] = {}
    for m in models:
        if f"{m}/bn" not in cells:
            continue
        b = {r["seed"]: r["test_acc"] for r in cells[f"{m}/bn"]["runs"]}
        for n in norms:
            if n == "bn" or f"{m}/{n}" not in cells:
                continue
            a = {r["seed"]: r["test_acc"] for r in cells[f"{m}/{n}"]["runs"]}
            common = sorted(set(a) & set(b))
            diffs[f"{m}/{n}-bn"] = {"seeds": common, **paired_difference([a[s] for s in common], [b[s] for s in common])}
    return {"cells": cells, "differences": diffs, "models": models, "norms": norms, "seeds": seeds}


def analysis_table(analyses: List[Dict[str, Any]]) -> List[str]:
    from .analysis_plots import METRICS

    groups: Dict[str, List[Dict[str, Any]]] = {}
    for a in analyses:
        groups.setdefault(f"{a['model']}/{a['norm']}", []).append(a)
    mets = [m for m in METRICS if all(m[0] in a for a in analyses)]
    head = ["model/norm", "n", "norm CV (mean over layers)", "max/min norm ratio (median layer)"] + [t for _, t in mets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, rs in groups.items():
        cvs = [sum(s["cv"] for s in r["norm_spread"].values()) / len(r["norm_spread"]) for r in rs]
        ratios = []
        for r in rs:
            vals = sorted(s["max_min_ratio"] for s in r["norm_spread"].values())
            ratios.append(vals[len(vals) // 2])
        row = [g, str(len(rs)), fmt_pm(*mean_std(cvs), digits=3), fmt_pm(*mean_std(ratios), digits=1)]
        row += [fmt_pm(*mean_std([r[k] for r in rs]), digits=3 if k in ("compactness", "fisher_ratio") else 2) for k, _ in mets]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def analysis_claims(analyses: List[Dict[str, Any]]) -> List[str]:
    """Say plainly whether the paper's mechanism claims hold on these runs."""
    groups: Dict[str, Dict[str, List[float]]] = {}
    for a in analyses:
        g = groups.setdefault(a["norm"], {"compactness": [], "discrepancy_mean_deg": [], "fisher_ratio": []})
        for k in g:
            g[k].append(a[k])
    if "bn" not in groups or "l2bn" not in groups:
        return []
    out = []
    for key, what in (("compactness", "intra-class compactness"), ("discrepancy_mean_deg", "inter-class discrepancy (mean centroid angle)"),
                      ("fisher_ratio", "Fisher ratio")):
        b = sum(groups["bn"][key]) / len(groups["bn"][key])
        l2 = sum(groups["l2bn"][key]) / len(groups["l2bn"][key])
        b_rng = (min(groups["bn"][key]), max(groups["bn"][key]))
        l_rng = (min(groups["l2bn"][key]), max(groups["l2bn"][key]))
        separated = l_rng[0] > b_rng[1] or l_rng[1] < b_rng[0]
        direction = "higher" if l2 > b else "lower"
        claim = "supports" if l2 > b and separated else ("contradicts" if l2 < b and separated else "does not settle")
        out.append(f"- {what}: L2BN {l2:.3f} vs BN {b:.3f} ({direction} with L2BN; seed ranges "
                   f"{'do not overlap' if separated else 'overlap'}) — this {claim} the paper's claim that L2BN increases it.")
    return out


FIGURES = [
    ("curves.png", "Learning curves", "Look for: whether L2BN (red) reaches higher test accuracy than BN (blue), and whether it gets there in fewer epochs."),
    ("norm_cv.png", "Spread of sample norms per layer", "Look for: how unequal the sample norms entering each normalization layer are (coefficient of variation). L2BN removes this spread before its statistics; BN mixes it into them."),
    ("norm_hist.png", "Sample-norm histograms", "Look for: the width of each histogram — the range of magnitudes that BN's batch statistics average over."),
    ("metrics.png", "Feature geometry", "Look for: higher compactness, smaller intra-class angle, larger centroid angles and Fisher ratio with L2BN — the paper's mechanism. Dots are seeds."),
    ("pca.png", "Penultimate features (PCA)", "Look for: tighter, better separated class clusters."),
]


def build_report(run_dirs: Sequence[str], out_dir: str, title: str = "", note: str = "", extra: Optional[Dict[str, Any]] = None) -> Dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the figures into ``out_dir``."""
    from .analysis_plots import metric_bars, norm_cv, norm_histograms, pca_views
    from .plots import learning_curves

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(run_dirs)
    if not runs:
        raise ReportError("no runs given")
    summary = summarize_runs(runs)
    dataset = runs[0]["config"]["dataset"]
    learning_curves(summary, out / "curves.png")
    analyses = [r["analysis"] for r in runs if r["analysis"]]
    figs = ["curves.png"]
    if analyses:
        norm_cv(analyses, out / "norm_cv.png")
        norm_histograms(analyses, out / "norm_hist.png")
        metric_bars(analyses, out / "metrics.png")
        pca_views(analyses, out / "pca.png")
        figs += ["norm_cv.png", "norm_hist.png", "metrics.png", "pca.png"]
    recipe = {k: v for k, v in runs[0]["config"].items() if k not in ("out", "seed", "norm", "progress", "resume", "data_dir", "tensorboard")}
    walls = [r["wall_time_s"] for r in runs]
    md: List[str] = [f"# {title or f'BN vs L2BN on {dataset}'}", ""]
    if note:
        md += [note, ""]
    md += [f"Recipe (every run): {', '.join(f'{k}={v}' for k, v in recipe.items())}.",
           f"{len(runs)} runs, {sum(walls):.0f} s of training in total" + (f"; whole job {extra['wall_time_s']:.0f} s." if extra and 'wall_time_s' in extra else "."), "",
           "## Test accuracy (%) per seed (last epoch)", "", *accuracy_table(summary), "",
           "## Paired difference L2BN − BN (same seed: same initialisation and data order)", "", *difference_table(summary), "",
           *verdict(summary), ""]
    captions = {f: (t, c) for f, t, c in FIGURES}
    md += [f"## {captions['curves.png'][0]}", "", "![curves](curves.png)", "", f"*{captions['curves.png'][1]}*", ""]
    if analyses:
        md += ["## Mechanism: what the paper claims, measured on the test split", "",
               "Norm spread is measured at the *input* of every normalization layer (before the l2 step), "
               "features at the classifier's input. Definitions: `l2bn.analysis.metrics`.", "",
               *analysis_table(analyses), "", *analysis_claims(analyses), ""]
        for f in figs[1:]:
            t, c = captions[f]
            md += [f"## {t}", "", f"![{t}]({f})", "", f"*{c}*", ""]
    else:
        md += ["*(No analysis.json in these runs: run `l2bn analyze RUN_DIR...` to add the mechanism section.)*", ""]
    md_text = "\n".join(md) + "\n"
    (out / "report.md").write_text(md_text)
    (out / "report.html").write_text(to_html(md_text, out, title or f"BN vs L2BN on {dataset}"))
    from ..train.checkpoint import write_json

    write_json({"summary": summary, "analyses": [{k: v for k, v in a.items() if k not in ("pca2d",)} for a in analyses]}, out / "report.json")
    return {"md": out / "report.md", "html": out / "report.html"}


def to_html(md_text: str, fig_dir: Path, title: str) -> str:
    """Render our markdown (python-markdown, tables) with figures embedded as data URIs."""
    import markdown

    body = markdown.markdown(md_text, extensions=["tables"])

    def embed(m: re.Match[str]) -> str:
        src = m.group(2)
        p = fig_dir / src
        if p.is_file():
            data = base64.b64encode(p.read_bytes()).decode()
            return f'{m.group(1)}data:image/png;base64,{data}"'
        return m.group(0)

    body = re.sub(r'(<img[^>]*src=")([^"]+)"', embed, body)
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}em{color:#555}")
    check = ("<script>window.__errors=[];window.addEventListener('error',e=>window.__errors.push(String(e.message||e)),true);"
             "window.addEventListener('load',()=>{const im=[...document.images];"
             "document.body.dataset.images=im.length;document.body.dataset.imagesOk=im.filter(i=>i.complete&&i.naturalWidth>0).length;"
             "document.body.dataset.errors=window.__errors.length;});</script>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>{check}</head>"
            f"<body>{body}</body></html>")
