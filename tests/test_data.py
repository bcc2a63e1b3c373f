"""Data loading (`entropy_search.data`): the registry of data sets, the digits splits, and each real loader on
small files made here."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from entropy_search import data as data_mod
from entropy_search.data import (
    DataSplits,
    default_data_root,
    eval_batch,
    list_datasets,
    load_data,
    register_dataset,
    split_heldout,
    with_heldout,
)
from entropy_search.errors import ConfigError, DataUnavailableError, EntropySearchError


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_data("digits")


# ---------------------------------------------------------------- digits


def test_digits_shapes_and_sizes(digits):
    assert (digits.num_classes, digits.in_channels, digits.image_size) == (10, 1, 8)
    assert len(digits.train) + len(digits.heldout) == 1437 and len(digits.test) == 360
    assert len(digits.heldout) == round(0.1 * 1437)
    x, y = digits.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    xs = torch.stack([digits.train_eval[i][0] for i in range(len(digits.train_eval))])
    assert abs(xs.mean().item()) < 0.1 and abs(xs.std().item() - 1) < 0.1  # normalised


def test_digits_heldout_is_disjoint_part_of_train_not_test(digits):
    train_idx, heldout_idx = set(digits.train.indices), set(digits.heldout.indices)
    assert not train_idx & heldout_idx
    assert train_idx | heldout_idx == set(range(1437))
    # the held-out part indexes the same image tensor as the training part; the test split is another one
    assert digits.heldout.dataset.images is digits.train.dataset.images
    assert digits.test.images is not digits.train.dataset.images
    assert len(set(np.unique(digits.heldout.dataset.labels[list(heldout_idx)].numpy()))) == 10  # stratified


def test_digits_test_split_is_fixed_and_heldout_follows_seed(digits):
    again = load_data("digits")
    other = load_data("digits", seed=1)
    assert digits.heldout.indices == again.heldout.indices and digits.train.indices == again.train.indices
    assert torch.equal(digits.test.images, other.test.images)  # the test split does not depend on seed
    assert digits.heldout.indices != other.heldout.indices


def test_heldout_fraction(digits):
    none = load_data("digits", heldout_fraction=0.0)
    assert len(none.heldout) == 0 and len(none.train) == 1437
    with pytest.raises(ConfigError, match="heldout_fraction"):
        load_data("digits", heldout_fraction=1.0)
    with pytest.raises(ConfigError, match="empty"):
        eval_batch(none, 8)


def test_split_heldout_falls_back_when_too_small_to_stratify():
    train, heldout = split_heldout([0, 1, 2, 3, 4, 5], 0.34, seed=3)
    assert len(heldout) == 2 and sorted(train + heldout) == list(range(6))
    assert split_heldout([0, 1, 2, 3, 4, 5], 0.34, seed=3) == (train, heldout)


def test_eval_batch_is_fixed(digits):
    x1, y1 = eval_batch(digits, 32)
    x2, y2 = eval_batch(digits, 32)
    assert x1.shape == (32, 1, 8, 8) and y1.shape == (32,) and y1.dtype == torch.long
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = eval_batch(digits, 32, seed=1)
    assert not torch.equal(x1, x3)
    xa, ya = eval_batch(digits, 10_000)
    assert len(xa) == len(digits.heldout)
    xt, _ = eval_batch(digits, 16, split="test")
    assert xt.shape == (16, 1, 8, 8)
    xtr, _ = eval_batch(digits, 16, split="train")
    assert xtr.shape == (16, 1, 8, 8)
    with pytest.raises(ConfigError, match="unknown split"):
        eval_batch(digits, 16, split="val")
    with pytest.raises(ConfigError):
        eval_batch(digits, 0)


def test_unknown_dataset_lists_known():
    known = ", ".join(list_datasets())
    with pytest.raises(EntropySearchError, match="cifar10.*imagefolder") as err:
        load_data("mnist3d")
    assert str(err.value) == f"unknown data set 'mnist3d'; known: {known}"
    for name in ("imagefolder", "digits:extra", "cifar10:/tmp"):  # an argument only where the data set takes one
        with pytest.raises(EntropySearchError, match=f"unknown data set '{name}'"):
            load_data(name)


# ---------------------------------------------------------------- the registry


def test_shipped_datasets_are_registered():
    assert list_datasets() == ["digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder:<path>"]
    import entropy_search

    assert entropy_search.list_datasets is list_datasets and entropy_search.register_dataset is register_dataset


@pytest.fixture
def registry(monkeypatch):
    """The registry as it is, restored after the test."""
    monkeypatch.setattr(data_mod, "_DATASETS", dict(data_mod._DATASETS))


def _tiny(name: str, n: int, heldout_fraction: float, seed: int) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(n, 1, 4, 4, generator=g), torch.arange(n) % 2
    train_idx, heldout_idx = split_heldout(labels.tolist(), heldout_fraction, seed)
    full = torch.utils.data.TensorDataset(images, labels)
    return DataSplits(name, torch.utils.data.Subset(full, train_idx), torch.utils.data.Subset(full, heldout_idx),
                      torch.utils.data.TensorDataset(images[:4], labels[:4]), num_classes=2, in_channels=1,
                      image_size=4)


def test_register_dataset_with_a_tiny_custom_loader(registry, tmp_path):
    calls = []

    @register_dataset("tiny", aliases=("tiny-set",), description="four-pixel noise")
    def tiny(root, *, heldout_fraction, seed, download, image_size, argument):
        calls.append((root, heldout_fraction, seed, download, image_size, argument))
        return _tiny("tiny", 20, heldout_fraction, seed)

    assert tiny.__name__ == "tiny"  # the decorator returns the loader itself
    assert "tiny" in list_datasets() and "tiny-set" not in list_datasets()  # aliases are not listed twice
    splits = load_data("tiny", tmp_path, heldout_fraction=0.2, seed=3)
    assert calls == [(tmp_path, 0.2, 3, False, None, "")]
    assert len(splits.train) == 16 and len(splits.heldout) == 4 and (splits.in_channels, splits.image_size) == (1, 4)
    x, y = eval_batch(splits, 2, split="heldout")
    assert x.shape == (2, 1, 4, 4)
    load_data("tiny-set", tmp_path)
    assert len(calls) == 2


def test_registered_dataset_with_an_argument(registry, tmp_path):
    seen = []

    @register_dataset("folderish", takes_argument=True)
    def folderish(root, *, argument, **_):
        seen.append(argument)
        return _tiny(f"folderish:{argument}", 8, 0.25, 0)

    assert "folderish:<path>" in list_datasets()
    assert load_data(f"folderish:{tmp_path}").name == f"folderish:{tmp_path}" and seen == [str(tmp_path)]
    with pytest.raises(EntropySearchError, match="unknown data set 'folderish'"):
        load_data("folderish")


def test_default_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ENTROPY_SEARCH_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("ENTROPY_SEARCH_DATA")
    assert default_data_root() == Path.home() / ".cache" / "entropy_search" / "data"


# ---------------------------------------------------------------- CIFAR-10 / CIFAR-100 (pickle format)


def _write_cifar(root: Path, cls, n_per_file: int, num_classes: int, rng) -> None:
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = "labels" if num_classes == 10 else "fine_labels"
    for name, _ in cls.train_list + cls.test_list:
        batch = {
            "data": rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8),
            label_key: rng.integers(0, num_classes, n_per_file).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    names = [f"class{i}" for i in range(num_classes)]
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps({cls.meta["key"]: names}))


def _trust_files(monkeypatch, root: Path, cls) -> None:
    """Point torchvision's checksums at the tiny files (the real ones only match the real data)."""
    folder = root / cls.base_folder

    def md5(name):
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(cls, "train_list", [[n, md5(n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})


@pytest.mark.parametrize("name,cls,num_classes", [
    ("cifar10", torchvision.datasets.CIFAR10, 10),
    ("cifar100", torchvision.datasets.CIFAR100, 100),
])
def test_cifar_loader_on_tiny_files(tmp_path, monkeypatch, name, cls, num_classes):
    rng = np.random.default_rng(0)
    _write_cifar(tmp_path, cls, 20, num_classes, rng)
    _trust_files(monkeypatch, tmp_path, cls)
    splits = load_data(name, tmp_path, heldout_fraction=0.25)
    n_train = 20 * len(cls.train_list)
    assert len(splits.train) + len(splits.heldout) == n_train and len(splits.test) == 20
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (num_classes, 3, 32)
    assert splits.classes[:2] == ["class0", "class1"]
    x, y = splits.test[0]
    assert x.shape == (3, 32, 32) and 0 <= y < num_classes
    # the pixels are the file's, normalised with the standard mean/std
    raw = pickle.loads((tmp_path / cls.base_folder / cls.test_list[0][0]).read_bytes())["data"][0]
    mean = torch.tensor(data_mod.CIFAR10_MEAN if name == "cifar10" else data_mod.CIFAR100_MEAN).view(3, 1, 1)
    std = torch.tensor(data_mod.CIFAR10_STD if name == "cifar10" else data_mod.CIFAR100_STD).view(3, 1, 1)
    expected = (torch.tensor(raw.reshape(3, 32, 32), dtype=torch.float32) / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-5)
    # augmentation (crop + flip) on the train split only
    torch.manual_seed(0)
    views = [splits.train[0][0] for _ in range(8)]
    assert any(not torch.equal(views[0], v) for v in views[1:])
    assert torch.equal(splits.heldout[0][0], splits.heldout[0][0])
    assert torch.equal(splits.train_eval[0][0], splits.train_eval[0][0])


def test_cifar_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(DataUnavailableError, match=r"CIFAR-10 not found under .*`entropy-search train --data cifar10 .*--download`.*cifar-10-batches-py"):
        load_data("cifar10", tmp_path / "nothing")
    with pytest.raises(DataUnavailableError, match="CIFAR-100 not found"):
        load_data("cifar100", tmp_path / "nothing")


def test_cifar_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    def offline(self):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(DataUnavailableError, match="downloading CIFAR-10 .* failed .*name resolution"):
        load_data("cifar10", tmp_path, download=True)


def test_cifar_corrupt_files(tmp_path):
    _write_cifar(tmp_path, torchvision.datasets.CIFAR10, 4, 10, np.random.default_rng(1))
    with pytest.raises(DataUnavailableError, match="incomplete or corrupted"):
        load_data("cifar10", tmp_path)  # checksums are torchvision's real ones


# ---------------------------------------------------------------- Fashion-MNIST (idx files, gzipped)


def _write_idx_gz(folder: Path, n_train: int, n_test: int, rng) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">iiii", 0x803, n, 28, 28) + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">ii", 0x801, n) + labels.tobytes())


def test_fashion_mnist_from_debian_files(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    _write_idx_gz(debian, 40, 12, np.random.default_rng(0))
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", debian)
    root = tmp_path / "data"
    splits = load_data("fashion_mnist", root, heldout_fraction=0.25)
    assert len(splits.train) == 30 and len(splits.heldout) == 10 and len(splits.test) == 12
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 1, 28)
    assert splits.train[0][0].shape == (1, 28, 28)
    raw = root / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(data_mod.FASHION_MNIST_FILES)  # no temp files left
    # once unpacked, the files under root are used without the Debian folder
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", tmp_path / "gone")
    again = load_data("fashion_mnist", root, heldout_fraction=0.25)
    assert torch.equal(again.test[3][0], splits.test[3][0])


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", tmp_path / "gone")
    with pytest.raises(DataUnavailableError, match="Fashion-MNIST not found .*dataset-fashion-mnist.*--download"):
        load_data("fashion_mnist", tmp_path)


def test_fashion_mnist_truncated_files(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", tmp_path / "gone")
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data_mod.FASHION_MNIST_FILES:
        (raw / name).write_bytes(b"\x00\x00")
    with pytest.raises(DataUnavailableError, match="unreadable"):
        load_data("fashion_mnist", tmp_path)


def test_fashion_mnist_real_debian_package(tmp_path):
    """The benchmark's data as a user gets it: Debian's package (.ci/install_data.sh installs it; CI sets
    ENTROPY_SEARCH_REQUIRE_FASHION_MNIST=1, so there a missing package fails instead of skipping)."""
    if not (data_mod.DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").is_file():
        give_up = pytest.fail if os.environ.get("ENTROPY_SEARCH_REQUIRE_FASHION_MNIST") == "1" else pytest.skip
        give_up("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    splits = load_data("fashion_mnist", tmp_path)
    assert len(splits.train) + len(splits.heldout) == 60_000 and len(splits.test) == 10_000
    assert splits.classes[0] == "T-shirt/top"


# ---------------------------------------------------------------- ImageFolder


def _write_folder(root: Path, layout: dict[str, dict[str, int]]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def test_imagefolder_loader(tmp_path):
    _write_folder(tmp_path, {"train": {"cat": 5, "dog": 5}, "val": {"cat": 2, "dog": 1}})
    splits = load_data(f"imagefolder:{tmp_path}", heldout_fraction=0.2, image_size=16)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (2, 3, 16)
    assert len(splits.train) == 8 and len(splits.heldout) == 2 and len(splits.test) == 3
    assert splits.classes == ["cat", "dog"]
    for part in (splits.train, splits.heldout, splits.test):
        x, y = part[0]
        assert x.shape == (3, 16, 16) and y in (0, 1)
    assert [label for _, label in splits.test.samples] == [0, 0, 1]
    x, y = eval_batch(splits, 4, split="test")
    assert x.shape == (3, 3, 16, 16) and y.tolist() == [0, 0, 1]


def test_imagefolder_test_folder_and_missing_classes(tmp_path):
    _write_folder(tmp_path, {"train": {"a": 2, "b": 2, "c": 2}, "test": {"c": 2}})
    splits = load_data(f"imagefolder:{tmp_path}", image_size=8)
    assert [label for _, label in splits.test.samples] == [2, 2]  # labelled with the training folder's indices


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataUnavailableError, match="train/ and val/"):
        load_data(f"imagefolder:{tmp_path / 'absent'}")
    _write_folder(tmp_path / "one", {"train": {"a": 2}})
    with pytest.raises(DataUnavailableError, match="train/ and val/"):
        load_data(f"imagefolder:{tmp_path / 'one'}")
    _write_folder(tmp_path / "two", {"train": {"a": 2}, "val": {"a": 1, "z": 1}})
    with pytest.raises(DataUnavailableError, match="lacks: z"):
        load_data(f"imagefolder:{tmp_path / 'two'}")
    (tmp_path / "three" / "train").mkdir(parents=True)
    (tmp_path / "three" / "val").mkdir()
    with pytest.raises(DataUnavailableError, match="cannot read image folder"):
        load_data(f"imagefolder:{tmp_path / 'three'}")


# ---------------------------------------------------------------- a given held-out split (data.heldout)


def _split_file(path: Path, content) -> Path:
    path.write_text(json.dumps(content))
    return path


def test_split_file_holds_out_exactly_its_indices(tmp_path):
    """The listed training images are the held-out split and leave the train split (and its plain view)."""
    full = load_data("digits", heldout_fraction=0.0)
    held = [1436, 0, 7, 500]
    for content in (held, {"heldout": held}):
        splits = with_heldout(full, _split_file(tmp_path / "split.json", content))
        assert splits.heldout.indices == sorted(held)
        assert splits.train.indices == splits.train_eval.indices == [i for i in range(1437) if i not in held]
        assert torch.equal(splits.heldout[0][0], full.train_eval[0][0])  # un-augmented images of the training set
        assert splits.test is full.test
    drawn = load_data("digits")  # from a drawn split too: what neither part lists stays out of both
    splits = with_heldout(drawn, _split_file(tmp_path / "split.json", held))
    assert set(splits.train.indices) | set(splits.heldout.indices) == set(range(1437))


def test_image_folder_as_heldout_split(tmp_path):
    """A folder of images, one subfolder per class, read like the data set's own images; the train split stays."""
    from PIL import Image

    full = load_data("digits", heldout_fraction=0.0)
    chosen = [3, 40, 41, 900]
    for i in chosen:
        image, label = full.train_eval.dataset.images[i], int(full.train_eval.dataset.labels[i])
        (tmp_path / str(label)).mkdir(exist_ok=True)
        Image.fromarray((image[0].numpy() * 255 / 16).round().astype(np.uint8)).save(tmp_path / str(label) / f"{i}.png")
    for label in range(10):
        (tmp_path / str(label)).mkdir(exist_ok=True)
    splits = with_heldout(full, tmp_path)
    assert len(splits.heldout) == 4 and splits.train is full.train
    by_file = {Path(path).stem: k for k, (path, _) in enumerate(splits.heldout.samples)}
    for i in chosen:
        x, y = splits.heldout[by_file[str(i)]]
        assert y == full.train_eval[i][1] and x.shape == (1, 8, 8)
        torch.testing.assert_close(x, full.train_eval[i][0], atol=0.02, rtol=0)
    x, y = eval_batch(splits, 8)
    assert x.shape == (4, 1, 8, 8)


def test_image_folder_named_by_class_index_resized_to_the_data_set(tmp_path):
    """Class names a folder cannot hold (Fashion-MNIST's 'T-shirt/top') can be given as indices; RGB images of
    another size are converted to the data set's channels and size."""
    images, labels = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8), torch.tensor([0, 1] * 3)
    splits = data_mod._array_splits("tiny", images, labels, images, labels, mean=(0.5,), std=(0.25,), scale=1 / 255,
                                    augment=False, num_classes=2, heldout_fraction=0.0, seed=0,
                                    classes=["T-shirt/top", "Trouser"])
    _write_folder(tmp_path, {"held": {"0": 2, "1": 1}})
    held = with_heldout(splits, tmp_path / "held").heldout
    assert [label for _, label in held.samples] == [0, 0, 1] and held[0][0].shape == (1, 4, 4)


def test_bad_heldout_sets_are_config_errors(tmp_path):
    full = load_data("digits", heldout_fraction=0.0)
    cases = [
        (tmp_path / "absent.json", "absent.json does not exist"),
        (_split_file(tmp_path / "range.json", [0, 1437, -1]), r"index -1, 1437 out of range: .* has 1437 images"),
        (_split_file(tmp_path / "twice.json", [4, 5, 4]), "index 4 given more than once"),
        (_split_file(tmp_path / "empty.json", []), "lists no held-out images"),
        (_split_file(tmp_path / "shape.json", {"train": [1]}), "must hold a list of training-set indices"),
        (_split_file(tmp_path / "floats.json", [1.5]), "must hold a list of training-set indices"),
        (_split_file(tmp_path / "all.json", list(range(1437))), "holds out the whole training set"),
    ]
    (tmp_path / "bad.json").write_text("[1, 2")
    cases.append((tmp_path / "bad.json", "not readable JSON"))
    for path, message in cases:
        with pytest.raises(ConfigError, match=message):
            with_heldout(full, path)
    _write_folder(tmp_path / "classes", {"h": {"0": 1, "1": 1, "cat": 1}})
    with pytest.raises(ConfigError, match="one subfolder per class of digits .*missing: 2, 3.*; unknown: cat"):
        with_heldout(full, tmp_path / "classes" / "h")
    for label in range(10):
        (tmp_path / "no_images" / str(label)).mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds no images"):
        with_heldout(full, tmp_path / "no_images")


def test_heldout_set_for_a_data_set_that_cannot_take_one(tmp_path):
    """A registered loader whose splits are not index subsets of one training set, or that reads no image files."""
    plain = torch.utils.data.TensorDataset(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))
    splits = DataSplits("plain", plain, plain, plain, num_classes=1, in_channels=1, image_size=2)
    with pytest.raises(ConfigError, match="does not index its training set"):
        with_heldout(splits, _split_file(tmp_path / "s.json", [0]))
    (tmp_path / "h" / "0").mkdir(parents=True)
    with pytest.raises(ConfigError, match="cannot read image files"):
        with_heldout(splits, tmp_path / "h")


def test_an_empty_held_out_split_says_where_held_out_images_come_from():
    """A baseline trained on the whole training set (held-out fraction 0) has no held-out images: the message says
    to give them (`data.heldout`) rather than to change a fraction the checkpoint has fixed. Under a second."""
    splits = load_data("digits", heldout_fraction=0.0)
    with pytest.raises(ConfigError, match=r"heldout split of digits is empty: the baseline was trained on the whole "
                                          r"training set .* data\.heldout"):
        eval_batch(splits, 8, split="heldout")
