"""One run, top to bottom: :func:`fit` builds data, model, loaders, optimizer and schedule,
restores a checkpoint, then alternates :func:`l2bn.train.loop.train_one_epoch` and
:func:`l2bn.train.loop.evaluate`, writing metrics and atomic checkpoints after every epoch.

All randomness of epoch ``e`` is derived from ``(seed, e)``, so a run killed after any epoch
and resumed from ``last.pt`` ends with exactly the metrics of an uninterrupted run. Under
``torchrun`` every process trains on its shard with DDP and only rank 0 writes.

Why one file: :func:`fit` is the training loop a reader follows top to bottom (data, model,
optimizer, resume, epochs, checkpoints, result); its helpers are used nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ..data import DataBundle, load_dataset
from ..data.loaders import make_loaders, make_test_loader
from ..factory import canonical_norm
from ..io import BadInput, write_json
from ..models import build_model
from .checkpoint import CheckpointError, load_checkpoint, load_model_state, save_checkpoint
from .config import (
    RunConfigError,
    TrainConfig,
    check_config,
    conflict_message,
    recipe_conflicts,
    saved_config,
)
from .distributed import DistEnv, cleanup, init_distributed
from .lock import check_out_dir, run_lock
from .loop import TrainingDiverged, evaluate, train_one_epoch
from .optim import fast_forward, make_optimizer, make_scheduler

__all__ = ["train", "fit", "train_one_epoch", "evaluate", "TrainingDiverged", "model_for_config"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def model_for_config(cfg: TrainConfig, data: DataBundle, sync: bool = False) -> nn.Module:
    """The model of ``cfg`` for ``data`` (norm layers from the factory; ``sync`` for DDP)."""
    return build_model(
        cfg.model,
        cfg.norm,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        width=cfg.width,
        sync=sync,
        bn_eps=cfg.bn_eps,
        bn_momentum=cfg.bn_momentum,
    )


def norm_census(model: nn.Module) -> Dict[str, int]:
    """How many layers of each normalization class ``model`` has (``{'SyncL2BatchNorm': 7}``)."""
    from torch.nn.modules.batchnorm import _NormBase

    return dict(Counter(type(m).__name__ for m in model.modules() if isinstance(m, _NormBase)))


@dataclass
class _State:
    """What a checkpoint restores besides the model/optimizer: counters and history."""

    epoch: int = 0  # epochs completed
    best_acc: float = -1.0
    best_epoch: int = -1
    best_per_group: Dict[str, float] = field(default_factory=dict)
    history: List[Dict[str, Any]] = field(default_factory=list)


def _check_run_dir(cfg: TrainConfig) -> None:
    """A run directory keeps one recipe: resuming or evaluating with another one is refused."""
    saved = saved_config(cfg.out)
    if saved is None:
        return
    conflicts = recipe_conflicts(saved, cfg.recipe())
    if conflicts:
        raise RunConfigError(conflict_message(cfg.out, conflicts))


def _restore(
    path: Path, cfg: TrainConfig, model: nn.Module, opt: Any, scaler: Any, resume: bool
) -> _State:
    state = load_checkpoint(path)
    saved = state["config"]
    if (
        canonical_norm(saved.get("norm", "")) != canonical_norm(cfg.norm)
        or saved.get("model") != cfg.model
    ):
        raise CheckpointError(
            f"{path}: checkpoint is for model {saved.get('model')!r} norm {saved.get('norm')!r}, "
            f"this run asks for model {cfg.model!r} norm {cfg.norm!r}"
        )
    load_model_state(model, state, path, want={"model": cfg.model, "norm": cfg.norm})
    st = _State()
    if resume:
        if state["epoch"] + 1 > cfg.epochs:
            raise RunConfigError(
                f"{path}: {state['epoch'] + 1} epochs are done; --epochs {cfg.epochs} would not "
                f"extend the run"
            )
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        st = _State(
            state["epoch"] + 1,
            state["best_acc"],
            state["best_epoch"],
            state.get("best_per_group", {}),
            state["history"],
        )
    return st


def fit(cfg: TrainConfig) -> Tuple[nn.Module, Dict[str, Any]]:
    """Train (or, with ``cfg.test_only``, evaluate) one run; returns the model and the result dict
    also written to ``out/result.json`` (``out/test_result.json`` for ``test_only``).

    Raises:
        TrainingDiverged: the loss became NaN/inf (``last.pt`` holds the last good epoch).
        l2bn.data.DataNotFoundError: the dataset is missing.
        l2bn.train.checkpoint.CheckpointError: a corrupt, unsafe or mismatched checkpoint.
        l2bn.train.config.RunConfigError: ``cfg`` contradicts the recipe saved in ``cfg.out``.
        l2bn.train.lock.RunDirBusy: another live process is training ``cfg.out``.
    """
    t_start = time.time()
    check_config(cfg)
    out = Path(cfg.out)
    check_out_dir(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    with run_lock(out) if _takes_lock(cfg) else nullcontext():
        if cfg.resume or cfg.test_only:
            _check_run_dir(cfg)
        env = init_distributed(device.type)
        try:
            return _fit(cfg, device, env, out, t_start)
        finally:
            cleanup(env)


def _takes_lock(cfg: TrainConfig) -> bool:
    """One writer per run directory: a single process, or rank 0 of a torchrun job, holds its
    lock; ``--test-only`` writes only ``test_result.json`` and may run beside training."""
    if cfg.test_only:
        return False
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0


def _fit(
    cfg: TrainConfig, device: torch.device, env: DistEnv, out: Path, t_start: float
) -> Tuple[nn.Module, Dict[str, Any]]:
    if device.type == "cuda" and env.enabled:
        device = torch.device("cuda", env.local_rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(cfg.seed)

    # data, model, loaders
    data = load_dataset(
        cfg.dataset, cfg.data_dir, verify_data=cfg.verify_data, **cfg.dataset_options()
    )
    if cfg.train_subset or cfg.val_size:
        data = data.split_train(cfg.train_subset, cfg.val_size, seed=0)
    if cfg.augment:
        data = dataclasses.replace(data, augment=cfg.augment)
    if cfg.mixup_mode not in ("batch", "pairs"):
        raise BadInput(f"unknown mixup_mode {cfg.mixup_mode!r}; choose batch or pairs")
    if cfg.mixup_mode == "pairs" and cfg.mixup <= 0:
        raise BadInput("mixup_mode 'pairs' needs mixup > 0 (the Beta(alpha, alpha) parameter)")
    sync = cfg.sync_bn and env.enabled
    if sync and canonical_norm(cfg.norm) == "bn" and device.type != "cuda":
        raise BadInput(
            "--sync-bn with --norm bn needs CUDA (nn.SyncBatchNorm refuses CPU tensors); "
            "use --norm l2bn (SyncL2BatchNorm works on CPU) or drop --sync-bn"
        )
    model = model_for_config(cfg, data, sync=sync).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_b, test_b = make_loaders(
        data,
        device,
        cfg.batch_size,
        seed=cfg.seed,
        rank=env.rank,
        world_size=env.world_size,
        workers=cfg.workers,
        channels_last=cfg.channels_last,
        max_steps=cfg.max_steps_per_epoch,
        pairs=cfg.mixup > 0 and cfg.mixup_mode == "pairs",
    )

    val_b = None
    if data.val_x is not None:
        val_b = make_test_loader(
            dataclasses.replace(data, test_x=data.val_x, test_y=data.val_y, test_groups=None),
            device,
            max(256, cfg.batch_size),
            channels_last=cfg.channels_last,
        )

    # optimizer, schedule, resume
    opt = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    steps_per_epoch = len(train_b)
    last_path, best_path = out / "last.pt", out / "best.pt"
    st = _State()
    if cfg.test_only:
        path = best_path if best_path.is_file() else last_path
        if not path.is_file():
            raise CheckpointError(
                f"--test-only: no checkpoint in {out} (expected {best_path} or {last_path})"
            )
        _restore(path, cfg, model, opt, scaler, resume=False)
        loss, acc, per_group = evaluate(model, test_b, cfg, device, env, data.test_groups)
        res = {
            "status": "test-only",
            "checkpoint": path.name,
            "test_loss": loss,
            "test_acc": acc,
            "per_group_acc": per_group,
            "dataset": data.name,
            "config": cfg.to_dict(),
        }
        _log(
            f"test loss {loss:.4f}  test acc {acc:.2f}% ({path.name})"
            + (f"  per group {per_group}" if per_group else ""),
            env,
        )
        if env.is_main:
            write_json(res, out / "test_result.json")
        return model, res
    if cfg.resume and last_path.is_file():
        st = _restore(last_path, cfg, model, opt, scaler, resume=True)
        for g in opt.param_groups:  # the schedule is rebuilt and replayed from the start
            g["lr"] = g["initial_lr"] if "initial_lr" in g else cfg.lr
        _log(f"resumed from {last_path} ({st.epoch} epoch(s) done)", env)
    elif cfg.resume:
        _log(f"--resume: no checkpoint in {out}; starting from scratch", env)
    sched = make_scheduler(cfg, opt, steps_per_epoch)
    fast_forward(sched, st.epoch * steps_per_epoch)

    net: nn.Module = model
    if env.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        net = torch.compile(net)
    writer = None
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(
            cfg.to_dict(), out / "config.json"
        )  # the run's truth, also after --resume --epochs N
        if st.epoch == 0:
            (out / "metrics.jsonl").unlink(missing_ok=True)
        writer = _tensorboard(cfg, out)
    _log(
        f"{cfg.model}/{cfg.norm} on {data.name} ({train_b.num_examples} train examples, "
        f"{steps_per_epoch} steps/epoch "
        f"x {cfg.epochs} epochs, batch {cfg.batch_size} x {env.world_size} process(es), {device})",
        env,
    )

    for epoch in range(st.epoch, cfg.epochs):
        try:
            rec: Dict[str, Any] = {
                "epoch": epoch + 1,
                **train_one_epoch(
                    net,
                    train_b,
                    opt,
                    sched,
                    scaler,
                    cfg,
                    device,
                    env,
                    epoch,
                    epoch * steps_per_epoch,
                ),
            }
        except TrainingDiverged as e:
            msg = (
                f"{e} The last good checkpoint "
                f"({last_path if last_path.exists() else 'none yet'}) is kept; "
                f"lower --lr, add --warmup-epochs, or check the data."
            )
            if env.is_main:
                write_json(
                    {
                        "status": "diverged",
                        "message": msg,
                        "config": cfg.to_dict(),
                        "epochs_done": epoch,
                    },
                    out / "result.json",
                )
            raise TrainingDiverged(msg) from None
        rec["lr"] = opt.param_groups[0]["lr"]
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            rec["test_loss"], rec["test_acc"], per_group = evaluate(
                model, test_b, cfg, device, env, data.test_groups
            )
            if per_group:
                rec["per_group_acc"] = per_group
            if rec["test_acc"] > st.best_acc:
                st.best_acc, st.best_epoch, st.best_per_group = (
                    rec["test_acc"],
                    epoch + 1,
                    per_group,
                )
        if val_b is not None and epoch + 1 == cfg.epochs:
            rec["val_loss"], rec["val_acc"], _ = evaluate(model, val_b, cfg, device, env)
        st.history.append(rec)
        st.epoch = epoch + 1
        _log(
            f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {rec['train_loss']:.4f}  train "
            f"{rec['train_acc']:6.2f}%  "
            + (f"test {rec['test_acc']:6.2f}%  " if "test_acc" in rec else "")
            + (f"val {rec['val_acc']:6.2f}%  " if "val_acc" in rec else "")
            + f"lr {rec['lr']:.4g}  "
            f"{rec['throughput']:.0f} img/s",
            env,
        )
        if env.is_main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            if writer is not None:
                _log_scalars(writer, rec, epoch + 1)
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "best_acc": st.best_acc,
                "best_epoch": st.best_epoch,
                "best_per_group": st.best_per_group,
                "history": st.history,
                "config": cfg.to_dict(),
                "rng": {"torch": torch.get_rng_state()},
                "dataset": {
                    "name": data.name,
                    "num_classes": data.num_classes,
                    "input_shape": list(data.input_shape),
                },
            }
            save_checkpoint(state, last_path)
            if st.best_epoch == epoch + 1:
                save_checkpoint(state, best_path)

    final = st.history[-1] if st.history else {}
    result = {
        **(
            {"per_group_acc": final["per_group_acc"], "best_per_group_acc": st.best_per_group}
            if "per_group_acc" in final
            else {}
        ),
        "status": "complete",
        "test_acc": final.get("test_acc"),
        "best_test_acc": st.best_acc,
        "best_epoch": st.best_epoch,
        "final_train_loss": final.get("train_loss"),
        **(
            {"val_acc": final["val_acc"], "val_examples": len(data.val_y)}
            if "val_acc" in final
            else {}
        ),
        "epochs": cfg.epochs,
        "wall_time_s": time.time() - t_start,
        # training time of the whole run: the epochs of every process that worked on it (a resumed
        # run's wall_time_s covers only the last one)
        "train_time_s": sum(float(h.get("epoch_time_s", 0.0)) for h in st.history),
        "world_size": env.world_size,
        "device": str(device),
        "torch": torch.__version__,
        "train_examples": train_b.num_examples,
        "norm_layers": norm_census(model),
        "config": cfg.to_dict(),
        "history": st.history,
    }
    if env.is_main:
        write_json(result, out / "result.json")
        if writer is not None:
            writer.close()
    return model, result


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Train one model as configured; returns the result dict also written to ``out/result.json``.

    See :func:`fit` for the errors it raises.
    """
    return fit(cfg)[1]


def _log(msg: str, env: DistEnv) -> None:
    if env.is_main:
        print(msg, flush=True)


def _log_scalars(writer: Any, rec: Dict[str, Any], step: int, prefix: str = "") -> None:
    """Numbers as scalars; nested dicts (per-device accuracy) as ``key/subkey`` scalars."""
    for k, v in rec.items():
        if k == "epoch":
            continue
        if isinstance(v, dict):
            _log_scalars(writer, v, step, f"{prefix}{k}/")
        elif isinstance(v, (int, float)):
            writer.add_scalar(f"{prefix}{k}", v, step)
    writer.flush()


def _tensorboard(cfg: TrainConfig, out: Path) -> Any:
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print(
            "note: tensorboard not installed; skipping TensorBoard logs (pip install tensorboard)",
            file=sys.stderr,
        )
        return None
    return SummaryWriter(str(out / "tb"))
