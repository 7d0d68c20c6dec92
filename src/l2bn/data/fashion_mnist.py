"""Fashion-MNIST (Xiao et al. 2017) from the four idx ``.gz`` files.

Looked for, in order (an explicit ``--data-dir`` is the only place looked when given):
``--data-dir``, ``$L2BN_DATA`` (and ``fashion-mnist``/``FashionMNIST/raw``
below each), Debian's ``/usr/share/datasets/fashion-mnist`` (``apt-get install
dataset-fashion-mnist``), torchvision's layout under ``~/.cache/l2bn``; then a torchvision
download is attempted.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from .registry import DataBundle, DataNotFoundError, register_dataset

FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path, verify_data: bool = False) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed) into a numpy array, checking its size and,
    with ``verify_data``, the official checksum of its decompressed bytes."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataNotFoundError(f"{path}: unreadable or truncated idx file ({e})") from e
    if verify_data:
        from .integrity import verify

        verify("fashion-mnist", path, data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise DataNotFoundError(f"{path}: not an idx file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise DataNotFoundError(
            f"{path}: truncated or corrupt idx file: header says {dims} ({expected} bytes), found "
            f"{len(body)} bytes"
        )
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as a gzip-compressed idx file (used by tests to build fixtures)."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def candidate_dirs(data_dir: Optional[str]) -> List[Path]:
    """Where the files are looked for; an explicit ``data_dir`` is the only place looked."""
    if data_dir:
        r = Path(data_dir)
        return [r, r / "fashion-mnist", r / "FashionMNIST" / "raw"]
    roots: List[Path] = []
    if os.environ.get("L2BN_DATA"):
        roots.append(Path(os.environ["L2BN_DATA"]))
    out: List[Path] = []
    for r in roots:
        out += [r, r / "fashion-mnist", r / "FashionMNIST" / "raw"]
    out.append(Path(DEBIAN_DIR))
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "l2bn"
    out.append(cache / "FashionMNIST" / "raw")
    return out


def _find(data_dir: Optional[str]) -> Tuple[Optional[Path], List[Path]]:
    dirs = candidate_dirs(data_dir)
    for d in dirs:
        if all((d / f).is_file() for f in FILES.values()):
            return d, dirs
    return None, dirs


def _try_download(dirs: List[Path]) -> Tuple[Optional[Path], str]:
    target = dirs[-1].parent.parent  # the cache root, torchvision layout below it
    try:
        import socket

        import torchvision

        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(15)
        try:
            torchvision.datasets.FashionMNIST(str(target), train=True, download=True)
            torchvision.datasets.FashionMNIST(str(target), train=False, download=True)
        finally:
            socket.setdefaulttimeout(old)
        d = target / "FashionMNIST" / "raw"
        return (d if all((d / f).is_file() for f in FILES.values()) else None), ""
    except Exception as e:  # offline, no torchvision, ...
        return None, f"{type(e).__name__}: {e}"


@register_dataset("fashion-mnist")
def load_fashion_mnist(
    data_dir: Optional[str] = None, download: bool = True, verify_data: bool = True
) -> DataBundle:
    """Fashion-MNIST: 60k/10k 28x28 grayscale images, 10 classes (checksums verified)."""
    found, dirs = _find(data_dir)
    why = ""
    if found is None and download and not data_dir:
        found, why = _try_download(dirs)
    if found is None:
        looked = "\n".join(f"  - {d}" for d in dirs)
        raise DataNotFoundError(
            "Fashion-MNIST not found. Looked for the four files "
            f"({', '.join(FILES.values())}) in:\n{looked}\n"
            + (f"Download with torchvision failed ({why}).\n" if why else "")
            + "Get it either way:\n"
            f"  1. Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist   (installs "
            f"{DEBIAN_DIR})\n"
            "  2. online: rerun with network access (torchvision downloads it to ~/.cache/l2bn), "
            "or put\n"
            "     the four .gz files in a folder and pass --data-dir FOLDER (or set L2BN_DATA)."
        )
    arrays = {k: read_idx(found / f, verify_data) for k, f in FILES.items()}
    for split in ("train", "test"):
        if len(arrays[f"{split}_x"]) != len(arrays[f"{split}_y"]):
            raise DataNotFoundError(f"{found}: {split} images and labels differ in count")
    return DataBundle(
        name="fashion-mnist",
        num_classes=10,
        input_shape=(1, 28, 28),
        train_x=torch.from_numpy(arrays["train_x"].copy()).unsqueeze(1),
        train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x=torch.from_numpy(arrays["test_x"].copy()).unsqueeze(1),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
        mean=(0.2860,),
        std=(0.3530,),
        augment="crop2-flip",
        classes=CLASSES,
        source=str(found),
    )
