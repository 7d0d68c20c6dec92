"""Tiny datasets written in the exact on-disk formats of the real ones (generated, not shipped).

CIFAR batches are pickle protocol 2, as the official (Python 2) files are. They are not the official
files, so loading them needs ``verify_data=False`` (``--no-verify-data``).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from l2bn.data.fashion_mnist import FILES, write_idx


def _class_images(n: int, classes: int, shape, rng: np.random.Generator):
    """Learnable images: class k lights up the k-th horizontal band, plus noise."""
    y = np.arange(n) % classes
    rng.shuffle(y)
    c, h, w = shape
    x = rng.integers(0, 60, size=(n, c, h, w)).astype(np.float64)
    band = max(1, h // classes)
    for i, k in enumerate(y):
        x[i, :, (k * band) % h : (k * band) % h + band, :] += 150 + rng.integers(0, 40)
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def make_fashion_mnist(root: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    xtr, ytr = _class_images(n_train, 10, (1, 28, 28), rng)
    xte, yte = _class_images(n_test, 10, (1, 28, 28), rng)
    write_idx(root / FILES["train_x"], xtr[:, 0])
    write_idx(root / FILES["train_y"], ytr)
    write_idx(root / FILES["test_x"], xte[:, 0])
    write_idx(root / FILES["test_y"], yte)
    return root


def make_cifar(root: Path, which: str = "cifar10", n_per_batch: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    classes = 10 if which == "cifar10" else 100
    if which == "cifar10":
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(1, 6):
            x, y = _class_images(n_per_batch, classes, (3, 32, 32), rng)
            with open(d / f"data_batch_{i}", "wb") as f:
                pickle.dump(
                    {
                        b"batch_label": b"training batch",
                        b"labels": y.tolist(),
                        b"data": x.reshape(len(x), -1),
                        b"filenames": [b"x.png"] * len(x),
                    },
                    f,
                    protocol=2,
                )
        x, y = _class_images(n_per_batch, classes, (3, 32, 32), rng)
        with open(d / "test_batch", "wb") as f:
            pickle.dump(
                {
                    b"batch_label": b"testing batch",
                    b"labels": y.tolist(),
                    b"data": x.reshape(len(x), -1),
                    b"filenames": [b"x.png"] * len(x),
                },
                f,
                protocol=2,
            )
        with open(d / "batches.meta", "wb") as f:
            pickle.dump(
                {
                    b"label_names": [f"c{i}".encode() for i in range(10)],
                    b"num_cases_per_batch": n_per_batch,
                    b"num_vis": 3072,
                },
                f,
                protocol=2,
            )
    else:
        d = root / "cifar-100-python"
        d.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", 5 * n_per_batch), ("test", n_per_batch)):
            x, y = _class_images(n, classes, (3, 32, 32), rng)
            with open(d / split, "wb") as f:
                pickle.dump(
                    {
                        b"filenames": [b"x.png"] * n,
                        b"batch_label": split.encode(),
                        b"fine_labels": y.tolist(),
                        b"coarse_labels": (y // 5).tolist(),
                        b"data": x.reshape(n, -1),
                    },
                    f,
                    protocol=2,
                )
        with open(d / "meta", "wb") as f:
            pickle.dump(
                {
                    b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                    b"coarse_label_names": [f"c{i}".encode() for i in range(20)],
                },
                f,
                protocol=2,
            )
    return root


def make_imagefolder(
    root: Path, classes: int = 3, per_class: int = 4, size: int = 40, seed: int = 0
) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for k in range(classes):
            d = root / split / f"class_{k}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 255, size=(size, size + 8, 3), dtype=np.uint8)
                img[:, :, k % 3] = 255
                Image.fromarray(img).save(d / f"img_{i}.{'png' if i % 2 else 'jpg'}")
    return root
