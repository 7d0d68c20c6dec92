"""The dataset registry and the :class:`DataBundle` every loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..io import BadInput, UsageError


class DataNotFoundError(UsageError, FileNotFoundError):
    """The data is missing or unreadable; the message says where we looked and how to get it."""


@dataclass
class DataBundle:
    """A dataset split into train/test.

    In-memory datasets set ``train_x``/``train_y``/``test_x``/``test_y`` (``x`` as uint8 images
    ``(N, C, H, W)`` or float features), ``mean``/``std`` for normalisation and ``augment`` (a
    name understood by :mod:`l2bn.data.augment`). Large datasets set ``train_set``/``test_set``
    (map-style datasets yielding normalised tensors) instead.
    """

    name: str
    num_classes: int
    input_shape: Tuple[int, ...]  # (C, H, W) or (F,)
    train_x: Optional[Tensor] = None
    train_y: Optional[Tensor] = None
    test_x: Optional[Tensor] = None
    test_y: Optional[Tensor] = None
    mean: Sequence[float] = (0.0,)
    std: Sequence[float] = (1.0,)
    augment: str = "none"
    transform: str = (
        "none"  # applied to train and test batches on device ("deltas": 3-channel log-mel)
    )
    test_groups: Optional[List[str]] = None  # e.g. the recording device of each test clip
    train_set: Any = None
    test_set: Any = None
    classes: List[str] = field(default_factory=list)
    source: str = ""

    @property
    def in_memory(self) -> bool:
        return self.train_x is not None

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    def subset_train(self, n: int, seed: int = 0) -> DataBundle:
        """Keep ``n`` training examples, the same for every seed of a comparison (stratified)."""
        if not self.in_memory or n <= 0 or n >= len(self.train_y):
            return self
        g = torch.Generator().manual_seed(seed)
        per_class = []
        for c in range(self.num_classes):
            idx = (self.train_y == c).nonzero().flatten()
            per_class.append(idx[torch.randperm(len(idx), generator=g)])
        # round-robin over classes keeps the subset balanced
        order = torch.stack([p[: min(len(p) for p in per_class)] for p in per_class], 1).flatten()
        keep = order[:n]
        import dataclasses

        return dataclasses.replace(self, train_x=self.train_x[keep], train_y=self.train_y[keep])


DATASETS: Dict[str, Callable[..., DataBundle]] = {}


def register_dataset(name: str) -> Callable:
    def deco(fn: Callable[..., DataBundle]) -> Callable[..., DataBundle]:
        DATASETS[name] = fn
        return fn

    return deco


def list_datasets() -> List[str]:
    return sorted(DATASETS)


def load_dataset(
    name: str, data_dir: Optional[str] = None, verify_data: bool = True, **kwargs: Any
) -> DataBundle:
    """Load dataset ``name`` (see :func:`list_datasets`) from ``data_dir``; ``verify_data`` checks
    the official checksums where the loader knows them (CIFAR, Fashion-MNIST).

    Raises:
        ValueError: unknown dataset name.
        DataNotFoundError: files missing or corrupt (the message says where and how to get them).
    """
    if name not in DATASETS:
        raise BadInput(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    if data_dir is not None and not Path(data_dir).exists():
        raise DataNotFoundError(
            f"{name}: the data directory {data_dir} does not exist (an explicit --data-dir is "
            f"used as given; drop it to use the default locations)"
        )
    import inspect

    fn = DATASETS[name]
    if "verify_data" in inspect.signature(fn).parameters:
        kwargs["verify_data"] = verify_data
    return fn(data_dir=data_dir, **kwargs)
