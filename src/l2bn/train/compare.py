"""BN vs L2BN over models x norms x seeds: run (skipping finished runs), then summarise.

Each run lives in ``OUT/<model>-<norm>-seed<k>/``; a run whose ``result.json`` says
``complete`` for the same recipe is not trained again, so an interrupted comparison restarts
where it stopped. The summary (``summary.json``, ``report.md``, ``curves.png``) gives per-seed
accuracy, mean ± std per cell, and the paired L2BN − BN difference per model with a 95%
t-interval over seeds.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .checkpoint import write_json
from .config import TrainConfig

# The main job: Fashion-MNIST, a small CIFAR-style ResNet, 3 seeds per norm, < 10 min on 2 CPU cores.
PRESETS: Dict[str, Dict[str, Any]] = {
    "quick": dict(
        dataset="fashion-mnist", models=["resnet8"], norms=["bn", "l2bn"], seeds=[0, 1, 2],
        train=dict(epochs=5, batch_size=128, train_subset=20000, lr=0.1, weight_decay=5e-4,
                   schedule="cosine", warmup_epochs=0.5, width=1, threads=0),
    ),
    "paper": dict(
        dataset="fashion-mnist", models=["resnet20", "resnet56"], norms=["bn", "l2bn"], seeds=[0, 1, 2, 3, 4],
        train=dict(epochs=30, batch_size=128, lr=0.1, weight_decay=5e-4, schedule="cosine", warmup_epochs=1),
    ),
}


def run_dir(out: Path, model: str, norm: str, seed: int) -> Path:
    return out / f"{model}-{norm}-seed{seed}"


def _finished(path: Path, cfg: TrainConfig) -> bool:
    res = path / "result.json"
    if not res.is_file():
        return False
    try:
        r = json.loads(res.read_text())
    except json.JSONDecodeError:
        return False
    if r.get("status") != "complete":
        return False
    same = {k: v for k, v in r.get("config", {}).items() if k not in ("out", "progress", "resume", "threads", "data_dir")}
    want = {k: v for k, v in cfg.to_dict().items() if k not in ("out", "progress", "resume", "threads", "data_dir")}
    return same == want


def compare(
    out: str, models: Sequence[str], norms: Sequence[str], seeds: Sequence[int], dataset: str,
    train_overrides: Dict[str, Any], data_dir: Optional[str] = None, note: str = "",
) -> Dict[str, Any]:
    """Train every (model, norm, seed) not yet finished, then write the summary and report."""
    from .engine import train

    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    runs = [(m, n, s) for m in models for s in seeds for n in norms]
    for i, (model, norm, seed) in enumerate(runs):
        cfg = TrainConfig(**{**train_overrides, "dataset": dataset, "data_dir": data_dir, "model": model,
                             "norm": norm, "seed": seed, "out": str(run_dir(out_p, model, norm, seed)), "resume": True})
        tag = f"[{i + 1}/{len(runs)}] {model} {norm} seed {seed}"
        if _finished(Path(cfg.out), cfg):
            print(f"{tag}: finished earlier, skipped", flush=True)
            continue
        print(f"{tag}: training -> {cfg.out}", flush=True)
        train(cfg)
    summary = summarize(out_p, models, norms, seeds)
    summary["compare_wall_time_s"] = time.time() - t0
    summary["dataset"] = dataset
    summary["recipe"] = {k: v for k, v in dataclasses.asdict(TrainConfig(**train_overrides)).items()
                         if k not in ("out", "seed", "model", "norm", "resume", "progress")}
    summary["note"] = note
    write_json(summary, out_p / "summary.json")
    from ..report.markdown import write_compare_report

    write_compare_report(out_p, summary)
    return summary


def summarize(out: Path, models: Sequence[str], norms: Sequence[str], seeds: Sequence[int]) -> Dict[str, Any]:
    """Collect ``result.json`` of every run into per-cell statistics and paired differences."""
    from ..report.stats import mean_std, paired_difference

    cells: Dict[str, Any] = {}
    for model in models:
        for norm in norms:
            accs, bests, walls, runs = [], [], [], []
            for seed in seeds:
                p = run_dir(out, model, norm, seed) / "result.json"
                if not p.is_file():
                    continue
                r = json.loads(p.read_text())
                if r.get("status") != "complete":
                    continue
                accs.append(r["test_acc"])
                bests.append(r["best_test_acc"])
                walls.append(r["wall_time_s"])
                runs.append({"seed": seed, "test_acc": r["test_acc"], "best_test_acc": r["best_test_acc"],
                             "wall_time_s": r["wall_time_s"], "dir": str(p.parent)})
            m, s = mean_std(accs)
            bm, bs = mean_std(bests)
            cells[f"{model}/{norm}"] = {"model": model, "norm": norm, "runs": runs, "final_mean": m, "final_std": s,
                                       "best_mean": bm, "best_std": bs, "n": len(accs)}
    diffs: Dict[str, Any] = {}
    if "bn" in norms:
        for model in models:
            for norm in norms:
                if norm == "bn":
                    continue
                a = {r["seed"]: r["test_acc"] for r in cells[f"{model}/{norm}"]["runs"]}
                b = {r["seed"]: r["test_acc"] for r in cells[f"{model}/bn"]["runs"]}
                common = sorted(set(a) & set(b))
                diffs[f"{model}/{norm}-bn"] = {"seeds": common, **paired_difference([a[s] for s in common], [b[s] for s in common])}
    return {"cells": cells, "differences": diffs, "models": list(models), "norms": list(norms), "seeds": list(seeds)}
