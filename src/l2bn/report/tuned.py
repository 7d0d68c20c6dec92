"""Each norm at its own best setting: along one grid axis (the learning rate), choose per norm
the value with the highest mean held-out accuracy (``val_acc``, from ``--val-size``), then compare
the test accuracy of the choices, paired by seed.

A method is often better or worse than the baseline only away from the baseline's tuned point;
comparing every norm at BN's setting favours BN. The choice reads held-out training examples
only, never the test set, so the test accuracies of the choices are unbiased estimates.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from .stats import mean_std, paired_difference

__all__ = ["tuned_comparison", "tuned_lines", "TUNED_RULE"]

TUNED_RULE = (
    "For each model and norm, the value of `{axis}` with the highest mean held-out accuracy "
    "(val_acc: {held} training images the runs never trained on, the next ones after the "
    "training subset in the same class-balanced order, the same for every run; `--val-size`) "
    "is chosen; a value at which a run "
    "diverged is not eligible. The test accuracies at the chosen values are then compared, "
    "paired by seed (test accuracy plays no part in the choice)."
)


def _others(axes: Dict[str, Any], axis: str) -> Dict[str, Any]:
    return {k: v for k, v in axes.items() if k != axis}


def tuned_comparison(
    summary: Dict[str, Any], axis: str, baseline: str = "bn", held_out: Optional[int] = None
) -> Optional[Dict[str, Any]]:
    """The choice per model, norm (and other axes' values) along ``axis``, and each norm's paired
    test-accuracy difference against the baseline at their own choices; ``None`` when the runs
    carry no ``val_acc``.

    Returns ``{"axis", "rule", "choices": {key: {model, norm, others, value, edge, val_mean,
    val_std, test_mean, test_std, n, by_value}}, "differences": {key: {..., paired
    difference}}}``, where ``by_value`` lists every candidate
    ``(value, val mean, test mean, n, eligible)``;
    ``edge`` is ``"largest"``/``"smallest"`` when the choice is the grid's last/first eligible
    value (of at least 3): the best may then lie outside the grid, and the comparison at that
    norm's own best understates it. ``held_out`` (the runs' ``val_size``) goes into the rule's
    wording.
    """
    cells = [c for c in summary["cells"].values() if axis in c["axes"]]
    if not cells or not all("val_acc" in r for c in cells for r in c["runs"]):
        return None
    bad = {
        (d["model"], d["norm"], repr(sorted(d["axes"].items())))
        for d in summary.get("diverged", [])
    }
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for c in cells:
        others = _others(c["axes"], axis)
        key = "/".join([c["model"], c["norm"]] + [f"{k}={v}" for k, v in others.items()])
        groups.setdefault(key, []).append(c)
    choices: Dict[str, Any] = {}
    for key, cs in groups.items():
        cands = []
        for c in cs:
            vm, _ = mean_std([r["val_acc"] for r in c["runs"]])
            tm, _ = mean_std([r["test_acc"] for r in c["runs"]])
            ok = (c["model"], c["norm"], repr(sorted(c["axes"].items()))) not in bad
            cands.append((c, vm, tm, ok))
        eligible = [x for x in cands if x[3]]
        if not eligible:
            continue
        best, vm, _, _ = max(eligible, key=lambda x: x[1])
        tried = sorted(x[0]["axes"][axis] for x in eligible)
        edge = None
        if len(tried) >= 3 and best["axes"][axis] in (tried[0], tried[-1]):
            edge = "largest" if best["axes"][axis] == tried[-1] else "smallest"
        choices[key] = {
            "model": best["model"],
            "norm": best["norm"],
            "others": _others(best["axes"], axis),
            "value": best["axes"][axis],
            "edge": edge,
            "val_mean": vm,
            "val_std": mean_std([r["val_acc"] for r in best["runs"]])[1],
            "test_mean": best["final_mean"],
            "test_std": best["final_std"],
            "n": best["n"],
            "by_value": [
                (c["axes"][axis], v, t, c["n"], ok)
                for c, v, t, ok in sorted(cands, key=lambda x: x[0]["axes"][axis])
            ],
            "_runs": {r["seed"]: r["test_acc"] for r in best["runs"]},
        }
    diffs: Dict[str, Any] = {}
    for key, ch in choices.items():
        if ch["norm"] == baseline:
            continue
        base = next(
            (
                b
                for b in choices.values()
                if b["norm"] == baseline
                and b["model"] == ch["model"]
                and b["others"] == ch["others"]
            ),
            None,
        )
        if base is None:
            continue
        seeds = sorted(set(ch["_runs"]) & set(base["_runs"]))
        diffs[f"{key}@best-{baseline}@best"] = {
            "model": ch["model"],
            "norm": ch["norm"],
            "others": ch["others"],
            "value": ch["value"],
            "bn_value": base["value"],
            "seeds": seeds,
            **paired_difference([ch["_runs"][s] for s in seeds], [base["_runs"][s] for s in seeds]),
        }
    for ch in choices.values():
        ch.pop("_runs")
    return {
        "axis": axis,
        "rule": TUNED_RULE.format(axis=axis, held=f"{held_out:,}" if held_out else "the"),
        "choices": choices,
        "differences": diffs,
    }


def _pm(m: Optional[float], s: Optional[float]) -> str:
    return "–" if m is None else (f"{m:.2f}" if s is None else f"{m:.2f} ± {s:.2f}")


def tuned_lines(tuned: Dict[str, Any], figure: Optional[str] = None) -> List[str]:
    """The report's section: the candidates per norm (held-out and test accuracy per value),
    the choices, and each norm at its choice against BN at its own."""
    from .markdown import mean_ci

    axis = tuned["axis"]
    lines = [
        f"## Each norm at its own best `{axis}`",
        "",
        f"*{tuned['rule']}*",
        "",
    ]
    values: Sequence[Any] = sorted(
        {v for ch in tuned["choices"].values() for v, *_ in ch["by_value"]}
    )
    head = ["model/norm", "accuracy"] + [f"{axis}={v}" for v in values] + [f"chosen {axis}"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, ch in tuned["choices"].items():
        by = {v: (vm, tm, ok) for v, vm, tm, _, ok in ch["by_value"]}
        for label, i in (("held-out (mean)", 0), ("test (mean)", 1)):
            cells = []
            for v in values:
                if v not in by:
                    cells.append("–")
                elif not by[v][2]:
                    cells.append("diverged")
                else:
                    x = f"{by[v][i]:.2f}"
                    cells.append(f"**{x}**" if v == ch["value"] and i == 0 else x)
            lines.append(
                "| " + " | ".join([key, label, *cells, str(ch["value"]) if i == 0 else ""]) + " |"
            )
    lines += [
        "",
        "| comparison | chosen | BN's choice | paired seeds | mean difference (pp) | 95% CI (t) | "
        "p (paired t) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, d in tuned["differences"].items():
        mean, ci = mean_ci(d)
        p = "–" if d.get("p_value") is None else f"{d['p_value']:.3f}"
        lines.append(
            f"| {key} | {axis}={d['value']} | {axis}={d['bn_value']} | {d['n']} | {mean} | {ci} | "
            f"{p} |"
        )
    for key, ch in tuned["choices"].items():
        if ch.get("edge"):
            lines += [
                "",
                f"- {key}: the chosen {axis} = {ch['value']} is the {ch['edge']} value tried, so "
                f"its best may lie outside the grid and its accuracy at its own best be "
                f"underestimated (extend the grid with `--grid {axis}=...` to find out).",
            ]
    if figure:
        lines += [
            "",
            f"![accuracy against {axis}]({figure})",
            "",
            f"*Test (left) and held-out (right) accuracy against `{axis}`: mean and 95% t-interval "
            f"over seeds; rings mark each norm's choice. Look for: how wide each norm's good range "
            f"is, and whether the best points differ by more than the intervals.*",
        ]
    return lines + [""]
