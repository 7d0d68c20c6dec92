"""The training recipe as one dataclass; YAML files and command-line flags set its fields.

Unknown keys are errors that name the key (no silent typos). :meth:`TrainConfig.recipe` is the
one definition of what identifies a run (as opposed to run control: progress bars, TensorBoard,
threads, ...); ``compare`` (skip finished runs), the report and ``--resume``/``--test-only`` all
use it. :func:`config_for_run` reads the recipe back from an existing run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple


@dataclass
class TrainConfig:
    """One training run. Every field is a ``l2bn train`` flag (``--batch-size`` for ``batch_size``)."""

    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
    verify_data: bool = True  # check the official checksums of CIFAR / Fashion-MNIST files
    model: str = "resnet8"
    norm: str = "l2bn"
    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    out: str = "runs/default"
    train_subset: int = 0  # 0: the whole training set
    width: int = 1  # channel multiplier of the CIFAR ResNets
    # optimisation
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    lr_ref_batch: int = 0  # >0: linear scaling rule, the lr used is lr * batch_size / lr_ref_batch
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    wd_on_norm_and_bias: bool = False
    schedule: str = "cosine"  # cosine | step | onecycle | sgdr | constant
    sgdr_t0: float = 2.0  # sgdr: first cycle length in epochs (then x sgdr_mult each restart)
    sgdr_mult: int = 2
    lr_decay: float = 0.0  # Keras-style inverse-time decay per step: lr / (1 + lr_decay * step)
    warmup_epochs: float = 0.0
    milestones: List[float] = field(default_factory=lambda: [0.5, 0.75])  # step: fractions or epochs
    gamma: float = 0.1
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    mixup: float = 0.0  # alpha of Beta(alpha, alpha); 0: off
    mixup_mode: str = "batch"  # batch: one lambda, partners from the same batch | pairs: Hu et al. (see below)
    augment: str = ""  # overrides the dataset's training augmentation (l2bn.data.augment names, "+"-joined)
    bn_eps: Optional[float] = None  # norm-layer eps / momentum for the models that take them (dcase-*)
    bn_momentum: Optional[float] = None
    # numerics / speed
    amp: str = "none"  # none | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda
    workers: int = 4  # DataLoader workers for large (folder) datasets
    threads: int = 0  # torch CPU threads; 0: torch's default
    # audio front-end overrides (0: the dataset's default)
    sample_rate: int = 0
    clip_seconds: float = 0.0
    n_fft: int = 0
    hop_length: int = 0
    n_mels: int = 0
    # distributed
    sync_bn: bool = False
    # run control
    resume: bool = False
    test_only: bool = False
    eval_every: int = 1
    progress: bool = True
    tensorboard: bool = True
    max_steps_per_epoch: int = 0  # 0: full epochs (a cap is for smoke tests)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def effective_lr(self) -> float:
        """The peak learning rate: ``lr``, scaled by ``batch_size / lr_ref_batch`` if that is set."""
        return self.lr * self.batch_size / self.lr_ref_batch if self.lr_ref_batch > 0 else self.lr

    def recipe(self) -> Dict[str, Any]:
        """The fields that identify a run: everything except :data:`RUN_CONTROL`.

        Two runs with equal recipes train the same model on the same data the same way (up to
        floating-point order); run control (where output goes, progress, threads, device,
        compile, ...) may differ.

        Example:
            >>> a, b = TrainConfig(progress=False), TrainConfig(threads=2, tensorboard=False)
            >>> a.recipe() == b.recipe(), TrainConfig(lr=0.2).recipe() == a.recipe()
            (True, False)
        """
        return {k: v for k, v in self.to_dict().items() if k not in RUN_CONTROL}

    def recipe_summary(self) -> Dict[str, Any]:
        """The recipe without the keys that do not apply to this run (audio front-end settings
        for an image dataset, schedule parameters of other schedules) — for reports."""
        from ..data.audio import AUDIO_DATASETS

        r = self.recipe()
        drop = set()
        if self.dataset not in AUDIO_DATASETS:
            drop |= set(AUDIO_KEYS)
        if self.schedule != "step":
            drop |= {"milestones", "gamma"}
        if self.schedule != "sgdr":
            drop |= {"sgdr_t0", "sgdr_mult"}
        if self.optimizer != "sgd":
            drop |= {"momentum", "nesterov"}
        if not self.lr_ref_batch:
            drop.add("lr_ref_batch")
        if not self.lr_decay:
            drop.add("lr_decay")
        if not self.augment:
            drop.add("augment")
        if not self.mixup:
            drop.add("mixup_mode")
        drop |= {k for k in ("bn_eps", "bn_momentum") if getattr(self, k) is None}
        return {k: v for k, v in r.items() if k not in drop}

    def dataset_options(self) -> Dict[str, Any]:
        """Loader keyword arguments (audio front-end overrides, for audio datasets only)."""
        from ..data.audio import AUDIO_DATASETS

        if self.dataset not in AUDIO_DATASETS:
            return {}
        return {k: v for k, v in dict(sample_rate=self.sample_rate, seconds=self.clip_seconds, n_fft=self.n_fft,
                                      hop_length=self.hop_length, n_mels=self.n_mels).items() if v}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

#: Fields that control how a run executes, not what it computes. Everything else is the recipe.
RUN_CONTROL = frozenset({
    "out", "data_dir", "verify_data", "resume", "test_only", "progress", "tensorboard", "threads", "device",
    "workers", "compile", "channels_last", "deterministic", "eval_every",
})
#: Recipe keys that may change when a run is resumed (extending the number of epochs).
RESUMABLE = frozenset({"epochs"})
AUDIO_KEYS = ("sample_rate", "clip_seconds", "n_fft", "hop_length", "n_mels")


class RunConfigError(ValueError):
    """Flags that contradict the recipe saved in an existing run directory."""


def saved_config(out: str) -> Optional[Dict[str, Any]]:
    """The config saved in run directory ``out`` (``config.json``), or ``None`` if there is none."""
    from ..io import read_json

    p = Path(out) / "config.json"
    if not p.is_file():
        return None
    d = read_json(p, "run config")
    if not isinstance(d, dict):
        raise RunConfigError(f"{p}: expected a mapping of config keys, got {type(d).__name__}")
    return {k: v for k, v in d.items() if k in FIELDS}


def recipe_conflicts(saved: Dict[str, Any], given: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """``(key, saved value, given value)`` for each recipe key of ``given`` that differs from
    ``saved`` (run control and :data:`RESUMABLE` keys are allowed to differ)."""
    out = []
    for k, v in given.items():
        if k in RUN_CONTROL or k in RESUMABLE or k not in FIELDS:
            continue
        if k in saved and _norm_value(saved[k]) != _norm_value(v):
            out.append((k, saved[k], v))
    return out


def _norm_value(v: Any) -> Any:
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else v


def conflict_message(out: str, conflicts: List[Tuple[str, Any, Any]]) -> str:
    items = "; ".join(f"{k}: saved {a!r}, given {b!r}" for k, a, b in conflicts)
    return (f"{out} holds a run with another recipe ({items}). A run directory keeps one recipe: "
            f"drop these flags to continue/evaluate the saved run, or use a new --out for a new run.")


def check_keys(d: Dict[str, Any], where: str) -> None:
    for k in d:
        if k.replace("-", "_") not in FIELDS:
            close = difflib.get_close_matches(k.replace("-", "_"), FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown config key {k!r}{hint}")


def load_config(path: str, extra_keys: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Read a YAML recipe into a dict of :class:`TrainConfig` fields (checked); ``extra_keys``
    are allowed besides the fields (``grid`` for ``l2bn compare``)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    with open(p) as f:
        d = yaml.safe_load(f) or {}
    if not isinstance(d, dict):
        raise ValueError(f"{p}: expected a mapping of config keys, got {type(d).__name__}")
    check_keys({k: v for k, v in d.items() if k not in extra_keys}, str(p))
    return {k.replace("-", "_"): v for k, v in d.items()}


def make_config(overrides: Dict[str, Any], config_file: Optional[str] = None) -> TrainConfig:
    """Defaults, then the YAML file, then explicit overrides (command line).

    With ``resume`` or ``test_only`` and an ``out`` directory that already holds a run, the
    recipe is the run's saved one (:func:`config_for_run`).
    """
    values: Dict[str, Any] = {}
    if config_file:
        values.update(load_config(config_file))
    check_keys(overrides, "arguments")
    values.update({k.replace("-", "_"): v for k, v in overrides.items()})
    probe = TrainConfig(**values)
    if probe.resume or probe.test_only:
        return config_for_run(values)
    return probe


def config_for_run(given: Dict[str, Any]) -> TrainConfig:
    """The config of an existing run directory ``given['out']``, with ``given``'s run-control
    keys (and a new ``epochs``) applied; any other given key that differs from the saved recipe
    raises :class:`RunConfigError` naming it and its saved value. Without a saved run the given
    values are used as they are."""
    cfg = TrainConfig(**given)
    saved = saved_config(cfg.out)
    if saved is None:
        return cfg
    conflicts = recipe_conflicts(saved, given)
    if conflicts:
        raise RunConfigError(conflict_message(cfg.out, conflicts))
    merged = {**saved, **{k: v for k, v in given.items() if k in RUN_CONTROL or k in RESUMABLE}}
    merged["out"] = cfg.out
    return TrainConfig(**merged)
