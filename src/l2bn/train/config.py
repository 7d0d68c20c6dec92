"""The training recipe as one dataclass; YAML files and command-line flags set its fields.

Why one file: each field's default, help text and allowed values (its metadata), the checks
that read that metadata, and the rules for recipes saved in run directories all work on the one
table :data:`FIELDS`; split apart, each piece would import the others.

Unknown keys are errors that name the key (no silent typos). :meth:`TrainConfig.recipe` is the
one definition of what identifies a run (as opposed to run control: progress bars, TensorBoard,
threads, ...); ``compare`` (skip finished runs), the report and ``--resume``/``--test-only`` all
use it. :func:`config_for_run` reads the recipe back from an existing run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..io import UsageError


def _f(
    default: Any,
    help: str,
    *,
    choices: Any = None,
    ge: Any = None,
    gt: Any = None,
    le: Any = None,
    shown: Optional[str] = None,
) -> Any:
    """A recipe field: its default, what it does (the ``--help`` text and the docs), and what
    values it accepts (``choices``: a tuple, or a callable returning one, for registries;
    ``shown``: the choices in words where they are too many to list)."""
    meta = dict(help=help, choices=choices, ge=ge, gt=gt, le=le, shown=shown)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _datasets() -> Tuple[str, ...]:
    from ..data import list_datasets

    return tuple(list_datasets())


def _models() -> Tuple[str, ...]:
    from ..models import list_models

    return tuple(list_models())


def _norms() -> Tuple[str, ...]:
    from ..factory import NORM_ALIASES

    return NORM_ALIASES


@dataclass
class TrainConfig:
    """One training run. Every field is a ``l2bn train`` flag (``--batch-size`` for ``batch_size``);
    its metadata says what it does and which values it takes (:func:`check_values`)."""

    dataset: str = _f("fashion-mnist", "dataset name", choices=_datasets)
    data_dir: Optional[str] = _f(
        None, "directory of the dataset's files (None: the dataset's usual place)"
    )
    verify_data: bool = _f(True, "check the official checksums of CIFAR / Fashion-MNIST files")
    model: str = _f("resnet8", "model name", choices=_models)
    norm: str = _f(
        "l2bn",
        "normalization layer",
        choices=_norms,
        shown="one of bn, l2bn, l2bn-rms, syncbn, sync-l2bn, sync-l2bn-rms, none (any case)",
    )
    epochs: int = _f(10, "training epochs", ge=1)
    batch_size: int = _f(128, "batch size per process", ge=1)
    seed: int = _f(0, "random seed (data order, initialisation, augmentation)", ge=0)
    out: str = _f("runs/default", "run directory (checkpoints, metrics, result.json)")
    train_subset: int = _f(0, "train on the first N training examples (0: all)", ge=0)
    val_size: int = _f(
        0,
        "hold out N other training examples (stratified, the same for every seed); accuracy on "
        "them after the last epoch is the run's val_acc, for choosing hyper-parameters without "
        "the test set (0: none)",
        ge=0,
    )
    width: int = _f(1, "channel multiplier of the CIFAR ResNets", ge=1)
    # optimisation
    optimizer: str = _f("sgd", "optimizer", choices=("sgd", "adamw"))
    lr: float = _f(0.1, "peak learning rate", gt=0)
    lr_ref_batch: int = _f(
        0, "linear scaling rule: the lr used is lr * batch_size / lr_ref_batch (0: off)", ge=0
    )
    momentum: float = _f(0.9, "SGD momentum", ge=0, le=1)
    nesterov: bool = _f(True, "Nesterov momentum (SGD)")
    weight_decay: float = _f(
        5e-4, "weight decay (on weights of rank >= 2 unless --wd-on-norm-and-bias)", ge=0
    )
    wd_on_norm_and_bias: bool = _f(False, "also decay norm scales and biases")
    schedule: str = _f(
        "cosine",
        "learning-rate schedule",
        choices=("cosine", "step", "onecycle", "sgdr", "constant"),
    )
    sgdr_t0: float = _f(
        2.0, "sgdr: first cycle length in epochs (then x sgdr_mult each restart)", gt=0
    )
    sgdr_mult: int = _f(2, "sgdr: cycle length multiplier", ge=1)
    lr_decay: float = _f(
        0.0, "Keras-style inverse-time decay per step: lr / (1 + lr_decay * step)", ge=0
    )
    warmup_epochs: float = _f(0.0, "linear warm-up epochs", ge=0)
    milestones: List[float] = _f(
        [0.5, 0.75], "step schedule: milestones as fractions of the run (< 1) or epochs", ge=0
    )
    gamma: float = _f(0.1, "step schedule: lr factor at each milestone", gt=0)
    min_lr: float = _f(0.0, "lowest learning rate of the cosine/sgdr schedules", ge=0)
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy", ge=0, le=1)
    mixup: float = _f(0.0, "mixup alpha of Beta(alpha, alpha) (0: off)", ge=0)
    mixup_mode: str = _f(
        "batch",
        "mixup partners: batch (one lambda per batch) or pairs (Hu et al.)",
        choices=("batch", "pairs"),
    )
    augment: str = _f(
        "", "training augmentation, l2bn.data.augment names joined by '+' (default: the dataset's)"
    )
    bn_eps: Optional[float] = _f(None, "norm-layer eps for the models that take it (dcase-*)", gt=0)
    bn_momentum: Optional[float] = _f(
        None, "norm-layer momentum for the models that take it (dcase-*)", ge=0, le=1
    )
    # numerics / speed
    amp: str = _f("none", "mixed precision", choices=("none", "bf16", "fp16"))
    channels_last: bool = _f(False, "channels_last memory format")
    compile: bool = _f(False, "torch.compile the model")
    deterministic: bool = _f(False, "deterministic algorithms (torch.use_deterministic_algorithms)")
    device: str = _f("auto", "device: auto, cpu, cuda or cuda:N")
    workers: int = _f(4, "DataLoader workers for folder datasets", ge=0)
    threads: int = _f(0, "torch CPU threads (0: torch's default)", ge=0)
    # audio front-end overrides (0: the dataset's default)
    sample_rate: int = _f(0, "audio: sample rate in Hz (0: the dataset's)", ge=0)
    clip_seconds: float = _f(0.0, "audio: clip length in seconds (0: the dataset's)", ge=0)
    n_fft: int = _f(0, "audio: FFT size (0: the dataset's)", ge=0)
    hop_length: int = _f(0, "audio: hop length (0: the dataset's)", ge=0)
    n_mels: int = _f(0, "audio: mel bands (0: the dataset's)", ge=0)
    # distributed
    sync_bn: bool = _f(False, "synchronised norm layers across processes (under torchrun)")
    # run control
    resume: bool = _f(False, "continue the run in --out from its last checkpoint")
    test_only: bool = _f(
        False, "evaluate the run in --out (best.pt, else last.pt) without training"
    )
    eval_every: int = _f(1, "evaluate on the test set every N epochs (and after the last)", ge=1)
    progress: bool = _f(True, "progress bar")
    tensorboard: bool = _f(True, "TensorBoard logs in OUT/tb")
    max_steps_per_epoch: int = _f(
        0, "cap on steps per epoch, for smoke tests (0: full epochs)", ge=0
    )

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def effective_lr(self) -> float:
        """The peak learning rate: ``lr``, times ``batch_size / lr_ref_batch`` if that is set."""
        return self.lr * self.batch_size / self.lr_ref_batch if self.lr_ref_batch > 0 else self.lr

    @classmethod
    def from_record(cls, record: Dict[str, Any]) -> TrainConfig:
        """The config a run recorded (``config.json``, ``result.json``, a checkpoint's
        ``config``): keys of other l2bn versions that this one does not know are left out, keys
        it does not record take their defaults.

        Example:
            >>> TrainConfig.from_record({"norm": "bn", "epochs": 3, "key_from_elsewhere": 1}).epochs
            3
        """
        return cls(**{k: v for k, v in record.items() if k in cls.__dataclass_fields__})

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
        return {
            k: v
            for k, v in dict(
                sample_rate=self.sample_rate,
                seconds=self.clip_seconds,
                n_fft=self.n_fft,
                hop_length=self.hop_length,
                n_mels=self.n_mels,
            ).items()
            if v
        }


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)

#: Fields that control how a run executes, not what it computes. Everything else is the recipe.
RUN_CONTROL = frozenset(
    {
        "out",
        "data_dir",
        "verify_data",
        "resume",
        "test_only",
        "progress",
        "tensorboard",
        "threads",
        "device",
        "workers",
        "compile",
        "channels_last",
        "deterministic",
        "eval_every",
    }
)
#: Recipe keys that may change when a run is resumed (extending the number of epochs).
RESUMABLE = frozenset({"epochs"})
AUDIO_KEYS = ("sample_rate", "clip_seconds", "n_fft", "hop_length", "n_mels")


class ConfigError(UsageError, ValueError):
    """A recipe value of the wrong type, out of its range, or not one of its choices."""


def field_type(key: str) -> Tuple[type, bool]:
    """``(base type, None allowed)`` of a field: ``(float, True)`` for ``Optional[float]``,
    ``(list, False)`` for the list of floats."""
    t = _HINTS[key]
    if typing.get_origin(t) in (list, List):
        return list, False
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return (args[0], True) if args else (t, False)


def field_choices(key: str) -> Optional[Tuple[str, ...]]:
    choices = FIELDS[key].metadata.get("choices")
    return choices() if callable(choices) else choices


def expected(key: str) -> str:
    """What field ``key`` accepts, in words (error messages and ``--help``)."""
    base, optional = field_type(key)
    meta = FIELDS[key].metadata
    choices = field_choices(key)
    if meta.get("shown"):
        return meta["shown"]
    if choices:
        return "one of " + ", ".join(choices)
    what = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list of numbers",
    }[base]
    bounds = [
        f"{op} {meta[k]:g}"
        for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="))
        if meta.get(k) is not None
    ]
    if bounds:
        what += (
            (" (each " if base is list else " ")
            + " and ".join(bounds)
            + (")" if base is list else "")
        )
    return what + (" or null" if optional else "")


def _number(v: Any, integral: bool) -> Any:
    """``v`` as a number if that is unambiguous (YAML reads ``1e-2`` as a string), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            return None
    if not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        return None
    if integral:
        return int(v) if float(v).is_integer() else None
    return float(v)


def check_value(key: str, value: Any, where: str) -> Any:
    """``value`` for field ``key``, coerced where unambiguous (``"1e-2"`` -> 0.01, ``64.0`` ->
    64); otherwise :class:`ConfigError` naming ``where``, the key, the value and what is
    expected. No truthy strings: a bool field takes only true or false."""
    base, optional = field_type(key)
    meta = FIELDS[key].metadata
    out: Any = None
    if value is None and optional:
        return None
    if base is bool:
        out = value if isinstance(value, bool) else None
    elif base in (int, float):
        out = _number(value, base is int)
    elif base is str:
        out = value if isinstance(value, str) else None
    elif base is list:
        items = value if isinstance(value, (list, tuple)) else None
        nums = [_number(x, False) for x in items] if items is not None else None
        out = nums if nums is not None and None not in nums else None
    ok = out is not None
    if ok and base is not list and base is not bool and base is not str:
        vals = [out]
    elif ok and base is list:
        vals = out
    else:
        vals = []
    for v in vals:
        ok = (
            ok
            and (meta.get("ge") is None or v >= meta["ge"])
            and (meta.get("gt") is None or v > meta["gt"])
        )
        ok = ok and (meta.get("le") is None or v <= meta["le"])
    choices = field_choices(key)
    if ok and choices and out not in choices and not (key == "norm" and out.lower() in choices):
        ok = False
    if not ok:
        what = (
            f"--{key.replace('_', '-')} {value!r}"
            if where == "arguments"
            else f"{where}: {key} = {value!r}"
        )
        raise ConfigError(f"{what}: expected {expected(key)}")
    return out


def check_values(values: Dict[str, Any], where: str) -> Dict[str, Any]:
    """Every given field checked (:func:`check_value`) and coerced; unknown keys refused."""
    check_keys(values, where)
    return {
        k.replace("-", "_"): check_value(k.replace("-", "_"), v, where) for k, v in values.items()
    }


def check_config(cfg: TrainConfig, where: str = "config") -> TrainConfig:
    """Every field of ``cfg`` checked (:func:`check_value`); ``cfg`` itself if all are valid."""
    for key in FIELDS:
        check_value(key, getattr(cfg, key), where)
    return cfg


class RunConfigError(UsageError, ValueError):
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
    return (
        f"{out} holds a run with another recipe ({items}). A run directory keeps one recipe: "
        f"drop these flags to continue/evaluate the saved run, or use a new --out for a new run."
    )


def check_keys(d: Dict[str, Any], where: str) -> None:
    for k in d:
        if k.replace("-", "_") not in FIELDS:
            close = difflib.get_close_matches(k.replace("-", "_"), FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown config key {k!r}{hint}")


def load_config(path: str, extra_keys: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Read a YAML recipe (a path, or the name of a shipped recipe, :mod:`l2bn.recipes`) into a
    dict of :class:`TrainConfig` fields, each checked and coerced (:func:`check_values`);
    ``extra_keys`` are allowed besides the fields (``grid`` for ``l2bn compare``)."""
    import yaml

    from ..recipes import resolve_recipe

    p = resolve_recipe(path)
    with open(p) as f:
        try:
            d = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p}: expected a mapping of config keys, got {type(d).__name__}")
    extra = {k: v for k, v in d.items() if k in extra_keys}
    return {**check_values({k: v for k, v in d.items() if k not in extra_keys}, str(p)), **extra}


def make_config(overrides: Dict[str, Any], config_file: Optional[str] = None) -> TrainConfig:
    """Defaults, then the YAML file, then explicit overrides (command line).

    With ``resume`` or ``test_only`` and an ``out`` directory that already holds a run, the
    recipe is the run's saved one (:func:`config_for_run`).
    """
    values: Dict[str, Any] = {}
    if config_file:
        values.update(load_config(config_file))
    values.update(check_values(overrides, "arguments"))
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
