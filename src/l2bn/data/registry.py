"""The dataset registry and the :class:`DataBundle` every loader returns."""

from __future__ import annotations

import dataclasses
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
    val_x: Optional[Tensor] = None  # examples held out of training (split_train)
    val_y: Optional[Tensor] = None
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
        return self.split_train(n, 0, seed)

    def split_train(self, n_train: int, n_val: int, seed: int = 0) -> DataBundle:
        """Train on ``n_train`` training examples (0: all but the held-out ones) and hold out
        ``n_val`` others as ``val_x``/``val_y``: stratified, disjoint, the same for every seed of
        a comparison.

        The examples come from one class-balanced order (classes taken round-robin, each
        class shuffled with ``seed``): the training subset is its first ``n_train`` examples,
        with or without a held-out split, and the held-out examples the ``n_val`` after them.
        With ``n_train == 0`` the first ``n_val`` are held out and training keeps every other
        example.

        Raises:
            BadInput: a held-out split of a folder dataset, or more examples asked for than the
                balanced order has.
        """
        if not self.in_memory:
            if n_val:
                raise BadInput(
                    f"val_size {n_val}: a held-out split needs an in-memory dataset; {self.name} "
                    f"is read from folders (hold out a folder of its own instead)"
                )
            return self
        if n_val <= 0 and (n_train <= 0 or n_train >= len(self.train_y)):
            return self
        g = torch.Generator().manual_seed(seed)
        per_class = []
        for c in range(self.num_classes):
            idx = (self.train_y == c).nonzero().flatten()
            per_class.append(idx[torch.randperm(len(idx), generator=g)])
        # round-robin over classes keeps the subset balanced
        order = torch.stack([p[: min(len(p) for p in per_class)] for p in per_class], 1).flatten()
        if n_val <= 0:
            keep = order[:n_train]
            return dataclasses.replace(self, train_x=self.train_x[keep], train_y=self.train_y[keep])
        if n_train + n_val > len(order):
            raise BadInput(
                f"train_subset {n_train} + val_size {n_val} = {n_train + n_val} examples, but "
                f"{self.name} has {len(order)} in class-balanced order ({len(self.train_y)} "
                f"training examples): lower one of them"
            )
        if n_train > 0:
            keep, held = order[:n_train], order[n_train : n_train + n_val]
        else:
            held = order[:n_val]
            rest = torch.ones(len(self.train_y), dtype=torch.bool)
            rest[held] = False
            keep = rest.nonzero().flatten()
        return dataclasses.replace(
            self,
            train_x=self.train_x[keep],
            train_y=self.train_y[keep],
            val_x=self.train_x[held],
            val_y=self.train_y[held],
        )


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
