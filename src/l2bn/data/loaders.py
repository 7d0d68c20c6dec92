"""Mini-batch loaders with one interface: ``len(loader)`` steps and ``loader.batches(epoch)``.

:class:`TensorBatches` keeps a small dataset on the training device as a tensor and normalises
and augments whole batches there (airbench style); :class:`LoaderBatches` wraps a
``DataLoader`` over a map-style dataset (image folders) with a ``DistributedSampler`` under
``torchrun``. All randomness of epoch ``e`` comes from :func:`epoch_generator` ``(seed, e)``, so
a run resumed after any epoch sees exactly the batches of an uninterrupted run.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Tuple

import torch
from torch import Tensor

from ..io import BadInput
from . import augment as aug
from .registry import DataBundle

__all__ = ["TensorBatches", "LoaderBatches", "epoch_generator", "make_loaders", "make_test_loader"]


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """The CPU generator of (``seed``, ``epoch``); ``stream`` separates independent uses."""
    return torch.Generator().manual_seed(1_000_003 * (seed + 1) + epoch + 7_919 * stream)


class TensorBatches:
    """Shuffled, sharded mini-batches of an in-memory dataset, normalised (and augmented) on device.

    ``rank``/``world_size`` shard the training set (each process gets ``n // world_size``
    examples of one shared permutation); a test loader yields every example in order.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        data: DataBundle,
        device: torch.device,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        max_steps: int = 0,
        pairs: bool = False,
    ) -> None:
        self.x = x.to(device)
        self.y = y.to(device)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = 255.0 if x.dtype == torch.uint8 else 1.0
        self.mean = torch.tensor(data.mean, device=device).reshape(shape) * scale
        self.std = torch.tensor(data.std, device=device).reshape(shape) * scale
        self.augment = data.augment if train else "none"
        self.transform = data.transform
        self.bs, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.channels_last = channels_last and x.dim() == 4
        n = len(self.y) // world_size if train else len(self.y)
        self.pairs = pairs and train
        if (
            self.pairs
        ):  # Hu et al.'s mixup generator: 2B clips per step, ceil(n / B) steps (~2 passes)
            self.steps = math.ceil(n / batch_size)
        else:
            self.steps = (n // batch_size) if train else math.ceil(n / batch_size)
        if train and max_steps:
            self.steps = min(self.steps, max_steps)
        if train and self.steps == 0:
            raise BadInput(
                f"batch size {batch_size} is larger than the per-process training set ({n} "
                f"examples)"
            )

    @property
    def num_examples(self) -> int:
        return len(self.y)

    def __len__(self) -> int:
        return self.steps

    def batches(self, epoch: int = 0) -> Iterator[Tuple[Tensor, Tensor]]:
        """The batches of ``epoch`` (shuffled and augmented with :func:`epoch_generator`)."""
        n = len(self.y)
        gen: Optional[torch.Generator] = None
        if self.train:
            gen = epoch_generator(self.seed, epoch)
            perm = torch.randperm(n, generator=gen)
            per = n // self.world_size
            idx = perm[self.rank * per : (self.rank + 1) * per].to(self.x.device)
        else:
            idx = torch.arange(n, device=self.x.device)
        if self.pairs:
            rows = idx[aug.pair_batch_indices(len(idx), self.bs, self.steps, gen).to(idx.device)]
        for s in range(self.steps):
            b = rows[s] if self.pairs else idx[s * self.bs : (s + 1) * self.bs]
            x = aug.transform(self.transform, (self.x[b].float() - self.mean) / self.std)
            if self.train:
                x = aug.apply(self.augment, x, gen)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.y[b]


class LoaderBatches:
    """``DataLoader`` over a map-style dataset (image folders), sharded: ``DistributedSampler``."""

    def __init__(
        self,
        dataset: Any,
        device: torch.device,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        channels_last: bool = False,
        max_steps: int = 0,
    ) -> None:
        from torch.utils.data import DataLoader, DistributedSampler

        self.dataset = dataset
        self.sampler = (
            DistributedSampler(dataset, world_size, rank, shuffle=train, seed=seed, drop_last=train)
            if world_size > 1
            else None
        )
        self.seed, self.train = seed, train
        self.loader_kw = dict(
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            drop_last=train,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
        )
        self.loader = DataLoader(
            dataset, shuffle=False if self.sampler is not None else None, **self.loader_kw
        )
        self.device, self.channels_last = device, channels_last
        self.steps = min(len(self.loader), max_steps) if (train and max_steps) else len(self.loader)

    @property
    def num_examples(self) -> int:
        return len(self.dataset)

    def __len__(self) -> int:
        return self.steps

    def batches(self, epoch: int = 0) -> Iterator[Tuple[Tensor, Tensor]]:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            it = iter(self.loader)
        elif self.train:
            from torch.utils.data import DataLoader, RandomSampler

            sampler = RandomSampler(self.dataset, generator=epoch_generator(self.seed, epoch))
            it = iter(
                DataLoader(
                    self.dataset,
                    **{**self.loader_kw, "sampler": sampler, "persistent_workers": False},
                )
            )
        else:
            it = iter(self.loader)
        for s, (x, y) in enumerate(it):
            if s >= self.steps:
                break
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)


def make_loaders(
    data: DataBundle,
    device: torch.device,
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    channels_last: bool = False,
    max_steps: int = 0,
    eval_batch_size: Optional[int] = None,
    pairs: bool = False,
) -> Tuple[Any, Any]:
    """(train, test) loaders for ``data``: tensors on ``device`` when the dataset is in memory,
    else ``DataLoader``s. The test loader is not sharded (every rank sees every example)."""
    te = make_test_loader(
        data,
        device,
        eval_batch_size or (max(256, batch_size) if data.in_memory else batch_size),
        workers=workers,
        channels_last=channels_last,
    )
    if data.in_memory:
        tr: Any = TensorBatches(
            data.train_x,
            data.train_y,
            data,
            device,
            batch_size,
            train=True,
            seed=seed,
            rank=rank,
            world_size=world_size,
            channels_last=channels_last,
            max_steps=max_steps,
            pairs=pairs,
        )
    else:
        if pairs:
            raise BadInput("mixup_mode 'pairs' needs an in-memory dataset (not an image folder)")
        tr = LoaderBatches(
            data.train_set,
            device,
            batch_size,
            train=True,
            seed=seed,
            rank=rank,
            world_size=world_size,
            workers=workers,
            channels_last=channels_last,
            max_steps=max_steps,
        )
    return tr, te


def make_test_loader(
    data: DataBundle,
    device: torch.device,
    batch_size: int,
    *,
    workers: int = 0,
    channels_last: bool = False,
) -> Any:
    """The (unsharded, unshuffled, unaugmented) test loader of ``data``."""
    if data.in_memory:
        return TensorBatches(
            data.test_x,
            data.test_y,
            data,
            device,
            batch_size,
            train=False,
            channels_last=channels_last,
        )
    return LoaderBatches(
        data.test_set, device, batch_size, train=False, workers=workers, channels_last=channels_last
    )
