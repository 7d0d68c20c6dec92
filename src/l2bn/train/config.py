"""The training recipe as one dataclass; YAML files and command-line flags set its fields.

Unknown keys are errors that name the key (no silent typos).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional


@dataclass
class TrainConfig:
    """One training run. Every field is a ``l2bn train`` flag (``--batch-size`` for ``batch_size``)."""

    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
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
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    wd_on_norm_and_bias: bool = False
    schedule: str = "cosine"  # cosine | step | onecycle | constant
    warmup_epochs: float = 0.0
    milestones: List[float] = field(default_factory=lambda: [0.5, 0.75])  # step: fractions or epochs
    gamma: float = 0.1
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    mixup: float = 0.0  # alpha of Beta(alpha, alpha); 0: off
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

    def dataset_options(self) -> Dict[str, Any]:
        """Loader keyword arguments (audio front-end overrides, for audio datasets only)."""
        from ..data.audio import AUDIO_DATASETS

        if self.dataset not in AUDIO_DATASETS:
            return {}
        return {k: v for k, v in dict(sample_rate=self.sample_rate, seconds=self.clip_seconds, n_fft=self.n_fft,
                                      hop_length=self.hop_length, n_mels=self.n_mels).items() if v}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def check_keys(d: Dict[str, Any], where: str) -> None:
    for k in d:
        if k.replace("-", "_") not in FIELDS:
            close = difflib.get_close_matches(k.replace("-", "_"), FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown config key {k!r}{hint}")


def load_config(path: str) -> Dict[str, Any]:
    """Read a YAML recipe into a dict of :class:`TrainConfig` fields (checked)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    with open(p) as f:
        d = yaml.safe_load(f) or {}
    if not isinstance(d, dict):
        raise ValueError(f"{p}: expected a mapping of config keys, got {type(d).__name__}")
    check_keys(d, str(p))
    return {k.replace("-", "_"): v for k, v in d.items()}


def make_config(overrides: Dict[str, Any], config_file: Optional[str] = None) -> TrainConfig:
    """Defaults, then the YAML file, then explicit overrides (command line)."""
    values: Dict[str, Any] = {}
    if config_file:
        values.update(load_config(config_file))
    check_keys(overrides, "arguments")
    values.update({k.replace("-", "_"): v for k, v in overrides.items()})
    return TrainConfig(**values)
