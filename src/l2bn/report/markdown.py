"""Markdown tables and plain-language verdicts for the reports."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from .runs import MECHANISM_METRICS
from .stats import fmt_pm


def _axes_str(axes: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in axes.items())


def _p(p: Optional[float]) -> str:
    if p is None:
        return "–"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def mean_ci(d: Dict[str, Any]) -> Tuple[str, str]:
    """A paired difference's mean and 95% interval as table cells (``–`` where there is none)."""
    ci = "–" if d["ci_low"] is None else f"[{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"
    return ("–" if d["mean"] is None else f"{d['mean']:+.2f}"), ci


def accuracy_table(summary: Dict[str, Any]) -> List[str]:
    seeds = summary["seeds"]
    axes = summary.get("axes", [])
    head = (
        ["model", "norm"]
        + axes
        + [f"seed {s}" for s in seeds]
        + ["final mean ± std", "best-epoch mean ± std", "n"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in summary["cells"].values():
        by_seed = {r["seed"]: r["test_acc"] for r in cell["runs"]}
        row = [cell["model"], cell["norm"]] + [str(cell["axes"].get(a)) for a in axes]
        row += [f"{by_seed[s]:.2f}" if s in by_seed else "–" for s in seeds]
        row += [
            fmt_pm(cell["final_mean"], cell["final_std"]),
            fmt_pm(cell["best_mean"], cell["best_std"]),
            str(cell["n"]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def per_group_table(summary: Dict[str, Any]) -> List[str]:
    """Best-epoch and final accuracy per group (recording device), mean over seeds, if recorded."""
    groups = sorted(
        {
            g
            for c in summary["cells"].values()
            for r in c["runs"]
            for g in r.get("per_group_acc", {})
        }
    )
    if not groups:
        return []
    head = ["cell", "accuracy"] + groups
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, cell in summary["cells"].items():
        for label, field in (("best epoch", "best_per_group_acc"), ("final", "per_group_acc")):
            vals = []
            for g in groups:
                xs = [r[field][g] for r in cell["runs"] if g in r.get(field, {})]
                vals.append(f"{sum(xs) / len(xs):.2f}" if xs else "–")
            lines.append("| " + " | ".join([key, label] + vals) + " |")
    return lines


def difference_table(summary: Dict[str, Any]) -> List[str]:
    """One row per comparison against BN, then footnotes: what the Holm column adjusts for, and
    (once, not per row) that fewer than 5 seeds give wide intervals."""
    lines = [
        "| comparison | paired seeds | mean difference (pp) | 95% CI (t) | p (paired t) | p "
        "(Holm) | "
        "detectable at 80% power (pp) | seeds to detect 0.5 pp |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, d in summary["differences"].items():
        mean, ci = mean_ci(d)
        mde = f"{d['mde_80']:.2f}" if d.get("mde_80") is not None else "–"
        need = str(d["seeds_for_0_5"]) if d.get("seeds_for_0_5") is not None else "–"
        lines.append(
            f"| {key} | {d['n']} | {mean} | {ci} | {_p(d.get('p_value'))} | {_p(d.get('p_holm'))} "
            f"| {mde} | {need} |"
        )
    diffs = list(summary["differences"].values())
    k = max((d.get("family_size", 0) for d in diffs), default=0)
    if k > 1:
        lines += [
            "",
            f"*p (Holm): adjusted for the {k} comparisons of this table that have a p-value "
            f"(Holm's "
            "step-down method): reading only rows below 0.05 as significant keeps the chance of "
            "any false "
            "positive in the table at most 5%. Adjusted values grow as a sweep adds cells.*",
        ]
    few = sorted({d["n"] for d in diffs if 2 <= d["n"] < 5})
    if few:
        seeds = str(few[0]) if len(few) == 1 else f"{few[0]}–{few[-1]}"
        lines += [
            "",
            f"*Rows with {seeds} paired seeds: the t-interval is wide; "
            "the power columns say how many seeds a firm conclusion needs.*",
        ]
    return lines


def axis_tables(summary: Dict[str, Any], axes: Optional[List[str]] = None) -> List[str]:
    """One table per axis — the grid axes, or those given (``"model"`` for a study across models,
    rows shallow to deep): each norm − BN against the axis value, the other axes fixed."""
    from .runs import model_order

    out: List[str] = []
    for axis in summary.get("axes", []) if axes is None else axes:
        by_model = axis == "model"
        out += [
            f"### L2BN − BN against `{axis}`",
            "",
            ("" if by_model else "| model ")
            + f"| norm | other axes | {axis} | paired seeds | mean (pp) | 95% CI | p | p (Holm) |",
            "|---" * (8 if by_model else 9) + "|",
        ]
        rows = sorted(
            summary["differences"].values(),
            key=lambda d: (
                "" if by_model else d["model"],
                d["norm"],
                _axes_str({k: v for k, v in d["axes"].items() if k != axis}),
                model_order(d["model"]) if by_model else _sortable(d["axes"].get(axis)),
            ),
        )
        for d in rows:
            mean, ci = mean_ci(d)
            others = _axes_str({k: v for k, v in d["axes"].items() if k != axis}) or "–"
            value = d["model"] if by_model else d["axes"].get(axis)
            out.append(
                ("" if by_model else f"| {d['model']} ")
                + f"| {d['norm']} | {others} | {value} | {d['n']} | {mean} | {ci} | "
                f"{_p(d.get('p_value'))} | {_p(d.get('p_holm'))} |"
            )
        out.append("")
    return out


def _sortable(v: Any) -> Any:
    return (0, v) if isinstance(v, (int, float)) else (1, str(v))


def _holm_caveat(d: Dict[str, Any], what: str = "comparisons") -> str:
    """For a difference whose own interval excludes 0: whether it survives Holm's correction."""
    ph, k = d.get("p_holm"), d.get("family_size", 1)
    if ph is None or k < 2:
        return ""
    if ph < 0.05:
        return (
            f"; it stays significant after Holm's correction for {k} {what} (adjusted p = {_p(ph)})"
        )
    return f"; not significant after Holm's correction for {k} {what} (adjusted p = {_p(ph)})"


def _survives(d: Dict[str, Any]) -> bool:
    return d.get("p_holm") is None or d.get("family_size", 1) < 2 or d["p_holm"] < 0.05


def verdict(summary: Dict[str, Any]) -> List[str]:
    out = []
    for key, d in summary["differences"].items():
        if d["ci_low"] is None:
            out.append(f"- {key}: not enough paired seeds to judge.")
        elif d["ci_low"] > 0 or d["ci_high"] < 0:
            side = "better" if d["ci_low"] > 0 else "worse"
            qualifier = "" if _survives(d) else " without correction"
            out.append(
                f"- {key}: {side} than BN{qualifier} — the 95% interval excludes 0 "
                f"({d['mean']:+.2f} pp, "
                f"p = {_p(d['p_value'])}){_holm_caveat(d)}."
            )
        else:
            mde = (
                f"; with this spread {d['n']} seeds detect only differences of about "
                f"{d['mde_80']:.2f} pp (80% power), "
                f"and {d['seeds_for_0_5']} seeds would be needed for 0.5 pp"
                if d.get("mde_80") is not None
                else ""
            )
            out.append(
                f"- {key}: no significant difference at 95% ({d['mean']:+.2f} pp, p = "
                f"{_p(d['p_value'])}{mde})."
            )
    return out


def pooled_lines(summary: Dict[str, Any]) -> List[str]:
    """Each norm − BN on average over the report's cells (a secondary summary)."""
    pooled = summary.get("pooled", {})
    if not pooled:
        return []
    out = [
        "Pooled over the cells (secondary: per seed, the mean of its differences over every cell, "
        "each cell "
        "weighted equally, then a paired t-interval over seeds; not part of the Holm family "
        "above):",
        "",
    ]
    for key, d in pooled.items():
        over = "; ".join(
            f"{k} ∈ {{{', '.join(map(str, v))}}}" for k, v in d.get("over", {}).items()
        )
        head = (
            f"- {key} over {d['cells']} cells ({over})"
            if over
            else f"- {key} over {d['cells']} cells"
        )
        left = []
        if d.get("not_in_every_cell"):
            left.append(f"seed(s) {', '.join(map(str, d['not_in_every_cell']))} not in every cell")
        if d.get("not_finite"):
            left.append(
                f"seed(s) {', '.join(map(str, d['not_finite']))} with a non-finite difference"
            )
        tail = f" Left out: {'; '.join(left)}." if left else ""
        if d["ci_low"] is None:
            out.append(f"{head}: {len(d['seeds'])} usable seed(s), no interval.{tail}")
            continue
        out.append(
            f"{head}, seeds {', '.join(map(str, d['seeds']))}: {d['mean']:+.2f} pp, 95% CI "
            f"[{d['ci_low']:+.2f}, {d['ci_high']:+.2f}], p = {_p(d['p_value'])}.{tail}"
        )
    return out + [""]


def mechanism_table(summary: Dict[str, Any]) -> List[str]:
    """Paired differences (norm − BN, same seed) of the mechanism metrics, with 95% CIs."""
    mech = summary.get("mechanism", {})
    if not mech:
        return []
    lines = [
        "| comparison | metric | BN | other | paired difference | 95% CI | p | p (Holm) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labels = dict(MECHANISM_METRICS)
    for key, metrics in mech.items():
        for metric, d in metrics.items():
            ci = "–" if d["ci_low"] is None else f"[{d['ci_low']:+.4g}, {d['ci_high']:+.4g}]"
            lines.append(
                f"| {key} | {labels[metric]} | {d['bn']:.4g} | {d['l2']:.4g} | {d['mean']:+.4g} | "
                f"{ci} | {_p(d.get('p_value'))} | {_p(d.get('p_holm'))} |"
            )
    k = max(
        (d.get("family_size", 0) for metrics in mech.values() for d in metrics.values()), default=0
    )
    if k > 1:
        lines += [
            "",
            f"*p (Holm): adjusted for the {k} rows of this table that have a p-value (every "
            f"metric of every "
            "comparison, so stricter than adjusting over the three claims below alone).*",
        ]
    return lines


def mechanism_claims(summary: Dict[str, Any]) -> List[str]:
    """Whether the paper's claims (higher compactness, larger centroid angles and Fisher ratio
    with L2BN) hold, judged by the paired 95% interval."""
    out = []
    for key, metrics in summary.get("mechanism", {}).items():
        for metric, what in (
            ("compactness", "intra-class compactness"),
            ("discrepancy_mean_deg", "inter-class discrepancy"),
            ("fisher_ratio", "Fisher ratio"),
        ):
            d = metrics.get(metric)
            if d is None:
                continue
            if d["ci_low"] is None:
                verdict_ = "cannot be judged (fewer than 2 paired seeds)"
            elif d["ci_low"] > 0 or d["ci_high"] < 0:
                side = "higher" if d["ci_low"] > 0 else "lower"
                effect = "supports" if d["ci_low"] > 0 else "contradicts"
                verdict_ = (
                    f"is {side} (95% CI excludes 0): {effect} the paper's claim"
                    if _survives(d)
                    else f"is {side} without correction (95% CI excludes 0): {effect} the paper's "
                    f"claim only weakly"
                )
            else:
                verdict_ = "does not differ significantly: does not settle the claim"
            caveat = (
                _holm_caveat(d, "rows of the mechanism table")
                if d["ci_low"] is not None and (d["ci_low"] > 0 or d["ci_high"] < 0)
                else ""
            )
            out.append(
                f"- {key}: {what} {verdict_} ({d['mean']:+.4g}, p = "
                f"{_p(d.get('p_value'))}){caveat}."
            )
    return out
