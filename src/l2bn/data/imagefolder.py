"""ImageNet-style ``DATA_DIR/train/<class>/*.jpg`` and ``DATA_DIR/val/<class>/*.jpg`` folders
(torchvision ``ImageFolder``) with the standard transforms: RandomResizedCrop + flip for
training, resize + center crop for evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .registry import DataBundle, DataNotFoundError, register_dataset

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@register_dataset("imagefolder")
def load_imagefolder(data_dir: Optional[str] = None, image_size: int = 224) -> DataBundle:
    """Image folders; ``image_size`` is the crop size (eval resizes to ``image_size / 0.875``)."""
    from torchvision import datasets, transforms

    if not data_dir:
        raise DataNotFoundError(
            "imagefolder needs --data-dir DATA_DIR containing train/ and val/ class folders"
        )
    root = Path(data_dir)
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise DataNotFoundError(
            f"{root}: missing {', '.join(s + '/' for s in missing)} (expected "
            f"DATA_DIR/train/<class>/*.jpg and DATA_DIR/val/<class>/*.jpg)"
        )
    norm = transforms.Normalize(MEAN, STD)
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            norm,
        ]
    )
    eval_tf = transforms.Compose(
        [
            transforms.Resize(int(round(image_size / 0.875))),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            norm,
        ]
    )
    try:
        train = datasets.ImageFolder(str(root / "train"), train_tf)
        val = datasets.ImageFolder(str(root / "val"), eval_tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataNotFoundError(f"{root}: {e}") from e
    if train.classes != val.classes:
        raise DataNotFoundError(f"{root}: train/ and val/ have different class folders")
    return DataBundle(
        name="imagefolder",
        num_classes=len(train.classes),
        input_shape=(3, image_size, image_size),
        train_set=train,
        test_set=val,
        mean=MEAN,
        std=STD,
        classes=list(train.classes),
        source=str(root),
    )
