"""Failed runs: a definition fixed before the runs it judges, counts per norm with Fisher's exact
test against BN, and accuracy with and without the failed runs.

A run that trains "normally" and one that gets stuck (a deep net whose loss plateaus high in a
short budget) are different outcomes; a mean over seeds mixes them. The rule below separates
them relative to the other runs of the same cell, so it needs no absolute threshold per dataset
or model.
"""

from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional, Sequence

__all__ = [
    "FAILURE_RULE",
    "LOSS_FACTOR",
    "ACC_GAP",
    "MIN_RUNS",
    "judge_cell",
    "failure_summary",
    "failure_lines",
    "run_table",
]

#: a failed run's final training loss exceeds this multiple of the others' median
LOSS_FACTOR = 1.3
#: or its test accuracy is more than this many points below the others' median
ACC_GAP = 3.0
#: cells with fewer runs are not judged (the median of 2 others is no reference)
MIN_RUNS = 4

FAILURE_RULE = (
    f"A run failed when its final training loss is above {LOSS_FACTOR}x the median final "
    f"training loss of the other runs of its cell (same model, norm and grid point), or its "
    f"test accuracy (last epoch) is more than {ACC_GAP:g} points below their median; a run "
    f"that diverged (non-finite loss) failed. Cells of fewer than {MIN_RUNS} finished runs are "
    f"not judged."
)


def judge_cell(runs: List[Dict[str, Any]]) -> List[Optional[str]]:
    """For each run of one cell (dicts with ``final_train_loss`` and ``test_acc``, or
    ``diverged: True``), why it failed (``"diverged"``, ``"loss 0.42 > 1.3x 0.27"``,
    ``"acc 84.8 < 89.6 - 3"``) or ``None`` when it did not. Below :data:`MIN_RUNS` finished runs
    only the diverged ones fail; a run missing either value is not judged.

    >>> cell = [{"final_train_loss": l, "test_acc": a} for l, a in
    ...         [(0.27, 89.7), (0.26, 89.9), (0.28, 89.4), (0.42, 84.8)]]
    >>> judge_cell(cell)
    [None, None, None, 'loss 0.42 > 1.3x 0.27; acc 84.80 < 89.70 - 3']
    """
    ok = [r for r in runs if _finished(r)]
    out: List[Optional[str]] = []
    for r in runs:
        if r.get("diverged"):
            out.append("diverged")
            continue
        others = [o for o in ok if o is not r]
        if not _finished(r) or len(others) + 1 < MIN_RUNS:
            out.append(None)
            continue
        loss_ref = statistics.median(o["final_train_loss"] for o in others)
        acc_ref = statistics.median(o["test_acc"] for o in others)
        why = []
        if r["final_train_loss"] > LOSS_FACTOR * loss_ref:
            why.append(f"loss {r['final_train_loss']:.3g} > {LOSS_FACTOR}x {loss_ref:.3g}")
        if r["test_acc"] < acc_ref - ACC_GAP:
            why.append(f"acc {r['test_acc']:.2f} < {acc_ref:.2f} - {ACC_GAP:g}")
        out.append("; ".join(why) or None)
    return out


def _finished(r: Dict[str, Any]) -> bool:
    return not r.get("diverged") and None not in (r.get("test_acc"), r.get("final_train_loss"))


def _fisher(a_fail: int, a_n: int, b_fail: int, b_n: int) -> float:
    """Two-sided p-value of Fisher's exact test on the 2x2 table of failed/other runs."""
    from scipy.stats import fisher_exact

    return float(fisher_exact([[a_fail, a_n - a_fail], [b_fail, b_n - b_fail]])[1])


def failure_summary(
    cells: Dict[str, Dict[str, Any]],
    diverged: Sequence[Dict[str, Any]] = (),
    baseline: str = "bn",
) -> Dict[str, Any]:
    """Judge every cell of a report summary (:func:`l2bn.report.runs.summarize_runs`): its run
    entries (``seed``, ``test_acc``, ``final_train_loss``) and the ``diverged`` runs of the same
    model, norm and axis values (which failed).

    Returns ``{"rule", "cells": {key: {model, norm, axes, n, judged, failed, runs, acc_all,
    acc_without_failed}}, "comparisons": {key: {..., failed, n, bn_failed, bn_n, p_fisher}}}``;
    ``runs`` lists ``(seed, test_acc, final_train_loss, why failed or None)`` per run.
    """
    from .stats import mean_std

    out: Dict[str, Any] = {"rule": FAILURE_RULE, "cells": {}, "comparisons": {}}
    groups: Dict[str, Dict[str, Any]] = {
        key: {**{k: c[k] for k in ("model", "norm", "axes")}, "runs": list(c["runs"])}
        for key, c in cells.items()
    }
    for dv in diverged:
        key = "/".join([dv["model"], dv["norm"]] + [f"{k}={v}" for k, v in dv["axes"].items()])
        g = groups.setdefault(
            key, {"model": dv["model"], "norm": dv["norm"], "axes": dv["axes"], "runs": []}
        )
        g["runs"].append(
            {"seed": dv["seed"], "test_acc": None, "final_train_loss": None, "diverged": True}
        )
    for key, g in groups.items():
        rs = sorted(g["runs"], key=lambda r: r["seed"])
        reasons = judge_cell(rs)
        kept = [r["test_acc"] for r, why in zip(rs, reasons) if why is None]
        finished = [r["test_acc"] for r in rs if r["test_acc"] is not None]
        out["cells"][key] = {
            **{k: g[k] for k in ("model", "norm", "axes")},
            "n": len(rs),
            "judged": sum(map(_finished, rs)) >= MIN_RUNS,
            "failed": sum(why is not None for why in reasons),
            "runs": [
                {
                    "seed": r["seed"],
                    "test_acc": r["test_acc"],
                    "final_train_loss": r.get("final_train_loss"),
                    "failed": why,
                }
                for r, why in zip(rs, reasons)
            ],
            "acc_all": mean_std(finished),
            "acc_without_failed": mean_std(kept),
        }
    for key, c in out["cells"].items():
        base = next(
            (
                b
                for b in out["cells"].values()
                if b["norm"] == baseline and b["model"] == c["model"] and b["axes"] == c["axes"]
            ),
            None,
        )
        if c["norm"] == baseline or base is None or not (c["judged"] and base["judged"]):
            continue
        out["comparisons"][key] = {
            **{k: c[k] for k in ("model", "norm", "axes", "failed", "n")},
            "bn_failed": base["failed"],
            "bn_n": base["n"],
            "p_fisher": _fisher(c["failed"], c["n"], base["failed"], base["n"]),
        }
    return out


def _pm(ms: Any) -> str:
    m, s = ms
    return "–" if m is None else (f"{m:.2f}" if s is None else f"{m:.2f} ± {s:.2f}")


def failure_lines(failures: Dict[str, Any], per_run: bool = True) -> List[str]:
    """The report's section: the rule, counts per cell with Fisher's exact test against BN,
    accuracy with and without the failed runs, and (``per_run``) every failed run with why."""
    cells = failures["cells"]
    if not any(c["judged"] for c in cells.values()):
        return []
    lines = [
        "## Failed runs",
        "",
        f"*Definition (`l2bn.report.failures`, the same for every report): {failures['rule']}*",
        "",
        "| cell | runs | failed | accuracy, all runs (mean ± std) | accuracy without failed |",
        "|---|---|---|---|---|",
    ]
    for key, c in cells.items():
        if c["judged"]:
            lines.append(
                f"| {key} | {c['n']} | {c['failed']} | {_pm(c['acc_all'])} | "
                f"{_pm(c['acc_without_failed'])} |"
            )
    comps = failures["comparisons"]
    if comps:
        lines += ["", "| comparison | failed | BN failed | p (Fisher's exact, two-sided) |"]
        lines += ["|---|---|---|---|"]
        for key, d in comps.items():
            lines.append(
                f"| {key} vs bn | {d['failed']}/{d['n']} | {d['bn_failed']}/{d['bn_n']} | "
                f"{d['p_fisher']:.3f} |"
            )
    bad = [(k, r) for k, c in cells.items() for r in c["runs"] if r["failed"]]
    if per_run and bad:
        lines += [
            "",
            "Failed runs: "
            + "; ".join(f"{k} seed {r['seed']} ({r['failed']})" for k, r in bad)
            + ".",
        ]
    elif not bad:
        lines += ["", "No run failed."]
    return lines + [""]


def run_table(failures: Dict[str, Any]) -> List[str]:
    """Every run of the judged cells: seed, final training loss, test accuracy, failed or not."""
    lines = [
        "| cell | seed | final train loss | test accuracy (%) | failed |",
        "|---|---|---|---|---|",
    ]
    for key, c in failures["cells"].items():
        if not c["judged"]:
            continue
        for r in c["runs"]:
            loss = "–" if r["final_train_loss"] is None else f"{r['final_train_loss']:.3f}"
            acc = "diverged" if r["test_acc"] is None else f"{r['test_acc']:.2f}"
            lines.append(f"| {key} | {r['seed']} | {loss} | {acc} | {r['failed'] or 'no'} |")
    return lines + [""]
