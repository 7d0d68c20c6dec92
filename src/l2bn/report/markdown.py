"""Markdown tables and verdict lines shared by the reports."""

from __future__ import annotations

from typing import Any, Dict, List

from .stats import fmt_pm


def accuracy_table(summary: Dict[str, Any]) -> List[str]:
    seeds = summary["seeds"]
    head = ["model", "norm"] + [f"seed {s}" for s in seeds] + ["final mean ± std", "best-epoch mean ± std", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in summary["cells"].values():
        by_seed = {r["seed"]: r["test_acc"] for r in cell["runs"]}
        row = [cell["model"], cell["norm"]] + [f"{by_seed[s]:.2f}" if s in by_seed else "–" for s in seeds]
        row += [fmt_pm(cell["final_mean"], cell["final_std"]), fmt_pm(cell["best_mean"], cell["best_std"]), str(cell["n"])]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def difference_table(summary: Dict[str, Any]) -> List[str]:
    lines = ["| comparison | paired seeds | mean difference (pp) | 95% CI (t) | note |", "|---|---|---|---|---|"]
    for key, d in summary["differences"].items():
        ci = "–" if d["ci_low"] is None else f"[{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"
        mean = "–" if d["mean"] is None else f"{d['mean']:+.2f}"
        lines.append(f"| {key} | {d['n']} | {mean} | {ci} | {d.get('note', '')} |")
    return lines


def verdict(summary: Dict[str, Any]) -> List[str]:
    out = []
    for key, d in summary["differences"].items():
        if d["ci_low"] is None:
            out.append(f"- {key}: not enough paired seeds to judge.")
        elif d["ci_low"] > 0:
            out.append(f"- {key}: L2BN better; the 95% interval excludes 0 ({d['mean']:+.2f} pp).")
        elif d["ci_high"] < 0:
            out.append(f"- {key}: L2BN worse; the 95% interval excludes 0 ({d['mean']:+.2f} pp).")
        else:
            out.append(f"- {key}: no significant difference at 95% ({d['mean']:+.2f} pp, interval contains 0); "
                       "the paper's claim of an improvement is not supported by this run.")
    return out
