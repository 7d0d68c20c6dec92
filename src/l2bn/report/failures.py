"""Failed runs: a definition fixed before the runs it judges, counts per norm with Fisher's exact
test against BN, and accuracy with and without the failed runs.

A run that trains "normally" and one that gets stuck (a deep net whose loss plateaus high in a
short budget) are different outcomes; a mean over seeds mixes them. The rule below separates
them relative to the other runs of the same cell, so it needs no absolute threshold per dataset
or model.
"""

from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional

__all__ = ["FAILURE_RULE", "LOSS_FACTOR", "ACC_GAP", "MIN_RUNS", "judge_cell", "failure_summary"]

#: a failed run's final training loss exceeds this multiple of the others' median
LOSS_FACTOR = 1.3
#: or its test accuracy is more than this many points below the others' median
ACC_GAP = 3.0
#: cells with fewer runs are not judged (the median of 2 others is no reference)
MIN_RUNS = 4

FAILURE_RULE = (
    f"A run *failed* when its final training loss is above {LOSS_FACTOR}x the median final "
    f"training loss of the other runs of its cell (same model, norm and grid point), or its "
    f"test accuracy (last epoch) is more than {ACC_GAP:g} points below their median; a run "
    f"that diverged (non-finite loss) failed. Cells of fewer than {MIN_RUNS} runs are not judged."
)


def judge_cell(runs: List[Dict[str, Any]]) -> List[Optional[str]]:
    """For each run of one cell (dicts with ``final_train_loss`` and ``test_acc``; ``None``
    values for a diverged run), why it failed (``"diverged"``, ``"loss 0.42 > 1.3x 0.27"``,
    ``"acc 84.8 < 89.6 - 3"``) or ``None`` when it did not; all ``None`` below :data:`MIN_RUNS`
    finished runs, except diverged ones.

    >>> cell = [{"final_train_loss": l, "test_acc": a} for l, a in
    ...         [(0.27, 89.7), (0.26, 89.9), (0.28, 89.4), (0.42, 84.8)]]
    >>> judge_cell(cell)
    [None, None, None, 'loss 0.42 > 1.3x 0.27; acc 84.80 < 89.70 - 3']
    """
    ok = [r for r in runs if r.get("test_acc") is not None and r.get("final_train_loss") is not None]
    out: List[Optional[str]] = []
    for r in runs:
        if r.get("test_acc") is None or r.get("final_train_loss") is None:
            out.append("diverged")
            continue
        others = [o for o in ok if o is not r]
        if len(others) + 1 < MIN_RUNS:
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


def _fisher(a_fail: int, a_n: int, b_fail: int, b_n: int) -> float:
    """Two-sided p-value of Fisher's exact test on the 2x2 table of failed/other runs."""
    from scipy.stats import fisher_exact

    return float(fisher_exact([[a_fail, a_n - a_fail], [b_fail, b_n - b_fail]])[1])


def failure_summary(
    cells: Dict[str, Dict[str, Any]], baseline: str = "bn"
) -> Dict[str, Any]:
    """Judge every cell of a report summary (:func:`l2bn.report.runs.summarize_runs`, whose run
    entries carry ``final_train_loss``; diverged runs have ``test_acc`` ``None``).

    Returns ``{"rule", "cells": {key: {failed, judged, n, acc with/without}},
    "comparisons": {key: {norm, model, axes, failed, n, bn_failed, bn_n, p_fisher}}}`` and marks
    each run entry with ``failed`` (the reason, or ``None``).
    """
    from .stats import mean_std

    out: Dict[str, Any] = {"rule": FAILURE_RULE, "cells": {}, "comparisons": {}}
    for key, cell in cells.items():
        reasons = judge_cell(cell["runs"])
        for r, why in zip(cell["runs"], reasons):
            r["failed"] = why
        kept = [r["test_acc"] for r, why in zip(cell["runs"], reasons) if why is None]
        finished = [r["test_acc"] for r in cell["runs"] if r["test_acc"] is not None]
        out["cells"][key] = {
            "model": cell["model"],
            "norm": cell["norm"],
            "axes": cell["axes"],
            "n": len(cell["runs"]),
            "judged": len(cell["runs"]) >= MIN_RUNS,
            "failed": sum(why is not None for why in reasons),
            "acc_all": mean_std(finished),
            "acc_without_failed": mean_std(kept),
        }
    for key, c in out["cells"].items():
        if c["norm"] == baseline:
            continue
        base = next(
            (
                b
                for b in out["cells"].values()
                if b["norm"] == baseline and b["model"] == c["model"] and b["axes"] == c["axes"]
            ),
            None,
        )
        if base is None or not (c["judged"] and base["judged"]):
            continue
        out["comparisons"][key] = {
            "model": c["model"],
            "norm": c["norm"],
            "axes": c["axes"],
            "failed": c["failed"],
            "n": c["n"],
            "bn_failed": base["failed"],
            "bn_n": base["n"],
            "p_fisher": _fisher(c["failed"], c["n"], base["failed"], base["n"]),
        }
    return out
