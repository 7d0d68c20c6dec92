"""CIFAR-10/100 from torchvision's on-disk python-pickle format.

``DATA_DIR/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``DATA_DIR/cifar-100-python/{train, test, meta}`` (the archives from the CIFAR page, unpacked).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from .integrity import safe_unpickle, verify
from .registry import DataBundle, DataNotFoundError, register_dataset

_SPEC = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        b"labels",
        b"label_names",
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        ["test"],
        "meta",
        b"fine_labels",
        b"fine_label_names",
    ),
}
_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


def _unpickle(path: Path, dataset: str, check: bool) -> dict:
    """Read one batch: checksum (if ``check``), then the restricted unpickler (never code)."""
    payload = path.read_bytes()
    if check:
        verify(dataset, path, payload)
    d = safe_unpickle(path, payload)
    if not isinstance(d, dict):
        raise DataNotFoundError(f"{path}: expected a dict batch, got {type(d).__name__}")
    return d


def _load_split(
    root: Path, files: List[str], label_key: bytes, dataset: str, check: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for name in files:
        d = _unpickle(root / name, dataset, check)
        if b"data" not in d or label_key not in d:
            raise DataNotFoundError(
                f"{root / name}: not a CIFAR batch (no {b'data'!r}/{label_key!r} entries)"
            )
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
            raise DataNotFoundError(
                f"{root / name}: expected data of shape (N, 3072) and N labels, got {data.shape} "
                f"and {len(labels)}"
            )
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _load(name: str, data_dir: Optional[str], verify_data: bool) -> DataBundle:
    sub, train_files, test_files, meta, label_key, names_key = _SPEC[name]
    candidates = [Path(data_dir) / sub, Path(data_dir)] if data_dir else []
    root = next(
        (c for c in candidates if all((c / f).is_file() for f in train_files + test_files)), None
    )
    if root is None:
        looked = ", ".join(str(c) for c in candidates) or "(no --data-dir given)"
        raise DataNotFoundError(
            f"{name}: files {train_files + test_files} not found in {looked}. Download the python "
            f"version from https://www.cs.toronto.edu/~kriz/cifar.html, unpack it so that "
            f"DATA_DIR/{sub}/ exists, and pass --data-dir DATA_DIR."
        )
    train_x, train_y = _load_split(root, train_files, label_key, name, verify_data)
    test_x, test_y = _load_split(root, test_files, label_key, name, verify_data)
    classes: List[str] = []
    if (root / meta).is_file():
        classes = [c.decode() for c in _unpickle(root / meta, name, verify_data).get(names_key, [])]
    n_cls = 10 if name == "cifar10" else 100
    if int(train_y.max()) >= n_cls or int(train_y.min()) < 0:
        raise DataNotFoundError(f"{root}: labels outside 0..{n_cls - 1}")
    return DataBundle(
        name=name,
        num_classes=n_cls,
        input_shape=(3, 32, 32),
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        mean=_MEAN[name],
        std=_STD[name],
        augment="crop4-flip",
        classes=classes,
        source=str(root),
    )


@register_dataset("cifar10")
def load_cifar10(data_dir: Optional[str] = None, verify_data: bool = True) -> DataBundle:
    """CIFAR-10 (python pickle batches, checksummed and read without running code)."""
    return _load("cifar10", data_dir, verify_data)


@register_dataset("cifar100")
def load_cifar100(data_dir: Optional[str] = None, verify_data: bool = True) -> DataBundle:
    """CIFAR-100 (python pickle, fine labels, checksummed and read without running code)."""
    return _load("cifar100", data_dir, verify_data)
