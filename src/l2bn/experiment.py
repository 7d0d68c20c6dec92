"""Experiments: train → analyze → report over a grid of models × norms × seeds × any config axis.

Each run lives in ``OUT/<model>-<norm>[-<key>=<value>...]-seed<k>/``. A run whose
``result.json`` says ``complete`` for the same recipe (:meth:`TrainConfig.recipe`) is not
trained again and an unfinished one is resumed from its ``last.pt``, so a sweep can be stopped
at any point and continued later with the same command. A run another process is training (its
directory's lock, :mod:`l2bn.train.lock`) is skipped, so the same command started twice shares
the grid's runs instead of training any twice. Runs are ordered seed-major (every cell
gets seeds 0, 1, … before the next seed), so a stopped sweep has balanced cells.

The summary (``summary.json``, ``report.md``, ``report.html``) gives per-seed accuracy, mean ±
std per cell, and for each norm the paired difference against BN per model and grid point with a
95% t-interval, the paired t-test's p-value and power; with ``analyze`` every run is probed
(``analysis.json``) and the report gains the mechanism section with paired CIs.

Why one file: planning a grid, training its runs (locks, resume, skips), analysing them and
writing the report are the steps of one command, and they share the run-directory naming.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .io import UsageError, read_json
from .report.failures import FAILURE_RULE
from .train.config import (
    TrainConfig,
    check_config,
    check_keys,
    check_value,
    conflict_message,
    field_type,
    load_config,
    recipe_conflicts,
    saved_config,
)
from .train.lock import RunDirBusy, lock_owner, run_lock

__all__ = [
    "PRESETS",
    "COMPARE_SKIP",
    "compare",
    "plan_compare",
    "plan_runs",
    "parse_grid",
    "run_dir",
    "ExperimentError",
]

#: recipe fields that ``compare`` sets itself (axes, directories) or that mean nothing there
COMPARE_SKIP = ("model", "norm", "seed", "out", "dataset", "data_dir", "resume", "test_only")

#: The main job's recipe (ResNet-8 on 20,000 Fashion-MNIST images, 5 epochs), shared by the
#: presets that vary one axis of it (batch size, depth).
MAIN_JOB_RECIPE: Dict[str, Any] = dict(
    epochs=5,
    batch_size=128,
    train_subset=20000,
    lr=0.1,
    weight_decay=5e-4,
    schedule="cosine",
    warmup_epochs=0.5,
)

# The main job: Fashion-MNIST, a small CIFAR-style ResNet, 3 seeds per norm, < 10 min on 2 CPU
# cores.
PRESETS: Dict[str, Dict[str, Any]] = {
    "quick": dict(
        dataset="fashion-mnist",
        models=["resnet8"],
        norms=["bn", "l2bn"],
        seeds=[0, 1, 2],
        grid={},
        note="Preset 'quick': chosen so that the default comparison fits in 10 minutes on 2 CPU "
        "cores.",
        train={**MAIN_JOB_RECIPE, "width": 1},
    ),
    "paper": dict(
        dataset="fashion-mnist",
        models=["resnet20"],
        norms=["bn", "l2bn", "l2bn-rms"],
        seeds=[0, 1, 2, 3, 4],
        grid={},
        note="Preset 'paper': ResNet-20 on all 60,000 Fashion-MNIST images, 20 epochs, "
        "three norms.",
        train=dict(
            epochs=20, batch_size=128, lr=0.1, weight_decay=5e-4, schedule="cosine", warmup_epochs=1
        ),
    ),
    "batch-size": dict(
        dataset="fashion-mnist",
        models=["resnet8"],
        norms=["bn", "l2bn", "l2bn-rms"],
        seeds=[0, 1, 2, 3, 4],
        grid={"batch_size": [16, 32, 64, 128]},
        note="Preset 'batch-size': the main job's ResNet-8 setting at batch 16-128, learning rate "
        "scaled linearly "
        "from 0.1 at batch 128 (lr_ref_batch=128).",
        train={**MAIN_JOB_RECIPE, "lr_ref_batch": 128},
    ),
    "depth": dict(
        dataset="fashion-mnist",
        models=["resnet8", "resnet20", "resnet56"],
        norms=["bn", "l2bn", "l2bn-rms"],
        seeds=[0, 1, 2, 3, 4],
        grid={},
        note="Preset 'depth': ResNet-8/20/56 at the main job's budget, three norms.",
        train=dict(MAIN_JOB_RECIPE),
    ),
    "lr": dict(
        dataset="fashion-mnist",
        models=["resnet8"],
        norms=["bn", "l2bn", "l2bn-rms"],
        seeds=[0, 1, 2, 3, 4],
        # 1.6 brackets the L2BN variants' best: with 0.8 the largest value, their held-out
        # accuracy was still rising there (seeds 0-1), so "each at its own best" was not yet fair
        grid={"lr": [0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6]},
        analyze=False,
        note="Preset 'lr': the main job's ResNet-8 recipe (the same 20,000 training images) at "
        "peak learning rates 0.025-1.6, three norms. Each run also scores 10,000 other "
        "Fashion-MNIST training images it never trains on (val_size=10000: the next examples "
        "of the same class-balanced order, identical for every run); each norm's best learning "
        "rate is the one with the highest mean accuracy on them (test accuracy plays no part "
        "in the choice). The test set is scored after the last epoch only (eval_every=5).",
        train={**MAIN_JOB_RECIPE, "val_size": 10000, "eval_every": 5},
    ),
    "stability": dict(
        dataset="fashion-mnist",
        models=["resnet56"],
        norms=["bn", "l2bn"],
        seeds=list(range(16)),
        grid={},
        note="Preset 'stability': ResNet-56 at the main job's budget (the depth study's recipe: "
        "its runs are reused), BN and L2BN, 16 seeds each, counting failed runs. " + FAILURE_RULE,
        train=dict(MAIN_JOB_RECIPE),
    ),
}


class ExperimentError(UsageError, ValueError):
    """A grid or run directory that cannot be used (bad axis, a directory of another recipe)."""


def parse_grid(items: Sequence[str]) -> Dict[str, List[Any]]:
    """``["batch_size=16,32", "lr=0.1,0.05"]`` → ``{"batch_size": [16, 32], "lr": [0.1, 0.05]}``,
    each value converted to the config field's type.

    Example:
        >>> parse_grid(["batch_size=16,32", "mixup=0,0.4"])
        {'batch_size': [16, 32], 'mixup': [0.0, 0.4]}
    """
    grid: Dict[str, List[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ExperimentError(
                f"--grid {item!r}: expected KEY=V1,V2,... (e.g. batch_size=16,32,64)"
            )
        key, vals = item.split("=", 1)
        key = key.strip().replace("-", "_")
        check_keys({key: None}, "--grid")
        if key in ("model", "norm", "seed"):
            raise ExperimentError(f"--grid {key}: use --models/--norms/--seeds for that axis")
        words = {"true": True, "false": False} if field_type(key)[0] is bool else {}
        grid[key] = [
            check_value(key, words.get(v.strip().lower(), v.strip()), f"--grid {key}")
            for v in vals.split(",")
            if v.strip()
        ]
        if not grid[key]:
            raise ExperimentError(f"--grid {item!r}: no values")
    return grid


def plan_compare(
    preset: str = "quick",
    config: Optional[str] = None,
    overrides: Optional[Dict[str, Any]] = None,
    grid: Sequence[str] = (),
    *,
    models: Optional[Sequence[str]] = None,
    norms: Optional[Sequence[str]] = None,
    seeds: Optional[Sequence[int]] = None,
    dataset: Optional[str] = None,
    out: Optional[str] = None,
) -> Dict[str, Any]:
    """What ``l2bn compare`` runs, from its sources in increasing precedence: the preset, then
    the YAML recipe ``config`` (its ``grid:`` mapping too), then the flags (``overrides`` of
    recipe fields, ``grid`` items ``KEY=V1,V2``, and the axes ``models``/``norms``/``seeds``).

    A recipe that names a model is compared on that model; one that names a norm other than BN
    is compared against BN. Returns the keyword arguments of :func:`compare` (``out``,
    ``models``, ``norms``, ``seeds``, ``dataset``, ``train_kw``, ``grid``, ``note``) and
    ``analyze``, the preset's default for probing every run.

    Example:
        >>> p = plan_compare("quick", overrides={"epochs": 2}, grid=["batch_size=64,128"])
        >>> p["models"], p["norms"], p["train_kw"]["epochs"], p["grid"], p["out"]
        (['resnet8'], ['bn', 'l2bn'], 2, {'batch_size': [64, 128]}, 'runs/compare-fashion-mnist')
    """
    chosen = PRESETS[preset]
    train_kw: Dict[str, Any] = dict(chosen["train"])
    axes = dict(chosen["grid"])
    if config:
        from_file = load_config(config, extra_keys=("grid",))
        file_grid = from_file.pop("grid", None) or {}
        axes.update(parse_grid([f"{k}={','.join(map(str, v))}" for k, v in file_grid.items()]))
        train_kw.update(from_file)
    train_kw.update({k: v for k, v in (overrides or {}).items() if k not in COMPARE_SKIP})
    axes.update(parse_grid(grid))
    dataset = dataset or train_kw.get("dataset") or chosen["dataset"]
    models = list(
        models or ([train_kw["model"]] if config and "model" in train_kw else chosen["models"])
    )
    cfg_norm = train_kw.get("norm") if config else None
    norms = list(norms or (["bn", cfg_norm] if cfg_norm and cfg_norm != "bn" else chosen["norms"]))
    seeds = list(seeds if seeds is not None else chosen["seeds"])
    for k in COMPARE_SKIP:
        train_kw.pop(k, None)
    out = out or (f"runs/compare-{dataset}" if preset == "quick" else f"runs/{preset}-{dataset}")
    note = chosen["note"] if not config else f"Recipe: {config}."
    return dict(
        analyze=chosen.get("analyze", True),
        out=out,
        models=models,
        norms=norms,
        seeds=seeds,
        dataset=dataset,
        train_kw=train_kw,
        grid=axes,
        note=note,
    )


def _fmt(v: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(v))


def run_dir(
    out: Path, model: str, norm: str, seed: int, point: Optional[Dict[str, Any]] = None
) -> Path:
    """The directory of one run: ``OUT/<model>-<norm>[-<key>=<value>...]-seed<k>``."""
    tag = "".join(f"-{k}={_fmt(v)}" for k, v in (point or {}).items())
    return Path(out) / f"{model}-{norm}{tag}-seed{seed}"


def plan_runs(
    out: str,
    models: Sequence[str],
    norms: Sequence[str],
    seeds: Sequence[int],
    dataset: str,
    train_overrides: Dict[str, Any],
    grid: Optional[Dict[str, List[Any]]] = None,
    data_dir: Optional[str] = None,
) -> List[Tuple[str, TrainConfig]]:
    """(label, config) of every run, seed-major: all cells get seed ``s`` before seed ``s+1``."""
    grid = grid or {}
    check_keys(train_overrides, "recipe")
    points = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())] if grid else [{}]
    plan = []
    for seed in seeds:
        for model in models:
            for point in points:
                for norm in norms:
                    d = run_dir(Path(out), model, norm, seed, point)
                    cfg = TrainConfig(
                        **{
                            **train_overrides,
                            **point,
                            "dataset": dataset,
                            "data_dir": data_dir,
                            "model": model,
                            "norm": norm,
                            "seed": seed,
                            "out": str(d),
                            "resume": True,
                        }
                    )
                    label = " ".join(
                        [model, norm, *(f"{k}={v}" for k, v in point.items()), f"seed {seed}"]
                    )
                    check_config(cfg, f"run {label}")  # the whole plan, before any training
                    plan.append((label, cfg))
    return plan


def _status(cfg: TrainConfig) -> str:
    """``done`` (finished with this recipe), ``resume`` (started) or ``new``; a directory holding
    another recipe raises :class:`ExperimentError`."""
    saved = saved_config(cfg.out)
    if saved is None:
        return "new"
    conflicts = recipe_conflicts(saved, cfg.recipe())
    if conflicts:
        raise ExperimentError(conflict_message(cfg.out, conflicts))
    res = Path(cfg.out) / "result.json"
    if res.is_file():
        try:
            r = read_json(res, "run result")
        except ValueError:
            return "resume"
        if r.get("status") == "complete" and r.get("epochs") == cfg.epochs:
            return "done"
        if r.get("status") == "diverged" and (r.get("config") or {}).get("epochs") == cfg.epochs:
            return "done"  # an outcome of the recipe: training it again diverges again
    return "resume"


def compare(
    out: str,
    models: Sequence[str],
    norms: Sequence[str],
    seeds: Sequence[int],
    dataset: str,
    train_overrides: Dict[str, Any],
    grid: Optional[Dict[str, List[Any]]] = None,
    data_dir: Optional[str] = None,
    note: str = "",
    analyze: bool = True,
    title: str = "",
) -> Dict[str, Any]:
    """Train every run of the grid not yet finished, analyse it, then write the report.

    Returns the summary (also written to ``OUT/summary.json``).
    """
    from .train import TrainingDiverged, train

    plan = plan_runs(out, models, norms, seeds, dataset, train_overrides, grid, data_dir)
    states = [_status(cfg) for _, cfg in plan]  # refuse a conflicting directory before any training
    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    n_done = sum(s == "done" for s in states)
    print(f"{len(plan)} runs ({n_done} finished earlier) -> {out_p}", flush=True)
    todo = [
        (i, label, cfg)
        for i, ((label, cfg), state) in enumerate(zip(plan, states))
        if state != "done"
    ]
    for _ in range(
        len(plan) + 1
    ):  # runs another process held are retried once it has let go of them
        skipped = []
        for i, label, cfg in todo:
            tag = f"[{i + 1}/{len(plan)}] {label}"
            try:
                with run_lock(cfg.out):  # held from the state check to the end of training
                    state = _status(
                        cfg
                    )  # another compare over the same grid may have finished it meanwhile
                    if state == "done":
                        print(f"{tag}: finished by another process", flush=True)
                        continue
                    print(
                        f"{tag}: {'resuming' if state == 'resume' else 'training'} -> {cfg.out}",
                        flush=True,
                    )
                    train(dataclasses.replace(cfg, resume=state == "resume"))
            except TrainingDiverged as e:  # a result of the grid (reported as such), not an error
                print(f"{tag}: diverged: {str(e).splitlines()[0]}", flush=True)
            except RunDirBusy as e:
                print(f"{tag}: skipped, {e}", flush=True)
                skipped.append((i, label, cfg))
        todo = [t for t in skipped if lock_owner(t[2].out) is None and _status(t[2]) != "done"]
        if not todo:
            break
    owner = lock_owner(out_p)
    if owner is not None:
        print(
            f"waiting for pid {owner.get('pid', '?')}, which is writing the report in {out_p}",
            flush=True,
        )
    with run_lock(
        out_p, wait=True
    ):  # one report writer at a time; the last one sees every finished run
        _analyze_and_report(plan, out_p, data_dir, analyze, title, note, t0)
        return read_json(out_p / "summary.json", "summary")


def _analysed(run: Path) -> bool:
    """``analysis.json`` describes the run's final model: written after its last checkpoint and of
    the epoch the run ended at (an analysis taken while the run was still training is redone), or
    a committed result kept without checkpoints."""
    a, ck = run / "analysis.json", run / "last.pt"
    if not a.is_file():
        return False
    if not ck.is_file():
        return True
    try:
        epoch = read_json(a, "analysis").get("epoch")
        epochs = read_json(run / "result.json", "run result").get("epochs")
    except (ValueError, OSError):
        return False
    return a.stat().st_mtime >= ck.stat().st_mtime and epoch == epochs


def _diverged(run: Path) -> bool:
    """The run's training diverged: an outcome the report lists, with nothing to analyse."""
    try:
        return read_json(run / "result.json", "run result").get("status") == "diverged"
    except (ValueError, OSError):
        return False


def _left_out(plan: List[Tuple[str, TrainConfig]]) -> Tuple[List[str], List[str]]:
    """The plan's unfinished runs (skipped: another process had them), as (still being trained
    by another process, stopped)."""
    left = [cfg.out for _, cfg in plan if _status(cfg) != "done"]
    training = [d for d in left if lock_owner(d) is not None]
    return training, [d for d in left if d not in training]


def _analyze_and_report(
    plan: List[Tuple[str, TrainConfig]],
    out_p: Path,
    data_dir: Optional[str],
    analyze: bool,
    title: str,
    note: str,
    t0: float,
) -> None:
    from .analysis.analyze import analyze_run
    from .report.build import build_report

    training, stopped = _left_out(plan)
    if training:
        print(
            f"{len(training)} run(s) left out of this report, still being trained by another "
            f"process: "
            f"{', '.join(training)}; run this command again when they finish to include them",
            flush=True,
        )
    if stopped:
        print(
            f"{len(stopped)} run(s) left out of this report, unfinished (the process that trained "
            f"them "
            f"stopped): {', '.join(stopped)}; run this command again to resume them",
            flush=True,
        )
    dirs = [cfg.out for _, cfg in plan if cfg.out not in training + stopped]
    if analyze:
        for i, d in enumerate(dirs):
            if _analysed(Path(d)) or _diverged(Path(d)):
                continue
            if not (
                Path(d) / "last.pt"
            ).is_file():  # a finished run kept without its checkpoint: nothing to analyse
                print(
                    f"[{i + 1}/{len(dirs)}] not analysed: {d} has a result but no checkpoint "
                    f"(last.pt) and "
                    f"no analysis.json; the report leaves it out of the mechanism section (delete "
                    f"the "
                    f"directory to retrain it)",
                    flush=True,
                )
                continue
            print(f"[{i + 1}/{len(dirs)}] analysing {d}", flush=True)
            analyze_run(d, data_dir=data_dir)
    build_report(
        dirs, str(out_p), title=title, note=note, extra={"compare_wall_time_s": time.time() - t0}
    )
