"""Data sets: the offline default (scikit-learn's digits), Fashion-MNIST, CIFAR-10/100 and ImageFolder.

Every loader returns the same `DataSplits`: a training part, a deterministic held-out part of the
training set (for the RL reward, never the test set) and the test split (for final reporting only).
`with_heldout` replaces the drawn held-out part by a given one (a split file or a folder of images).
All splits yield `(float tensor [C, H, W], normalised; int label)`. A data set that is not on the
machine and cannot be fetched raises `DataUnavailableError` saying how to get it.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from .errors import ConfigError, DataUnavailableError, EntropySearchError

#: Where Debian's package `dataset-fashion-mnist` installs the gzipped idx files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DataSplits:
    """The three splits of a data set and the input shape a model needs for it.

    `train_eval` is the same training part as `train` without augmentation (for evaluation batches).
    """

    name: str
    train: Dataset
    heldout: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    train_eval: Dataset | None = None
    classes: list[str] = field(default_factory=list)
    eval_transform: Callable[[Image.Image], torch.Tensor] | None = None
    """An image file -> a normalised input like the held-out split's (reads a folder given as held-out set)."""
    mean: tuple[float, ...] = ()
    """The per-channel mean the inputs are normalised with (`(x - mean) / std`, x in [0, 1])."""
    std: tuple[float, ...] = ()

    def preprocessing(self) -> dict:
        """What the model's inputs are: channels, size and normalisation (recorded with checkpoints and results)."""
        return {"channels": self.in_channels, "image_size": self.image_size, "mean": list(self.mean),
                "std": list(self.std)}


def default_data_root() -> Path:
    """`$ENTROPY_SEARCH_DATA`, else `~/.cache/entropy_search/data`."""
    env = os.environ.get("ENTROPY_SEARCH_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "entropy_search" / "data"


class ArrayDataset(Dataset):
    """In-memory images [N, C, H, W] normalised on access, with optional CIFAR-style augmentation.

    Several views (augmented train, plain held-out) share one image tensor without copying it.
    `scale` maps the stored values to [0, 1] (1/255 for uint8, 1/16 for digits).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        scale: float = 1 / 255,
        augment: bool = False,
        pad: int = 4,
    ) -> None:
        self.images, self.labels = images, labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.scale, self.augment, self.pad = scale, augment, pad

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].float() * self.scale
        if self.augment:
            x = random_crop_flip(x, self.pad)
        return (x - self.mean) / self.std, int(self.labels[index])


@dataclass(frozen=True)
class ImageTransform:
    """An image file read as an image of an in-memory data set: its channels and size, scaled to [0, 1] and
    normalised with the data set's mean and std (what `ArrayDataset` does to its stored images)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    size: tuple[int, int]
    """(height, width)."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("L" if self.channels == 1 else "RGB")
        height, width = self.size
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.array(image, dtype=np.float32) / 255)
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        return (x - mean) / torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)


def random_crop_flip(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad by `pad`, crop back to the original size at a random offset, flip half the time."""
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    i, j = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    x = padded[:, i : i + h, j : j + w]
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    return x


def split_heldout(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, held-out) indices; stratified by label when the sizes allow it."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in [0, 1), got {fraction}")
    n = len(targets)
    indices = np.arange(n)
    n_heldout = int(round(fraction * n))
    if n_heldout == 0:
        return indices.tolist(), []
    from sklearn.model_selection import train_test_split

    try:
        train_idx, heldout_idx = train_test_split(
            indices, test_size=n_heldout, stratify=np.asarray(targets), random_state=seed
        )
    except ValueError:  # too few samples per class to stratify
        perm = np.random.default_rng(seed).permutation(n)
        heldout_idx, train_idx = perm[:n_heldout], perm[n_heldout:]
    return sorted(train_idx.tolist()), sorted(heldout_idx.tolist())


@dataclass(frozen=True)
class DatasetEntry:
    """A registered data set: its loader and how it is named."""

    name: str
    loader: Callable[..., DataSplits]
    """`loader(root, *, heldout_fraction, seed, download, image_size, argument)` -> DataSplits."""
    aliases: tuple[str, ...] = ()
    takes_argument: bool = False
    """Named `<name>:<argument>` (e.g. `imagefolder:<path>`)."""
    description: str = ""


_DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, *, aliases: Sequence[str] = (), takes_argument: bool = False, description: str = ""):
    """Decorator registering a data set loader under `name` (and `aliases`); with `takes_argument` the data
    set is named `<name>:<argument>` and the loader receives the argument (a path, say)."""

    def wrap(loader: Callable[..., DataSplits]) -> Callable[..., DataSplits]:
        entry = DatasetEntry(name, loader, tuple(aliases), takes_argument, description)
        for key in (name, *aliases):
            _DATASETS[key] = entry
        return loader

    return wrap


def list_datasets() -> list[str]:
    """Names of the registered data sets (`<name>:<argument>` for those that take one)."""
    entries = dict.fromkeys(_DATASETS.values())
    return [f"{e.name}:<path>" if e.takes_argument else e.name for e in entries]


def _download_hint(name: str, root: Path) -> str:
    """How to download a data set: only `entropy-search train` does (a search or a sweep never downloads)."""
    return (f"download it on a machine with network access with `entropy-search train --data {name} --data-root "
            f"{root} --download` (only train downloads)")


def load_data(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    download: bool = False,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    channels: int | None = None,
) -> DataSplits:
    """Load data set `name` (see `list_datasets()`) with a held-out part of `heldout_fraction` of its
    training set, chosen by `seed`. `image_size` and `channels` apply to ImageFolder data (default 224 and 3);
    `mean` and `std` replace the data set's own normalisation (ImageNet's for ImageFolder data), for a network
    trained with other ones. The built-in loaders take all of these; a registered one only what it declares."""
    root_path = Path(root).expanduser() if root else default_data_root()
    key, sep, argument = name.partition(":")
    entry = _DATASETS.get(key) if sep else _DATASETS.get(name)
    if entry is None or entry.takes_argument != bool(sep):
        raise EntropySearchError(f"unknown data set {name!r}; known: {', '.join(list_datasets())}")
    if (mean is None) != (std is None):
        raise ConfigError(f"give both mean and std of the inputs' normalisation, or neither (got mean {mean}, std {std})")
    if mean is not None and (len(mean) != len(std) or min(std) <= 0):
        raise ConfigError(f"mean and std need one value per input channel, std > 0; got mean {list(mean)}, std {list(std)}")
    stated = {k: v for k, v in {"mean": mean, "std": std, "channels": channels}.items() if v is not None}
    try:
        splits = entry.loader(root_path, heldout_fraction=heldout_fraction, seed=seed, download=download,
                              image_size=image_size, argument=argument, **stated)
    except TypeError as exc:
        if not stated or "unexpected keyword" not in str(exc):
            raise
        raise ConfigError(f"data set {name!r} does not take {', '.join(stated)} ({exc})") from None
    if mean is not None and len(mean) != splits.in_channels:
        raise ConfigError(f"data.mean and data.std give {len(mean)} value(s), but {splits.name}'s inputs have "
                          f"{splits.in_channels} channel(s)")
    if channels is not None and channels != splits.in_channels:
        raise ConfigError(f"data.channels: {channels}, but {splits.name}'s images have {splits.in_channels}; "
                          "only ImageFolder data converts images (to 1 or 3 channels)")
    return splits


def _array_splits(
    name: str,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    scale: float,
    augment: bool,
    num_classes: int,
    heldout_fraction: float,
    seed: int,
    classes: list[str] | None = None,
) -> DataSplits:
    """Splits over in-memory arrays; the augmented and plain views share the image tensor."""
    train_idx, heldout_idx = split_heldout(train_labels.tolist(), heldout_fraction, seed)
    augmented = ArrayDataset(train_images, train_labels, mean, std, scale=scale, augment=augment)
    plain = ArrayDataset(train_images, train_labels, mean, std, scale=scale)
    return DataSplits(
        name=name,
        train=Subset(augmented, train_idx),
        heldout=Subset(plain, heldout_idx),
        test=ArrayDataset(test_images, test_labels, mean, std, scale=scale),
        num_classes=num_classes,
        in_channels=train_images.shape[1],
        image_size=train_images.shape[-1],
        train_eval=Subset(plain, train_idx),
        classes=list(classes or []),
        eval_transform=ImageTransform(tuple(mean), tuple(std), train_images.shape[1], tuple(train_images.shape[-2:])),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(v) for v in std),
    )


# ---------------------------------------------------------------- digits (ships with scikit-learn)


@register_dataset("digits", description="scikit-learn's 8x8 handwritten digits (offline)")
def _digits(root: Path, *, heldout_fraction: float, seed: int, mean: Sequence[float] | None = None,
            std: Sequence[float] | None = None, **_: object) -> DataSplits:
    """scikit-learn's 8x8 digits: a fixed stratified 80/20 train/test split (seed 0, whatever `seed`)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # [N, 1, 8, 8], 0..16
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=digits.target, random_state=0
    )
    train_idx, test_idx = torch.as_tensor(np.sort(train_idx)), torch.as_tensor(np.sort(test_idx))
    train_pixels = images[train_idx] / 16
    if mean is None:
        mean, std = (train_pixels.mean().item(),), (train_pixels.std().item(),)
    return _array_splits(
        "digits", images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
        mean=mean, std=std, scale=1 / 16, augment=False, num_classes=10,
        heldout_fraction=heldout_fraction, seed=seed, classes=[str(i) for i in range(10)],
    )


# ---------------------------------------------------------------- Fashion-MNIST


@register_dataset("fashion_mnist", aliases=("fashion-mnist", "fashionmnist"), description="Fashion-MNIST 28x28")
def _fashion_mnist(root: Path, *, heldout_fraction: float, seed: int, download: bool,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None, **_: object) -> DataSplits:
    """torchvision's FashionMNIST, from `root`, else from Debian's files, else downloaded if allowed."""
    from torchvision.datasets import FashionMNIST

    raw = root / "FashionMNIST" / "raw"
    if not all((raw / f).is_file() for f in FASHION_MNIST_FILES):
        if all((DEBIAN_FASHION_MNIST / f"{f}.gz").is_file() for f in FASHION_MNIST_FILES):
            _gunzip_into(DEBIAN_FASHION_MNIST, raw, FASHION_MNIST_FILES)
        elif download:
            _download(lambda: FashionMNIST(str(root), train=True, download=True), "Fashion-MNIST", raw)
        else:
            raise DataUnavailableError(
                f"Fashion-MNIST not found under {raw}; install Debian's package dataset-fashion-mnist "
                f"(apt-get install dataset-fashion-mnist, files in {DEBIAN_FASHION_MNIST}), "
                f"{_download_hint('fashion_mnist', root)}, or copy {', '.join(FASHION_MNIST_FILES)} there"
            )
    try:
        train = FashionMNIST(str(root), train=True)
        test = FashionMNIST(str(root), train=False)
    except Exception as exc:  # truncated or malformed idx files
        raise DataUnavailableError(
            f"Fashion-MNIST files under {raw} are unreadable ({exc}); delete them and load again"
        ) from None
    return _array_splits(
        "fashion_mnist", train.data.unsqueeze(1), train.targets, test.data.unsqueeze(1), test.targets,
        mean=mean or FASHION_MEAN, std=std or FASHION_STD, scale=1 / 255, augment=False, num_classes=10,
        heldout_fraction=heldout_fraction, seed=seed, classes=list(train.classes),
    )


def _gunzip_into(source: Path, target: Path, names: list[str]) -> None:
    """Gunzip `source/<name>.gz` into `target/<name>`, each file written atomically."""
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{name}.", suffix=".tmp")
            try:
                with gzip.open(source / f"{name}.gz", "rb") as src, os.fdopen(fd, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(tmp, target / name)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataUnavailableError(f"cannot unpack Fashion-MNIST from {source} into {target}: {exc}") from None


def _download(fetch: Callable[[], object], label: str, where: Path) -> None:
    """Run a torchvision download, turning any failure into a one-line DataUnavailableError."""
    try:
        fetch()
    except Exception as exc:
        raise DataUnavailableError(
            f"downloading {label} into {where} failed ({type(exc).__name__}: {exc}); "
            f"check the network, or copy the files there from a machine that has them"
        ) from None


# ---------------------------------------------------------------- CIFAR-10 / CIFAR-100


@register_dataset("cifar10", description="CIFAR-10 32x32 (torchvision)")
def _cifar10(root: Path, *, heldout_fraction: float, seed: int, download: bool, mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None, **_: object) -> DataSplits:
    return _cifar("cifar10", root, heldout_fraction, seed, download, mean or CIFAR10_MEAN, std or CIFAR10_STD)


@register_dataset("cifar100", description="CIFAR-100 32x32 (torchvision)")
def _cifar100(root: Path, *, heldout_fraction: float, seed: int, download: bool, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None, **_: object) -> DataSplits:
    return _cifar("cifar100", root, heldout_fraction, seed, download, mean or CIFAR100_MEAN, std or CIFAR100_STD)


def _cifar(name: str, root: Path, heldout_fraction: float, seed: int, download: bool, mean: Sequence[float],
           std: Sequence[float]) -> DataSplits:
    """torchvision's CIFAR-10/100 (files checked against torchvision's checksums)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, label, num_classes = (CIFAR10, "CIFAR-10", 10) if name == "cifar10" else (CIFAR100, "CIFAR-100", 100)
    folder = root / cls.base_folder
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    if not all((folder / f).is_file() for f in files):
        if not download:
            raise DataUnavailableError(
                f"{label} not found under {root}; {_download_hint(name, root)}, "
                f"or copy {cls.base_folder} (from {cls.filename}) there"
            )
        _download(lambda: cls(str(root), train=True, download=True), label, root)
    try:
        train = cls(str(root), train=True)
        test = cls(str(root), train=False)
    except Exception as exc:  # checksum mismatch, truncated pickle
        raise DataUnavailableError(
            f"{label} under {folder} is incomplete or corrupted ({exc}); delete {folder} and "
            f"{_download_hint(name, root)}, or copy a good {cls.base_folder} there"
        ) from None

    def nchw(data: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2)))

    return _array_splits(
        name, nchw(train.data), torch.tensor(train.targets), nchw(test.data), torch.tensor(test.targets),
        mean=mean, std=std, scale=1 / 255, augment=True, num_classes=num_classes,
        heldout_fraction=heldout_fraction, seed=seed, classes=list(train.classes),
    )


# ---------------------------------------------------------------- ImageFolder


@register_dataset("imagefolder", takes_argument=True, description="train/ and val/ (or test/) folders of class folders")
def _imagefolder(root: Path, *, heldout_fraction: float, seed: int, image_size: int | None, argument: str,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, channels: int | None = None,
                 **_: object) -> DataSplits:
    return _image_folder(Path(argument).expanduser(), heldout_fraction, seed, image_size or 224,
                         mean or IMAGENET_MEAN, std or IMAGENET_STD, channels or 3)


def _image_folder(path: Path, heldout_fraction: float, seed: int, image_size: int, mean: Sequence[float],
                  std: Sequence[float], channels: int) -> DataSplits:
    """`path/train/<class>/*` and `path/val/<class>/*` (or `test/`), resized to `image_size`, as `channels`
    channels (1: greyscale, 3: RGB), normalised with `mean` and `std`."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    if image_size < 1:
        raise ConfigError(f"image_size must be positive, got {image_size}")
    test_dir = next((path / d for d in ("val", "test") if (path / d).is_dir()), None)
    if not (path / "train").is_dir() or test_dir is None:
        raise DataUnavailableError(
            f"image folder {path} needs train/ and val/ (or test/) subfolders with one folder of images per "
            f"class (train/<class>/<image>); found {'no such folder' if not path.is_dir() else 'none'}"
        )
    if channels not in (1, 3):
        raise ConfigError(f"ImageFolder images are read as 1 (greyscale) or 3 (RGB) channels, not {channels}")
    if len(mean) != channels:
        raise ConfigError(f"data.mean and data.std give {len(mean)} value(s) for {channels}-channel images")
    colour = [transforms.Grayscale(num_output_channels=1)] if channels == 1 else []
    normalize = transforms.Normalize(tuple(mean), tuple(std))
    augmented = transforms.Compose([
        *colour, transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        normalize,
    ])
    plain = transforms.Compose([
        *colour, transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size),
        transforms.ToTensor(), normalize,
    ])
    try:
        train_aug = ImageFolder(str(path / "train"), transform=augmented)
        train_plain = ImageFolder(str(path / "train"), transform=plain)
    except (FileNotFoundError, OSError) as exc:
        raise DataUnavailableError(f"cannot read image folder {path / 'train'}: {exc}") from None
    extra = sorted(set(_class_dirs(test_dir)) - set(train_aug.classes))
    if extra:
        raise DataUnavailableError(f"{test_dir} has classes that {path / 'train'} lacks: {', '.join(extra)}")
    try:
        samples = make_dataset(str(test_dir), train_aug.class_to_idx, IMG_EXTENSIONS, allow_empty=True)
    except (FileNotFoundError, OSError) as exc:
        raise DataUnavailableError(f"cannot read image folder {test_dir}: {exc}") from None
    test = ImageFiles(samples, transform=plain)
    if len(test) == 0:
        raise DataUnavailableError(f"image folder {test_dir} holds no images")
    train_idx, heldout_idx = split_heldout(train_aug.targets, heldout_fraction, seed)
    return DataSplits(
        name=f"imagefolder:{path}",
        train=Subset(train_aug, train_idx),
        heldout=Subset(train_plain, heldout_idx),
        test=test,
        num_classes=len(train_aug.classes),
        in_channels=channels,
        image_size=image_size,
        train_eval=Subset(train_plain, train_idx),
        classes=list(train_aug.classes),
        eval_transform=plain,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(v) for v in std),
    )


def _class_dirs(path: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())


class ImageFiles(Dataset):
    """Image files with given labels (a test folder labelled with the training folder's class indices)."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable | None = None) -> None:
        self.samples, self.transform = samples, transform
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[index]
        image = default_loader(path)
        return (self.transform(image) if self.transform else image), label


# ---------------------------------------------------------------- a given held-out split


def with_heldout(splits: DataSplits, path: str | os.PathLike) -> DataSplits:
    """`splits` with the held-out split that `path` gives instead of the drawn one: a JSON split file (indices into
    the data set's training set, which leave the train split) or a folder of images in ImageFolder layout."""
    path = Path(path).expanduser()
    if path.is_dir():
        return replace(splits, heldout=heldout_folder(path, splits))
    if path.is_file():
        return _split_off(splits, read_split_file(path), path)
    raise ConfigError(f"{path} does not exist; give a JSON split file or a folder of held-out images")


def read_split_file(path: Path) -> list[int]:
    """The indices of a JSON split file: a list of integers, or `{"heldout": [...]}`."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"split file {path} is not readable JSON ({exc})") from None
    if isinstance(data, dict) and set(data) == {"heldout"}:
        data = data["heldout"]
    if not isinstance(data, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in data):
        raise ConfigError(f"split file {path} must hold a list of training-set indices (integers) or "
                          '{"heldout": [...]}')
    if not data:
        raise ConfigError(f"split file {path} lists no held-out images")
    return data


def _split_off(splits: DataSplits, indices: list[int], path: Path) -> DataSplits:
    """The images at `indices` of the training set become the held-out split and leave the train split."""
    parts = (splits.train, splits.heldout, splits.train_eval or splits.train)
    if not all(isinstance(part, Subset) for part in parts):
        raise ConfigError(f"data set {splits.name} does not index its training set; give a folder of held-out "
                          f"images instead of the split file {path}")
    n = len(splits.train.dataset)
    bad = sorted({i for i in indices if not 0 <= i < n})
    twice = sorted(i for i, count in Counter(indices).items() if count > 1)
    if bad:
        raise ConfigError(f"split file {path}: index {_few(bad)} out of range: the training set of {splits.name} "
                          f"has {n} images (indices 0 to {n - 1})")
    if twice:
        raise ConfigError(f"split file {path}: index {_few(twice)} given more than once")
    held = set(indices)
    rest = [i for i in sorted({*parts[0].indices, *parts[1].indices}) if i not in held]
    if not rest:
        raise ConfigError(f"split file {path} holds out the whole training set of {splits.name}")
    return replace(splits, train=Subset(parts[0].dataset, rest), heldout=Subset(parts[1].dataset, sorted(held)),
                   train_eval=Subset(parts[2].dataset, rest))


def _few(values: list[int], shown: int = 5) -> str:
    """`1, 2, 3` or `1, 2, 3, 4, 5 (and 7 more)`."""
    more = f" (and {len(values) - shown} more)" if len(values) > shown else ""
    return ", ".join(map(str, values[:shown])) + more


def heldout_folder(path: Path, splits: DataSplits) -> ImageFiles:
    """The images of `path/<class>/*`, labelled with the data set's classes and read with its evaluation
    transform."""
    from torchvision.datasets.folder import (  # deferred, as every torchvision loader here
        IMG_EXTENSIONS,
        make_dataset,
    )

    if splits.eval_transform is None:
        raise ConfigError(f"data set {splits.name} cannot read image files; give a split file instead of {path}")
    class_to_idx = _folder_classes(path, splits)
    try:
        samples = make_dataset(str(path), class_to_idx, IMG_EXTENSIONS, allow_empty=True)
    except OSError as exc:
        raise ConfigError(f"cannot read held-out folder {path}: {exc}") from None
    if not samples:
        raise ConfigError(f"held-out folder {path} holds no images")
    return ImageFiles(samples, transform=splits.eval_transform)


def _folder_classes(path: Path, splits: DataSplits) -> dict[str, int]:
    """Subfolder name -> class index: subfolders named as the data set's classes, or by class index 0..K-1."""
    folders = set(_class_dirs(path))
    by_index = {str(i): i for i in range(splits.num_classes)}
    by_name = {name: i for i, name in enumerate(splits.classes)} or by_index
    for names in (by_name, by_index):
        if folders == set(names):
            return names
    missing, unknown = sorted(set(by_name) - folders), sorted(folders - set(by_name))
    raise ConfigError(
        f"held-out folder {path} needs one subfolder per class of {splits.name} (named as its classes, or 0 to "
        f"{splits.num_classes - 1}); missing: {', '.join(missing) or 'none'}; unknown: {', '.join(unknown) or 'none'}"
    )


# ---------------------------------------------------------------- evaluation batches


def eval_batch(
    splits: DataSplits, n: int, *, split: str = "heldout", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of `n` images and labels from `split` ('heldout', 'train' or 'test'), the same for
    the same seed; the whole split when it has `n` or fewer images. Never augmented."""
    choices = {"heldout": splits.heldout, "train": splits.train_eval or splits.train, "test": splits.test}
    if split not in choices:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(choices)}")
    if n < 1:
        raise ConfigError(f"evaluation batch size must be positive, got {n}")
    dataset = choices[split]
    if len(dataset) == 0:
        why = ("the baseline was trained on the whole training set (held-out fraction 0, recorded in its checkpoint); "
               "give images it never trained on with data.heldout, or train a baseline with data.heldout_fraction "
               "above 0" if split == "heldout" else "the data set has none")
        raise ConfigError(f"the {split} split of {splits.name} is empty: {why}")
    if n >= len(dataset):
        indices = list(range(len(dataset)))
    else:
        perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        indices = sorted(perm[:n].tolist())
    xs, ys = zip(*(dataset[i] for i in indices), strict=True)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)
