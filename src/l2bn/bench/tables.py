"""Markdown tables of the benchmark results: layers, bandwidth, model rows."""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

from .layers import Row


def _gmean(xs: List[float]) -> float:
    return math.exp(sum(math.log(v) for v in xs) / len(xs)) if xs else float("nan")


def _cell(row: Row, phase: str, key: str) -> str:
    m, lo, hi = (getattr(row, f"ratio_{s}")[phase][key] for s in ("median", "q25", "q75"))
    return f"{m:.2f} ({lo:.2f}-{hi:.2f})"


def format_table(rows: List[Row], title: str) -> str:
    """A markdown table: times in ms, ratios to BN (compiled ones to compiled BN) as the median
    and 25th-75th percentile over rounds; the last line the geometric mean of the medians."""
    has_c = any("bn+compile" in r.train_ms for r in rows)
    cols = [("train", "naive", "naive/BN"), ("train", "l2bn", "L2BN/BN")]
    if has_c:
        cols += [("train", "naive+compile", "naive_c/BNc"), ("train", "l2bn+compile", "L2BN_c/BNc")]
    cols += [("eval", "naive", "naive/BN eval"), ("eval", "l2bn", "L2BN/BN eval")]
    head = ["shape", "BN fwd+bwd ms"] + [c[2] for c in cols[:2]]
    if has_c:
        head += ["BNc ms"] + [c[2] for c in cols[2:4]]
    head += ["BN eval ms"] + [c[2] for c in cols[-2:]] + ["saved L2BN/BN", "saved naive/BN"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r.name} {'x'.join(map(str, r.shape))}", f"{r.train_ms['bn']:.2f}"] + [
            _cell(r, *c[:2]) for c in cols[:2]
        ]
        if has_c:
            cells += [f"{r.train_ms['bn+compile']:.2f}"] + [_cell(r, *c[:2]) for c in cols[2:4]]
        cells += [f"{r.eval_ms['bn']:.3f}"] + [_cell(r, *c[:2]) for c in cols[-2:]]
        cells += [
            f"{r.saved['l2bn'] / r.saved['bn']:.2f}",
            f"{r.saved['naive'] / r.saved['bn']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")

    def gm(phase: str, key: str) -> str:
        return f"**{_gmean([r.ratio_median[phase][key] for r in rows]):.2f}**"

    foot = ["**geomean of medians**", ""] + [gm(*c[:2]) for c in cols[:2]]
    if has_c:
        foot += [""] + [gm(*c[:2]) for c in cols[2:4]]
    foot += [""] + [gm(*c[:2]) for c in cols[-2:]]
    foot += [
        f"**{_gmean([r.saved[v] / r.saved['bn'] for r in rows]):.3f}**" for v in ("l2bn", "naive")
    ]
    lines.append("| " + " | ".join(foot) + " |")
    return "\n".join(lines)


def format_bandwidth(rows: List[Row]) -> str:
    """Achieved bandwidth of fwd+bwd (BN's minimum traffic / time) against ``y.copy_(x)``."""
    rows = [r for r in rows if r.gbps]
    if not rows:
        return ""
    lines = [
        "| shape | MB | copy GB/s | BN GB/s | L2BN GB/s | BN/copy | L2BN/copy |",
        "|" + "---|" * 7,
    ]
    for r in rows:
        lines.append(
            f"| {r.name} {'x'.join(map(str, r.shape))} | {r.nbytes / 1e6:.0f} | "
            f"{r.gbps['copy']:.0f} | {r.gbps['bn']:.0f} | "
            f"{r.gbps['l2bn']:.0f} | {_cell(r, 'bandwidth', 'bn')} | "
            f"{_cell(r, 'bandwidth', 'l2bn')} |"
        )
    return "\n".join(lines)


def format_models(results: List[Tuple[str, int, Dict[str, object]]]) -> str:
    """Rows ``(label, batch, phase result)`` as a markdown table."""
    lines = [
        "| model | batch | BN ms | L2BN ms | L2BN/BN (25th-75th pct) |",
        "|---|---|---|---|---|",
    ]
    for label, batch, r in results:
        lines.append(
            f"| {label} | {batch} | {r['bn_s'] * 1e3:.1f} | {r['l2bn_s'] * 1e3:.1f} | "  # type: ignore[operator]
            f"**{r['ratio_median']:.3f}** ({r['ratio_q25']:.3f}-{r['ratio_q75']:.3f}) |"
        )
    return "\n".join(lines)
