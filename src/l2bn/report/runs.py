"""Loading finished runs and summarising them: cells (model × norm × grid-axis values), paired
differences against BN with t-intervals, p-values and power, and the same for the mechanism
metrics of ``analysis.json``.

A *grid axis* is any recipe key that differs between the runs given, other than the model,
norm and seed (e.g. ``batch_size`` in a batch-size sweep); it is found from the runs' saved
configs, so ``l2bn report`` over any set of runs groups them the way ``l2bn compare`` made them.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..factory import canonical_norm
from ..io import JSONFileError, UsageError, read_json
from .stats import holm, mean_std, paired_difference

__all__ = [
    "ReportError",
    "load_runs",
    "summarize_runs",
    "grid_axes",
    "model_order",
    "MECHANISM_METRICS",
    "BASELINE",
]

BASELINE = "bn"
#: (key in the summary, label, how to read it from analysis.json)
MECHANISM_METRICS: Tuple[Tuple[str, str], ...] = (
    ("compactness", "intra-class compactness"),
    ("discrepancy_mean_deg", "mean centroid angle (deg)"),
    ("fisher_ratio", "Fisher ratio"),
    ("norm_cv", "norm CV (mean over layers)"),
    ("knn_accuracy", "k-NN accuracy (%)"),
)
_NOT_AXES = {"model", "norm", "seed"}
#: the order norms are listed in (others after these, in the order they came)
NORM_ORDER = {BASELINE: 0, "l2bn": 1, "l2bn-rms": 2}


class ReportError(UsageError, ValueError):
    """A run directory cannot be reported on (missing/corrupt result.json, unfinished run, ...)."""


def load_runs(
    run_dirs: Sequence[str], diverged: Optional[List[Dict[str, Any]]] = None
) -> List[Dict[str, Any]]:
    """Read ``result.json`` (and ``analysis.json`` if present) of each finished run directory.

    A run whose training diverged (``status: diverged``, written by ``l2bn train``) is an error,
    unless a list ``diverged`` is given: then it is appended there (``dir``, ``model``, ``norm``,
    ``seed``, ``recipe``, ``message``) and left out of the returned runs."""
    from ..train.config import TrainConfig

    runs = []
    for d in run_dirs:
        p = Path(d) / "result.json"
        if not p.is_file():
            raise ReportError(
                f"{d}: no result.json (is this a finished `l2bn train` run directory?)"
            )
        try:
            r = read_json(p, "run result")
            a = Path(d) / "analysis.json"
            analysis = read_json(a, "analysis") if a.is_file() else None
        except JSONFileError as e:
            raise ReportError(str(e)) from None
        if (
            diverged is not None
            and isinstance(r, dict)
            and r.get("status") == "diverged"
            and isinstance(r.get("config"), dict)
        ):
            cfg = TrainConfig.from_record(r["config"])
            diverged.append(
                {
                    "dir": str(Path(d)),
                    "model": cfg.model,
                    "norm": canonical_norm(cfg.norm),
                    "seed": cfg.seed,
                    "recipe": cfg.recipe(),
                    "message": str(r.get("message", "")).split(" The last good")[0],
                }
            )
            continue
        if not isinstance(r, dict) or r.get("status") != "complete":
            raise ReportError(
                f"{d}: run is not complete (status "
                f"{r.get('status') if isinstance(r, dict) else None!r})"
            )
        if not isinstance(r.get("config"), dict) or "test_acc" not in r:
            raise ReportError(f"{p}: not an l2bn result (no 'config'/'test_acc')")
        if not isinstance(r["test_acc"], (int, float)) or not r.get("history"):
            raise ReportError(
                f"{d}: the run trained no epoch (no test accuracy): nothing to report"
            )
        cfg = TrainConfig.from_record(r["config"])
        r["recipe"] = cfg.recipe()
        r["norm"] = canonical_norm(cfg.norm)
        r["dir"] = str(Path(d))
        if analysis is not None and analysis.get("norm_spread"):
            spread = analysis["norm_spread"]
            analysis["norm_cv"] = sum(s["cv"] for s in spread.values()) / len(spread)
        r["analysis"] = analysis
        runs.append(r)
    return runs


def grid_axes(runs: List[Dict[str, Any]]) -> List[str]:
    """Recipe keys (besides model, norm, seed) whose values differ between ``runs``."""
    keys = sorted({k for r in runs for k in r["recipe"]} - _NOT_AXES)
    return [k for k in keys if len({repr(r["recipe"].get(k)) for r in runs}) > 1]


def model_order(name: str) -> List[Any]:
    """Sort key that puts model names in natural order (``resnet8 < resnet20 < resnet56``), so a
    depth study reads shallow to deep whatever order its run directories were given in."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def _value_key(v: Any) -> Tuple[int, Any, str]:
    """Sort key for grid-axis values: numbers in numeric order, then the rest as text."""
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def _cell_key(model: str, norm: str, axes: Dict[str, Any]) -> str:
    return "/".join([model, norm] + [f"{k}={v}" for k, v in axes.items()])


def _adjust(family: List[Dict[str, Any]]) -> None:
    """Add ``p_holm`` (Holm-adjusted p-value over ``family``) and ``family_size`` to each entry.
    A comparison without a finite p-value (fewer than 2 seeds; a NaN metric of a diverged run) is
    not part of the family and gets ``None``."""
    ps = [d.get("p_value") for d in family]
    adjusted = holm([p if p is not None and math.isfinite(p) else None for p in ps])
    size = sum(p is not None for p in adjusted)
    for d, p in zip(family, adjusted):
        d["p_holm"], d["family_size"] = p, size


def summarize_runs(
    runs: List[Dict[str, Any]],
    rel_to: Optional[str] = None,
    diverged: Sequence[Dict[str, Any]] = (),
) -> Dict[str, Any]:
    """Per-cell statistics and paired differences against BN (paired by seed).

    Run directories are recorded relative to ``rel_to`` (the report's folder) when given.
    ``diverged`` runs (from :func:`load_runs`) take part in finding the grid axes and are listed
    under ``"diverged"`` with their cell's model, norm and axis values; the statistics are of the
    finished runs.
    """
    axes = grid_axes(runs + list(diverged))
    models = sorted(dict.fromkeys(r["config"]["model"] for r in runs), key=model_order)
    norms = list(dict.fromkeys(r["norm"] for r in runs))
    norms = sorted(
        norms, key=lambda n: NORM_ORDER.get(n, len(NORM_ORDER))
    )  # stable: others keep their order
    seeds = sorted({r["config"]["seed"] for r in runs})
    points = sorted(
        {tuple(r["recipe"].get(k) for k in axes) for r in runs},
        key=lambda pt: [_value_key(v) for v in pt],
    )

    def where(d: str) -> str:
        return os.path.relpath(d, rel_to) if rel_to else d

    cells: Dict[str, Any] = {}
    for m in models:
        for pt in points:
            ax = dict(zip(axes, pt))
            for n in norms:
                rs = sorted(
                    (
                        r
                        for r in runs
                        if r["config"]["model"] == m
                        and r["norm"] == n
                        and all(r["recipe"].get(k) == v for k, v in ax.items())
                    ),
                    key=lambda r: r["config"]["seed"],
                )
                if not rs:
                    continue
                fm, fs = mean_std([r["test_acc"] for r in rs])
                bm, bs = mean_std([r["best_test_acc"] for r in rs])
                cells[_cell_key(m, n, ax)] = {
                    "model": m,
                    "norm": n,
                    "axes": ax,
                    "n": len(rs),
                    "final_mean": fm,
                    "final_std": fs,
                    "best_mean": bm,
                    "best_std": bs,
                    "runs": [
                        {
                            "seed": r["config"]["seed"],
                            "test_acc": r["test_acc"],
                            "best_test_acc": r["best_test_acc"],
                            "wall_time_s": r["wall_time_s"],
                            "final_train_loss": r.get("final_train_loss"),
                            **({"val_acc": r["val_acc"]} if "val_acc" in r else {}),
                            "dir": where(r["dir"]),
                            **(
                                {
                                    "best_per_group_acc": r["best_per_group_acc"],
                                    "per_group_acc": r["per_group_acc"],
                                }
                                if "per_group_acc" in r
                                else {}
                            ),
                        }
                        for r in rs
                    ],
                    "_runs": rs,
                }
    diffs: Dict[str, Any] = {}
    mech: Dict[str, Any] = {}
    for key, cell in cells.items():
        if cell["norm"] == BASELINE:
            continue
        base = cells.get(_cell_key(cell["model"], BASELINE, cell["axes"]))
        if base is None:
            continue
        a = {r["config"]["seed"]: r for r in cell["_runs"]}
        b = {r["config"]["seed"]: r for r in base["_runs"]}
        common = sorted(set(a) & set(b))
        dkey = f"{key}-{BASELINE}"
        diffs[dkey] = {
            "model": cell["model"],
            "norm": cell["norm"],
            "axes": cell["axes"],
            "seeds": common,
            **paired_difference(
                [a[s]["test_acc"] for s in common], [b[s]["test_acc"] for s in common]
            ),
        }
        both = [s for s in common if a[s]["analysis"] and b[s]["analysis"]]
        if both:
            mech[dkey] = {}
            for metric, _ in MECHANISM_METRICS:
                if all(metric in a[s]["analysis"] and metric in b[s]["analysis"] for s in both):
                    mech[dkey][metric] = {
                        "seeds": both,
                        "l2": mean_std([a[s]["analysis"][metric] for s in both])[0],
                        "bn": mean_std([b[s]["analysis"][metric] for s in both])[0],
                        **paired_difference(
                            [a[s]["analysis"][metric] for s in both],
                            [b[s]["analysis"][metric] for s in both],
                        ),
                    }
    for cell in cells.values():
        cell.pop("_runs")
    pooled = _pool(diffs)
    # Holm's correction within each family: the accuracy comparisons of this report, and the
    # rows of its mechanism table (every metric of every comparison)
    _adjust(list(diffs.values()))
    _adjust([d for metrics in mech.values() for d in metrics.values()])
    return {
        "cells": cells,
        "differences": diffs,
        "pooled": pooled,
        "mechanism": mech,
        "axes": axes,
        "diverged": [
            {**{k: r[k] for k in ("model", "norm", "seed", "message")}, "dir": where(r["dir"])}
            | {"axes": {k: r["recipe"].get(k) for k in axes}}
            for r in diverged
        ],
        "models": models,
        "norms": norms,
        "seeds": seeds,
    }


def _pool(diffs: Dict[str, Any]) -> Dict[str, Any]:
    """Each norm − BN pooled over the cells of the report (grid-axis values, models): per seed,
    the mean of that seed's differences over every cell (each cell weighted equally), then the
    paired statistics of those means. Only seeds present in every cell count, and only seeds
    whose mean is finite (a diverged run's NaN is named, not averaged); only norms compared in
    two or more cells. ``over`` records what varied between the cells.

    A secondary summary ("on average over this study's settings"), not one of the per-cell
    comparisons, and not part of their Holm family.
    """
    out: Dict[str, Any] = {}
    by_norm: Dict[str, List[Dict[str, Any]]] = {}
    for d in diffs.values():
        by_norm.setdefault(d["norm"], []).append(d)
    for norm, ds in by_norm.items():
        if len(ds) < 2:
            continue
        per_seed = [dict(zip(d["seeds"], d["diffs"])) for d in ds]
        every = set.intersection(*(set(p) for p in per_seed))
        means = {s: sum(p[s] for p in per_seed) / len(per_seed) for s in sorted(every)}
        used = [s for s, m in means.items() if math.isfinite(m)]
        over: Dict[str, List[Any]] = {}
        models = sorted({d["model"] for d in ds}, key=model_order)
        if len(models) > 1:
            over["model"] = models
        for k in sorted({k for d in ds for k in d["axes"]}):
            values = sorted({d["axes"].get(k) for d in ds}, key=_value_key)
            if len(values) > 1:
                over[k] = values
        out[f"{norm}-{BASELINE}"] = {
            "norm": norm,
            "cells": len(ds),
            "over": over,
            "seeds": used,
            "not_in_every_cell": sorted(set().union(*(set(p) for p in per_seed)) - every),
            "not_finite": [s for s in means if s not in used],
            **paired_difference([means[s] for s in used], [0.0] * len(used)),
        }
    return out
