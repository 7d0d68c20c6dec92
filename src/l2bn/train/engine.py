"""The training loop: one function, :func:`train`, readable top to bottom.

Small datasets live on the training device as uint8 tensors and are normalised and augmented
there in batch; all randomness of epoch ``e`` is derived from ``(seed, e)``, so a run killed
after any epoch and resumed from ``last.pt`` ends with exactly the metrics of an uninterrupted
run. Under ``torchrun`` every process trains on its shard with DDP and only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import DataBundle, load_dataset
from ..data import augment as aug
from ..models import create_model
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    write_json,
)
from .config import TrainConfig
from .distributed import DistEnv, all_reduce_sum, cleanup, init_distributed


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def build_model(cfg: TrainConfig, data: DataBundle) -> nn.Module:
    kw: Dict[str, Any] = {}
    if cfg.model == "mlp":
        kw["in_features"] = int(math.prod(data.input_shape))
    if cfg.model.startswith("resnet") and cfg.width != 1:
        kw["width"] = cfg.width
    return create_model(cfg.model, data.num_classes, data.in_channels, cfg.norm, **kw)


def param_groups(model: nn.Module, weight_decay: float, on_norm_and_bias: bool) -> List[Dict[str, Any]]:
    """Weight decay on weights of rank >= 2 only (norm scales and biases excluded by default)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if (p.ndim >= 2 or on_norm_and_bias) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.wd_on_norm_and_bias)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimisation step ``step`` (warm-up, then the schedule)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle" and warm == 0:
        warm = int(0.3 * total)
    if step < warm:
        return (step + 1) / warm
    p = (step - warm) / max(1, total - warm)
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    if cfg.schedule in ("cosine", "onecycle"):
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    if cfg.schedule == "step":
        epoch = step / steps_per_epoch
        marks = [m * cfg.epochs if m < 1 else m for m in cfg.milestones]
        return cfg.gamma ** sum(epoch >= m for m in marks)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "sgdr":
        # warm restarts at epochs 3, 7, 15, 31, 63, ... (periods 3, 4, 8, 16, 32, ...; Hu et al.)
        epoch = step / steps_per_epoch
        start, period = 0.0, 3.0
        while epoch >= start + period:
            start, period = start + period, (4.0 if period == 3.0 else period * 2)
        q = (epoch - start) / period
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * q))
    raise ValueError(f"unknown schedule {cfg.schedule!r}; choose cosine, step, onecycle, sgdr or constant")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * (seed + 1) + epoch)


class TensorBatches:
    """Shuffled, sharded mini-batches of an in-memory dataset, normalised (and augmented) on device."""

    def __init__(self, x: Tensor, y: Tensor, data: DataBundle, device: torch.device, batch_size: int,
                 env: DistEnv, train: bool, channels_last: bool = False, max_steps: int = 0) -> None:
        self.x = x.to(device)
        self.y = y.to(device)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        self.mean = torch.tensor(data.mean, device=device).reshape(shape) * (255.0 if x.dtype == torch.uint8 else 1.0)
        self.std = torch.tensor(data.std, device=device).reshape(shape) * (255.0 if x.dtype == torch.uint8 else 1.0)
        self.augment = data.augment if train else "none"
        self.transform = data.transform
        self.bs, self.env, self.train = batch_size, env, train
        self.channels_last = channels_last and x.dim() == 4
        n = len(self.y) // env.world_size if train else len(self.y)
        self.steps = (n // batch_size) if train else math.ceil(n / batch_size)
        if train and max_steps:
            self.steps = min(self.steps, max_steps)
        if train and self.steps == 0:
            raise ValueError(f"batch size {batch_size} is larger than the per-process training set ({n} examples)")

    def __len__(self) -> int:
        return self.steps

    def batches(self, gen: Optional[torch.Generator]) -> Iterator[Tuple[Tensor, Tensor]]:
        n = len(self.y)
        if self.train:
            perm = torch.randperm(n, generator=gen)
            per = n // self.env.world_size
            idx = perm[self.env.rank * per:(self.env.rank + 1) * per].to(self.x.device)
        else:
            idx = torch.arange(n, device=self.x.device)
        for s in range(self.steps):
            b = idx[s * self.bs:(s + 1) * self.bs]
            x = aug.transform(self.transform, (self.x[b].float() - self.mean) / self.std)
            if self.train:
                x = aug.apply(self.augment, x, gen)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.y[b]


class LoaderBatches:
    """DataLoader over a map-style dataset (image folders), sharded with DistributedSampler."""

    def __init__(self, dataset: Any, device: torch.device, batch_size: int, env: DistEnv, train: bool,
                 workers: int, channels_last: bool = False, max_steps: int = 0) -> None:
        from torch.utils.data import DataLoader, DistributedSampler

        self.sampler = DistributedSampler(dataset, env.world_size, env.rank, shuffle=train, drop_last=train) if env.enabled else None
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=train and self.sampler is None,
                                 sampler=self.sampler, num_workers=workers, drop_last=train,
                                 pin_memory=device.type == "cuda", persistent_workers=workers > 0)
        self.device, self.train, self.channels_last = device, train, channels_last
        self.steps = min(len(self.loader), max_steps) if (train and max_steps) else len(self.loader)

    def __len__(self) -> int:
        return self.steps

    def batches(self, gen: Optional[torch.Generator], epoch: int = 0) -> Iterator[Tuple[Tensor, Tensor]]:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        for s, (x, y) in enumerate(self.loader):
            if s >= self.steps:
                break
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return torch.autocast(device.type, enabled=False)
    if cfg.amp not in ("bf16", "fp16"):
        raise ValueError(f"unknown amp mode {cfg.amp!r}; choose none, bf16 or fp16")
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Any, cfg: TrainConfig, device: torch.device, env: DistEnv,
             groups: Optional[List[str]] = None) -> Tuple[float, float, Dict[str, float]]:
    """(loss, accuracy %, accuracy % per group) on the test split; rank r evaluates every
    world_size-th batch. ``groups`` names a group (e.g. a recording device) per test example."""
    model.eval()
    tot = torch.zeros(3, dtype=torch.float64, device=device)
    n = len(groups) if groups else 0
    hit = torch.zeros(n, dtype=torch.float64, device=device)
    seen = torch.zeros(n, dtype=torch.float64, device=device)
    it = batches.batches(None) if isinstance(batches, TensorBatches) else batches.batches(None, 0)
    start = 0
    for i, (x, y) in enumerate(it):
        lo, start = start, start + len(y)
        if i % env.world_size != env.rank:
            continue
        with _autocast(cfg, device):
            out = model(x)
        ok = out.argmax(1) == y
        tot[0] += F.cross_entropy(out.float(), y, reduction="sum")
        tot[1] += ok.sum()
        tot[2] += len(y)
        if n:
            hit[lo:start] = ok.double()
            seen[lo:start] = 1
    all_reduce_sum(tot, env)
    per_group: Dict[str, float] = {}
    if n:
        all_reduce_sum(hit, env)
        all_reduce_sum(seen, env)
        for g in sorted(set(groups)):
            idx = torch.tensor([j for j, gg in enumerate(groups) if gg == g], device=device)
            per_group[g] = float(100.0 * hit[idx].sum() / seen[idx].sum().clamp_min(1))
    return float(tot[0] / tot[2]), float(100.0 * tot[1] / tot[2]), per_group


def _log(msg: str, env: DistEnv) -> None:
    if env.is_main:
        print(msg, flush=True)


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Train one model as configured; returns the result dict also written to ``out/result.json``.

    Raises:
        TrainingDiverged: the loss became NaN/inf (``last.pt`` holds the last good epoch).
        l2bn.data.DataNotFoundError: the dataset is missing.
        l2bn.train.checkpoint.CheckpointError: a corrupt or mismatched checkpoint.
    """
    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    env = init_distributed(device.type)
    if device.type == "cuda" and env.enabled:
        device = torch.device("cuda", env.local_rank)
    out = Path(cfg.out)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(cfg.seed)

    data = load_dataset(cfg.dataset, cfg.data_dir, **cfg.dataset_options())
    if cfg.train_subset:
        data = data.subset_train(cfg.train_subset, seed=0)
    model = build_model(cfg, data)
    if cfg.sync_bn and env.enabled:
        model = _sync_norms(model, cfg, device)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)

    if data.in_memory:
        train_b: Any = TensorBatches(data.train_x, data.train_y, data, device, cfg.batch_size, env, True, cfg.channels_last, cfg.max_steps_per_epoch)
        test_b: Any = TensorBatches(data.test_x, data.test_y, data, device, max(256, cfg.batch_size), DistEnv(), False, cfg.channels_last)
    else:
        train_b = LoaderBatches(data.train_set, device, cfg.batch_size, env, True, cfg.workers, cfg.channels_last, cfg.max_steps_per_epoch)
        test_b = LoaderBatches(data.test_set, device, cfg.batch_size, DistEnv(), False, cfg.workers, cfg.channels_last)

    opt = make_optimizer(cfg, model)
    steps_per_epoch = len(train_b)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    start_epoch, best_acc, best_epoch, history = 0, -1.0, -1, []
    last_path, best_path = out / "last.pt", out / "best.pt"
    if cfg.resume or cfg.test_only:
        path = best_path if (cfg.test_only and best_path.is_file()) else last_path
        if path.is_file():
            state = load_checkpoint(path, map_location=device)
            if state["config"].get("model") != cfg.model or state["config"].get("norm") != cfg.norm:
                raise CheckpointError(f"{path}: checkpoint is for model {state['config'].get('model')!r} norm {state['config'].get('norm')!r}, not {cfg.model!r} {cfg.norm!r}")
            load_model_state(model, state, path)
            if not cfg.test_only:
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
                scaler.load_state_dict(state["scaler"])
                start_epoch, best_acc, best_epoch = state["epoch"] + 1, state["best_acc"], state["best_epoch"]
                history = state["history"]
                torch.set_rng_state(state["rng"]["torch"])
            _log(f"resumed from {path} (epoch {state['epoch'] + 1} done)", env)
        elif cfg.test_only:
            raise CheckpointError(f"--test-only: no checkpoint in {out} (expected {best_path} or {last_path})")
        else:
            _log(f"--resume: no checkpoint in {out}; starting from scratch", env)

    if cfg.test_only:
        loss, acc, per_group = evaluate(model, test_b, cfg, device, env, data.test_groups)
        _log(f"test loss {loss:.4f}  test acc {acc:.2f}%" + (f"  per group {per_group}" if per_group else ""), env)
        cleanup(env)
        return {"test_loss": loss, "test_acc": acc, "per_group_acc": per_group}

    net: nn.Module = model
    if env.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    writer = _tensorboard(cfg, out, env)
    if env.is_main and start_epoch == 0:
        write_json(cfg.to_dict(), out / "config.json")
        (out / "metrics.jsonl").unlink(missing_ok=True)
    _log(f"{cfg.model}/{cfg.norm} on {data.name} ({len(data.train_y) if data.in_memory else len(data.train_set)} train examples, "
         f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs, batch {cfg.batch_size} x {env.world_size} process(es), {device})", env)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout etc.: a function of (seed, epoch)
        gen = epoch_generator(cfg.seed, epoch)
        net.train()
        tot = torch.zeros(3, dtype=torch.float64, device=device)
        it = train_b.batches(gen) if isinstance(train_b, TensorBatches) else train_b.batches(gen, epoch)
        bar = _progress(cfg, env, steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
        mix_rng = np.random.default_rng([cfg.seed, epoch])
        for step, (x, y) in enumerate(it):
            if cfg.mixup > 0:  # mixup (Zhang et al. 2018): convex pairs within the batch
                lam = float(mix_rng.beta(cfg.mixup, cfg.mixup))
                perm = torch.randperm(len(y), generator=gen).to(device)
                x = lam * x + (1 - lam) * x[perm]
            with _autocast(cfg, device):
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                if cfg.mixup > 0:
                    loss = lam * loss + (1 - lam) * F.cross_entropy(logits.float(), y[perm], label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss.detach()).item():
                if bar is not None:
                    bar.close()
                msg = (f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}: training diverged. "
                       f"The last good checkpoint ({last_path if last_path.exists() else 'none yet'}) is kept; "
                       f"lower --lr, add --warmup-epochs, or check the data.")
                if env.is_main:
                    write_json({"status": "diverged", "message": msg, "config": cfg.to_dict(), "epochs_done": epoch}, out / "result.json")
                cleanup(env)
                raise TrainingDiverged(msg)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            tot[0] += loss.detach() * len(y)
            tot[1] += (logits.detach().argmax(1) == y).sum()
            tot[2] += len(y)
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{float(tot[0] / tot[2]):.3f}")
        if bar is not None:
            bar.close()
        all_reduce_sum(tot, env)
        train_time = time.time() - t0
        rec: Dict[str, Any] = {
            "epoch": epoch + 1, "train_loss": float(tot[0] / tot[2]), "train_acc": float(100 * tot[1] / tot[2]),
            "lr": opt.param_groups[0]["lr"], "epoch_time_s": train_time, "throughput": float(tot[2]) / max(train_time, 1e-9),
        }
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            rec["test_loss"], rec["test_acc"], per_group = evaluate(model, test_b, cfg, device, env, data.test_groups)
            if per_group:
                rec["per_group_acc"] = per_group
            if rec["test_acc"] > best_acc:
                best_acc, best_epoch = rec["test_acc"], epoch + 1
        history.append(rec)
        _log(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {rec['train_loss']:.4f}  train {rec['train_acc']:6.2f}%  "
             f"test {rec.get('test_acc', float('nan')):6.2f}%  lr {rec['lr']:.4g}  {rec['throughput']:.0f} img/s", env)
        if env.is_main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            if writer is not None:
                for k, v in rec.items():
                    if k != "epoch":
                        writer.add_scalar(k, v, epoch + 1)
                writer.flush()
            state = {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "best_acc": best_acc, "best_epoch": best_epoch,
                "history": history, "config": cfg.to_dict(), "rng": {"torch": torch.get_rng_state()},
                "dataset": {"name": data.name, "num_classes": data.num_classes, "input_shape": list(data.input_shape)},
            }
            save_checkpoint(state, last_path)
            if best_epoch == epoch + 1:
                save_checkpoint(state, best_path)

    final = history[-1] if history else {}
    result = {
        **({"per_group_acc": final["per_group_acc"]} if "per_group_acc" in final else {}),
        "status": "complete", "test_acc": final.get("test_acc"), "best_test_acc": best_acc, "best_epoch": best_epoch,
        "final_train_loss": final.get("train_loss"), "epochs": cfg.epochs, "wall_time_s": time.time() - t_start,
        "world_size": env.world_size, "device": str(device), "torch": torch.__version__,
        "train_examples": len(data.train_y) if data.in_memory else len(data.train_set),
        "config": cfg.to_dict(), "history": history,
    }
    if env.is_main:
        write_json(result, out / "result.json")
        if writer is not None:
            writer.close()
    cleanup(env)
    return result


def _sync_norms(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    from ..convert import convert

    if str(cfg.norm).lower().startswith("l2"):
        return convert(model, sync=True)
    if device.type != "cuda":
        raise RuntimeError("--sync-bn with --norm bn needs CUDA (nn.SyncBatchNorm refuses CPU tensors); "
                           "use --norm l2bn (SyncL2BatchNorm works on CPU) or drop --sync-bn")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _tensorboard(cfg: TrainConfig, out: Path, env: DistEnv) -> Any:
    if not (cfg.tensorboard and env.is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("note: tensorboard not installed; skipping TensorBoard logs (pip install tensorboard)", file=sys.stderr)
        return None
    return SummaryWriter(str(out / "tb"))


def _progress(cfg: TrainConfig, env: DistEnv, total: int, desc: str) -> Any:
    if not (cfg.progress and env.is_main):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
