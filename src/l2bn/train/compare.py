"""BN vs L2BN over models x norms x seeds: run (skipping finished runs), then summarise.

Each run lives in ``OUT/<model>-<norm>-seed<k>/``; a run whose ``result.json`` says
``complete`` for the same recipe is not trained again, so an interrupted comparison restarts
where it stopped. The summary (``summary.json``, ``report.md``, ``curves.png``) gives per-seed
accuracy, mean ± std per cell, and the paired L2BN − BN difference per model with a 95%
t-interval over seeds; with ``analyze`` each run is also probed (``analysis.json``) and the
report (``report.md``/``report.html``) gains the mechanism section.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

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
    train_overrides: Dict[str, Any], data_dir: Optional[str] = None, note: str = "", analyze: bool = True,
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
    dirs = [str(run_dir(out_p, m, n, s)) for (m, n, s) in runs]
    if analyze:
        from ..analysis.analyze import analyze_run

        for i, d in enumerate(dirs):
            a, ck = Path(d) / "analysis.json", Path(d) / "last.pt"
            if a.is_file() and a.stat().st_mtime >= ck.stat().st_mtime:
                continue
            print(f"[{i + 1}/{len(dirs)}] analysing {d}", flush=True)
            analyze_run(d, data_dir=data_dir)
    from ..report.build import build_report, load_runs, summarize_runs

    summary = summarize_runs(load_runs(dirs))
    summary.update(dataset=dataset, note=note, compare_wall_time_s=time.time() - t0,
                   recipe={k: v for k, v in dataclasses.asdict(TrainConfig(**train_overrides)).items()
                           if k not in ("out", "seed", "model", "norm", "resume", "progress")})
    write_json(summary, out_p / "summary.json")
    build_report(dirs, str(out_p), note=note, extra={"wall_time_s": time.time() - t0})
    return summary
