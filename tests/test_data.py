"""Dataset loaders on fixtures in the exact on-disk formats; missing or corrupt data errors."""

import gzip

import pytest
import torch
from fixtures import make_cifar, make_fashion_mnist, make_imagefolder

from l2bn.data import DataNotFoundError, load_dataset
from l2bn.data import augment as aug
from l2bn.data.fashion_mnist import FILES, read_idx


def test_fashion_mnist_round_trip(tmp_path):
    make_fashion_mnist(tmp_path / "fm", 50, 20)
    b = load_dataset("fashion-mnist", str(tmp_path / "fm"), download=False, verify_data=False)
    assert b.train_x.shape == (50, 1, 28, 28) and b.train_x.dtype == torch.uint8
    assert b.test_y.shape == (20,) and b.num_classes == 10
    raw = read_idx(tmp_path / "fm" / FILES["train_x"])
    assert torch.equal(b.train_x[:, 0], torch.from_numpy(raw.copy()))


def test_fashion_mnist_missing_lists_places(tmp_path, monkeypatch):
    monkeypatch.setenv("L2BN_DATA", str(tmp_path / "envdir"))
    monkeypatch.setattr("l2bn.data.fashion_mnist.DEBIAN_DIR", str(tmp_path / "nodebian"))
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("fashion-mnist", None, download=False)
    msg = str(e.value)
    assert str(tmp_path / "envdir") in msg and str(tmp_path / "nodebian") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg


def test_explicit_data_dir_is_the_only_place(tmp_path):
    # a --data-dir that does not exist is an error naming it (not a silent fall-back to Debian's
    # copy)
    with pytest.raises(DataNotFoundError, match=f"{tmp_path / 'nonexistent'} does not exist"):
        load_dataset("fashion-mnist", str(tmp_path / "nonexistent"))
    # an existing one without the files is not replaced by another copy either
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="Fashion-MNIST not found") as e:
        load_dataset("fashion-mnist", str(tmp_path / "empty"))
    assert "/usr/share/datasets" not in str(e.value).split("Get it")[0]


def test_fashion_mnist_checksums(tmp_path):
    import shutil
    from pathlib import Path

    from l2bn.data.integrity import DataIntegrityError

    make_fashion_mnist(tmp_path / "fm", 30, 10)
    with pytest.raises(
        DataIntegrityError,
        match="train-images-idx3-ubyte.gz: not the official fashion-mnist file.*--no-verify-data",
    ):
        load_dataset("fashion-mnist", str(tmp_path / "fm"))
    debian = Path("/usr/share/datasets/fashion-mnist")
    assert debian.is_dir(), "apt-get install dataset-fashion-mnist (scripts/install.sh does it)"
    b = load_dataset("fashion-mnist", str(debian))  # the official content verifies
    assert len(b.train_y) == 60000 and len(b.test_y) == 10000
    # one changed pixel in an official-size copy is caught and the file named
    work = tmp_path / "copy"
    shutil.copytree(debian, work)
    raw = bytearray(gzip.open(work / FILES["test_x"]).read())
    raw[5000] ^= 1
    with gzip.open(work / FILES["test_x"], "wb") as f:
        f.write(bytes(raw))
    with pytest.raises(DataIntegrityError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", str(work))
    assert len(load_dataset("fashion-mnist", str(work), verify_data=False).test_y) == 10000


def test_fashion_mnist_truncated(tmp_path):
    root = make_fashion_mnist(tmp_path / "fm", 30, 10)
    p = root / FILES["train_x"]
    data = gzip.open(p).read()
    with gzip.open(p, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(DataNotFoundError, match="truncated or corrupt idx file"):
        load_dataset("fashion-mnist", str(root), download=False, verify_data=False)
    p.write_bytes(b"not gzip at all")
    with pytest.raises(DataNotFoundError, match="unreadable or truncated"):
        load_dataset("fashion-mnist", str(root), download=False, verify_data=False)


@pytest.mark.parametrize("which,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_round_trip(tmp_path, which, classes):
    make_cifar(tmp_path, which, n_per_batch=20)
    b = load_dataset(which, str(tmp_path), verify_data=False)
    assert b.train_x.shape == (100, 3, 32, 32) and b.test_x.shape == (20, 3, 32, 32)
    assert b.num_classes == classes and len(b.classes) == classes
    assert b.augment == "crop4-flip"


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10", str(tmp_path))
    make_cifar(tmp_path, "cifar10", n_per_batch=10)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04truncated")
    with pytest.raises(DataNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", str(tmp_path), verify_data=False)


def test_cifar_checksums_name_the_file(tmp_path):
    from l2bn.data.integrity import DataIntegrityError

    make_cifar(tmp_path, "cifar10", n_per_batch=10)
    with pytest.raises(
        DataIntegrityError,
        match="data_batch_1: not the official cifar10 file \\(md5 [0-9a-f]{32}, expected c99caf",
    ):
        load_dataset("cifar10", str(tmp_path))
    make_cifar(tmp_path, "cifar100", n_per_batch=10)
    with pytest.raises(
        DataIntegrityError, match="cifar-100-python/train: not the official cifar100 file"
    ):
        load_dataset("cifar100", str(tmp_path))


def test_imagefolder(tmp_path):
    make_imagefolder(tmp_path / "imgs")
    b = load_dataset("imagefolder", str(tmp_path / "imgs"), image_size=32)
    x, y = b.train_set[0]
    assert x.shape == (3, 32, 32) and b.num_classes == 3
    xv, _ = b.test_set[0]
    assert xv.shape == (3, 32, 32)
    with pytest.raises(DataNotFoundError, match="missing val/"):
        (tmp_path / "bad" / "train" / "a").mkdir(parents=True)
        load_dataset("imagefolder", str(tmp_path / "bad"))


def test_digits_and_subset():
    b = load_dataset("digits")
    assert b.train_x.shape[1:] == (1, 8, 8) and len(b.train_y) + len(b.test_y) == 1797
    s = b.subset_train(100)
    assert len(s.train_y) == 100 and torch.bincount(s.train_y, minlength=10).min() == 10


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'mnist3'.*fashion-mnist"):
        load_dataset("mnist3")


def test_augment_crop_is_translation():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    g = torch.Generator().manual_seed(0)
    y = aug.random_crop(x, 2, g)
    assert y.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(2):  # each output is a 6x6 window of the padded image
        found = any(
            torch.equal(y[i, 0], padded[i, 0, a : a + 6, b : b + 6])
            for a in range(5)
            for b in range(5)
        )
        assert found
    with pytest.raises(ValueError, match="unknown augmentation"):
        aug.apply("rotate", x, g)
