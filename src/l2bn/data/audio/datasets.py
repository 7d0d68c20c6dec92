"""Audio datasets: ``dcase2020-1a`` (TAU Urban Acoustic Scenes 2020 Mobile, development set),
``audio-folder`` (WAVs + ``labels.csv``) and ``spoken-digits`` (synthetic, generated offline).

Features: cached log-mel (:mod:`l2bn.data.audio.cache`), held in memory as (N, 1, mels, frames);
deltas
are stacked to 3 channels on the training device (``transform="deltas"``: 431 -> 423 frames for
DCASE) and training uses random temporal crops (:mod:`l2bn.data.augment`): for
``dcase2020-1a`` an independent 400-frame window per clip (``tcrop400-each``, as Hu et al.);
evaluation uses the full 423 frames.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..registry import DataBundle, DataNotFoundError, register_dataset

AUDIO_DATASETS = {"dcase2020-1a", "audio-folder", "spoken-digits"}
DCASE_DEVICES = ["a", "b", "c", "s1", "s2", "s3", "s4", "s5", "s6"]


def _fe(defaults, options: Dict) -> object:
    from .features import FrontEnd

    base = dataclasses.asdict(defaults) if defaults is not None else {}
    base.update({k: v for k, v in options.items() if v})
    return FrontEnd(**base)


def _read_rows(path: Path, delimiter: str) -> List[Dict[str, str]]:
    if not path.is_file():
        raise DataNotFoundError(f"{path}: file not found")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter=delimiter))
    if not rows:
        raise DataNotFoundError(f"{path}: no rows")
    return rows


def _features(
    root: Path, names: List[str], fe, label_file: Path, progress: bool = True
) -> torch.Tensor:
    from .cache import extract

    files = []
    for i, n in enumerate(names):
        p = root / n
        if not p.is_file():
            raise DataNotFoundError(
                f"{label_file}: row {i + 2} names {n!r}, but {p} does not exist"
            )
        files.append(p)
    return extract(files, fe, root / ".l2bn-cache", progress=progress)


def device_of(filename: str) -> str:
    """DCASE 2020 1A device id from a file name like ``audio/airport-barcelona-0-0-s2.wav``."""
    return Path(filename).stem.rsplit("-", 1)[-1]


@register_dataset("dcase2020-1a")
def load_dcase2020_1a(data_dir: Optional[str] = None, **options) -> DataBundle:
    """The official development layout: ``audio/*.wav``, ``meta.csv`` and
    ``evaluation_setup/fold1_{train,evaluate}.csv`` (tab-separated, header ``filename
    scene_label``); the official fold-1 split (13,965 / 2,970 clips); per-device test groups.
    Hu et al.'s front-end (:class:`l2bn.data.audio.FrontEnd` defaults, reflect edge padding, float32
    cache); inputs (3, 128, 423); training augmentation ``tcrop400-each``."""
    from .features import FrontEnd

    if not data_dir:
        raise DataNotFoundError(
            "dcase2020-1a needs --data-dir pointing at "
            "TAU-urban-acoustic-scenes-2020-mobile-development/"
        )
    root = Path(data_dir)
    setup = root / "evaluation_setup"
    train_rows = _read_rows(setup / "fold1_train.csv", "\t")
    test_rows = _read_rows(setup / "fold1_evaluate.csv", "\t")
    for rows, p in (
        (train_rows, setup / "fold1_train.csv"),
        (test_rows, setup / "fold1_evaluate.csv"),
    ):
        if "filename" not in rows[0] or "scene_label" not in rows[0]:
            raise DataNotFoundError(
                f"{p}: expected tab-separated columns 'filename' and 'scene_label', got "
                f"{list(rows[0])}"
            )
    classes = sorted({r["scene_label"] for r in train_rows})
    cidx = {c: i for i, c in enumerate(classes)}
    fe = _fe(FrontEnd(), options)
    xtr = _features(root, [r["filename"] for r in train_rows], fe, setup / "fold1_train.csv")
    xte = _features(root, [r["filename"] for r in test_rows], fe, setup / "fold1_evaluate.csv")
    unknown = sorted({r["scene_label"] for r in test_rows} - set(classes))
    if unknown:
        raise DataNotFoundError(
            f"{setup / 'fold1_evaluate.csv'}: scene labels {unknown} not in the training split"
        )
    return DataBundle(
        name="dcase2020-1a",
        num_classes=len(classes),
        input_shape=(3, fe.n_mels, fe.n_frames - 8),
        train_x=xtr,
        train_y=torch.tensor([cidx[r["scene_label"]] for r in train_rows]),
        test_x=xte,
        test_y=torch.tensor([cidx[r["scene_label"]] for r in test_rows]),
        mean=(0.0,),
        std=(1.0,),
        augment="tcrop400-each",
        transform="deltas",
        classes=classes,
        source=str(root),
        test_groups=[device_of(r["filename"]) for r in test_rows],
    )


def _load_folder(root: Path, fe, name: str, seed: int = 0) -> DataBundle:
    label_file = next(
        (root / f for f in ("labels.csv", "metadata.csv") if (root / f).is_file()), None
    )
    if label_file is None:
        raise DataNotFoundError(
            f"{root}: no labels.csv (expected a CSV with columns filename,label[,split])"
        )
    rows = _read_rows(label_file, ",")
    if "filename" not in rows[0] or "label" not in rows[0]:
        raise DataNotFoundError(
            f"{label_file}: expected columns 'filename' and 'label', got {list(rows[0])}"
        )
    classes = sorted({r["label"] for r in rows})
    cidx = {c: i for i, c in enumerate(classes)}
    if "split" in rows[0]:
        bad = sorted({r["split"] for r in rows} - {"train", "test", "val"})
        if bad:
            raise DataNotFoundError(f"{label_file}: split must be train, test or val, found {bad}")
        is_test = [r["split"] in ("test", "val") for r in rows]
    else:  # deterministic stratified 80/20
        g = torch.Generator().manual_seed(seed)
        is_test = [False] * len(rows)
        for c in classes:
            idx = [i for i, r in enumerate(rows) if r["label"] == c]
            perm = torch.randperm(len(idx), generator=g).tolist()
            for j in perm[: len(idx) // 5]:
                is_test[idx[j]] = True
    feats = _features(root, [r["filename"] for r in rows], fe, label_file)
    y = torch.tensor([cidx[r["label"]] for r in rows])
    test = torch.tensor(is_test)
    if test.all() or not test.any():
        raise DataNotFoundError(f"{label_file}: need both training and test clips")
    return DataBundle(
        name=name,
        num_classes=len(classes),
        input_shape=(3, fe.n_mels, fe.n_frames - 8),
        train_x=feats[~test],
        train_y=y[~test],
        test_x=feats[test],
        test_y=y[test],
        mean=(0.0,),
        std=(1.0,),
        augment="none",
        transform="deltas",
        classes=classes,
        source=str(root),
    )


@register_dataset("audio-folder")
def load_audio_folder(data_dir: Optional[str] = None, **options) -> DataBundle:
    """Any folder of WAVs with ``labels.csv`` (``filename,label[,split]``); DCASE front-end
    defaults unless overridden (``--sample-rate``, ``--n-mels``, ...)."""
    from .features import FrontEnd

    if not data_dir:
        raise DataNotFoundError(
            "audio-folder needs --data-dir (a folder with labels.csv and the WAV files)"
        )
    return _load_folder(Path(data_dir), _fe(FrontEnd(), options), "audio-folder")


# The demo keeps the zero edge padding its published numbers were made with (DCASE uses reflect).
SPOKEN_DIGITS_FE = dict(
    sample_rate=16000, seconds=1.0, n_fft=512, hop_length=128, n_mels=64, pad_mode="constant"
)


@register_dataset("spoken-digits")
def load_spoken_digits(data_dir: Optional[str] = None, **options) -> DataBundle:
    """The synthetic espeak-ng digits (generated on first use into ``data_dir`` or
    ``~/.cache/l2bn/spoken-digits``): 16 kHz, 1 s, 64 mel bands, hop 128."""
    from .features import FrontEnd
    from .spoken_digits import ensure

    root = ensure(data_dir)
    b = _load_folder(root, _fe(FrontEnd(**SPOKEN_DIGITS_FE), options), "spoken-digits")
    return dataclasses.replace(b, augment="tcrop100")
