"""scikit-learn's bundled 8x8 handwritten digits (1,797 images): the zero-setup smoke dataset.

A fixed, stratified 80/20 train/test split (seed 0).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..io import MissingDependency
from .registry import DataBundle, register_dataset


@register_dataset("digits")
def load_digits(data_dir: Optional[str] = None) -> DataBundle:
    """8x8 digits, values 0..16 rescaled to uint8 0..255."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:  # pragma: no cover
        raise MissingDependency(
            "the 'digits' dataset needs scikit-learn: pip install 'l2bn[vision]'"
        ) from e
    d = sk_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype("uint8")).unsqueeze(1)
    y = torch.from_numpy(d.target).long()
    g = torch.Generator().manual_seed(0)
    test_idx = []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(idx[: len(idx) // 5])
    test = torch.cat(test_idx)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[test] = False
    return DataBundle(
        name="digits",
        num_classes=10,
        input_shape=(1, 8, 8),
        train_x=x[mask],
        train_y=y[mask],
        test_x=x[test],
        test_y=y[test],
        mean=(0.3,),
        std=(0.4,),
        augment="none",
        classes=[str(i) for i in range(10)],
        source="sklearn",
    )
