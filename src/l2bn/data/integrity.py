"""Safe reading and checksums of the datasets' official files.

* :func:`safe_unpickle` reads CIFAR's python-pickle batches with a restricted unpickler that
  builds only what the official files contain — dicts, lists, bytes, str, numbers and numpy
  arrays of numeric dtype — so a crafted batch cannot run code; anything else is refused with an
  error naming the file and the object it asked for.
* :data:`CHECKSUMS` are the publishers' digests of the official files (CIFAR: MD5 of each batch
  file, as torchvision lists them; Fashion-MNIST: SHA-256 of the decompressed idx bytes, which
  also verifies a re-compressed copy such as Debian's ``dataset-fashion-mnist``, whose
  decompressed bytes are the official ones). :func:`verify` names the file that differs;
  ``--no-verify-data`` (``verify_data=False``) skips it for user-made variants.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path
from typing import Any, Dict

from .registry import DataNotFoundError

__all__ = ["safe_unpickle", "verify", "CHECKSUMS", "DataIntegrityError"]

CHECKSUMS: Dict[str, Dict[str, str]] = {
    "cifar10": {  # md5 of the file
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
    "cifar100": {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    },
    "fashion-mnist": {  # sha256 of the decompressed idx bytes
        "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",  # noqa: E501
        "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",  # noqa: E501
        "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",  # noqa: E501
        "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",  # noqa: E501
    },
}
_ALGO = {"cifar10": "md5", "cifar100": "md5", "fashion-mnist": "sha256"}


class DataIntegrityError(DataNotFoundError):
    """A data file is not the official one (checksum) or holds objects the loader refuses."""


def verify(dataset: str, path: Path, payload: bytes) -> None:
    """Check ``payload`` (the file's bytes, or the decompressed bytes for Fashion-MNIST) against
    the official digest of ``path``'s file name; raise :class:`DataIntegrityError` if it differs."""
    want = CHECKSUMS[dataset].get(Path(path).name)
    if want is None:
        return
    got = hashlib.new(_ALGO[dataset], payload).hexdigest()
    if got != want:
        raise DataIntegrityError(
            f"{path}: not the official {dataset} file ({_ALGO[dataset]} {got}, expected {want}). "
            f"Re-download it, "
            f"or pass --no-verify-data (verify_data=False) if this is a deliberate variant of the "
            f"dataset."
        )


class _RestrictedUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def __init__(self, f: Any, path: Path) -> None:
        super().__init__(f, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise DataIntegrityError(
            f"{self.path}: refused — the file asks to load {module}.{name}, which official CIFAR "
            f"batches never "
            f"contain (a crafted pickle could run code this way); only dicts, lists, bytes, "
            f"numbers and numpy arrays are read"
        )


def safe_unpickle(path: Path, payload: bytes) -> Any:
    """Unpickle a CIFAR batch with :class:`_RestrictedUnpickler`; object arrays are refused too."""
    import numpy as np

    try:
        obj = _RestrictedUnpickler(io.BytesIO(payload), path).load()
    except DataIntegrityError:
        raise
    except Exception as e:
        raise DataNotFoundError(
            f"{path}: unreadable or truncated CIFAR batch ({type(e).__name__}: {e})"
        ) from None

    def check(o: Any) -> None:
        if isinstance(o, np.ndarray) and o.dtype.hasobject:
            raise DataIntegrityError(
                f"{path}: refused — an array of Python objects (official batches hold numbers)"
            )
        if isinstance(o, dict):
            for k, v in o.items():
                check(k)
                check(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                check(v)

    check(obj)
    return obj
