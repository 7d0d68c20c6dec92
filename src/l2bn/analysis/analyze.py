"""``l2bn analyze RUN_DIR``: load a run's checkpoint, probe it on the test split, write
``analysis.json`` (per-layer norm spread, compactness, discrepancy, Fisher ratio, k-NN)."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..io import write_json
from ..train.checkpoint import CheckpointError, load_checkpoint, load_model_state
from ..train.config import TrainConfig
from ..train.lock import lock_owner
from .metrics import feature_metrics
from .probes import FeatureProbe, NormInputProbe


@torch.no_grad()
def probe_model(
    model: nn.Module, batches: Any, feature_layer: Optional[Any] = None, max_features: int = 10_000
):
    """Run ``model`` (in eval mode) over ``batches`` of (x, y) with both probes attached.

    The model's train/eval mode is restored and all hooks are removed afterwards.
    Returns ``(norm_summary, features, labels, accuracy %)``.
    """
    if feature_layer is None:
        feature_layer = getattr(
            model, "feature_layer", None
        )  # e.g. the DCASE nets' pooled features
    was_training = model.training
    model.eval()
    labels, correct, total = [], 0, 0
    try:
        with (
            NormInputProbe(model) as norms,
            FeatureProbe(model, feature_layer, max_features) as feats,
        ):
            for x, y in batches:
                out = model(x)
                correct += int((out.argmax(1) == y).sum())
                total += len(y)
                labels.append(y.cpu())
    finally:
        model.train(was_training)
    f = feats.features()
    lab = torch.cat(labels)[: len(f)]
    return norms.summary(), f, lab, 100.0 * correct / max(total, 1)


def _pca2d(f: torch.Tensor, n: int = 2000) -> torch.Tensor:
    f = f[:n].double()
    f = f - f.mean(0)
    _, _, v = torch.pca_lowrank(f, q=2, center=False)
    return f @ v[:, :2]


def analyze_run(
    run_dir: str,
    data_dir: Optional[str] = None,
    max_examples: int = 10_000,
    knn: bool = True,
    device: str = "cpu",
) -> Dict[str, Any]:
    """Analyse the final model of ``run_dir`` and write ``run_dir/analysis.json``.

    Raises:
        CheckpointError: no checkpoint in ``run_dir``, or one that does not match its config.
    """
    from ..data import load_dataset
    from ..data.loaders import make_test_loader
    from ..models import build_model

    run = Path(run_dir)
    ckpt = run / "last.pt"
    if not run.is_dir():
        raise CheckpointError(f"run directory not found: {run}")
    if not ckpt.is_file():
        raise CheckpointError(
            f"{run}: no checkpoint (expected {ckpt}); train the run first with `l2bn train --out "
            f"{run}`"
        )
    state = load_checkpoint(ckpt)
    cfg = TrainConfig.from_record(state["config"])
    owner = lock_owner(run)
    if owner is not None:
        warnings.warn(
            f"{run} is being trained by another process (pid {owner.get('pid', '?')}): analysing "
            f"its "
            f"checkpoint of epoch {state['epoch'] + 1} of {cfg.epochs}; analyse it again when it "
            f"has "
            f"finished",
            stacklevel=2,
        )
    data = load_dataset(
        cfg.dataset, data_dir or cfg.data_dir, verify_data=cfg.verify_data, **cfg.dataset_options()
    )
    model = build_model(
        cfg.model,
        cfg.norm,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        width=cfg.width,
    )
    load_model_state(model, state, ckpt, want={"model": cfg.model, "norm": cfg.norm})
    dev = torch.device(device)
    model.to(dev)
    if data.in_memory:
        n = min(max_examples, len(data.test_y))
        data = dataclasses.replace(data, test_x=data.test_x[:n], test_y=data.test_y[:n])
    batches = make_test_loader(
        data, dev, 500 if data.in_memory else 128, workers=cfg.workers
    ).batches(0)
    norm_summary, feats, labels, acc = probe_model(model, batches, max_features=max_examples)
    metrics = feature_metrics(feats, labels, knn=knn)
    pca = _pca2d(feats)
    result: Dict[str, Any] = {
        "run": str(run),
        "model": cfg.model,
        "norm": cfg.norm,
        "seed": cfg.seed,
        "dataset": cfg.dataset,
        "examples": int(len(labels)),
        "test_acc_recomputed": acc,
        "epoch": state["epoch"] + 1,
        **metrics,
        "norm_spread": norm_summary,
        "pca2d": {
            "x": pca[:, 0].tolist(),
            "y": pca[:, 1].tolist(),
            "label": labels[: len(pca)].tolist(),
        },
        "config": dataclasses.asdict(cfg),
    }
    write_json(result, run / "analysis.json")
    return result
