"""Dataset registry: ``load_dataset(name, data_dir)`` -> :class:`DataBundle`.

Small datasets (digits, Fashion-MNIST, CIFAR) are returned as uint8/float tensors to be held on
the training device and augmented there in batch; large ones (image folders) as torchvision
datasets for a DataLoader with workers.
"""

from . import audio, cifar, digits, fashion_mnist, imagefolder  # noqa: E402,F401  (register)
from .registry import (
    DATASETS,
    DataBundle,
    DataNotFoundError,
    list_datasets,
    load_dataset,
    register_dataset,
)

__all__ = [
    "DATASETS",
    "DataBundle",
    "DataNotFoundError",
    "list_datasets",
    "load_dataset",
    "register_dataset",
]
