"""Datasets as whole tensors in memory, fixed splits and batch augmentation.

Every split is held as one uint8 tensor (N, C, H, W) plus int64 labels; batches are normalised
and augmented on the fly, all images of a batch at once (per-sample transforms in a DataLoader
doubled a small model's epoch time here).

Augmentation is *indexed*: view 0 of an image is the image itself, and view v > 0 is a random
padding-crop (and flip where the data allows it) drawn from a generator seeded by (seed, v). The
same (image, view) pair therefore always gives the same pixels, which is what lets the teachers'
outputs be computed once per view and cached (see `teachers.TargetCache`).
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nas_kd.core.errors import InputError

# Fixed seed of the train/val split: every study of a dataset selects on the same images.
SPLIT_SEED = 20201001
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (N, C, H, W) uint8
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: torch.Tensor) -> Split:
        return Split(self.x[indices], self.y[indices])


@dataclass(frozen=True)
class Augment:
    pad: int  # pixels of zero padding before a random crop back to the original size; 0 = none
    flip: bool  # random horizontal flips


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split  # what students and teachers train on
    val: Split  # carved from the original training set; drives every search decision
    test: Split  # touched only by final evaluations
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, of the training images scaled to [0, 1]
    std: tuple[float, ...]
    augment: Augment

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """Short hash of the dataset's name, training images and labels and validation labels: part
        of every cache key (about 0.1 s for Fashion-MNIST; callers keep it rather than ask twice)."""
        h = hashlib.sha1()
        h.update(self.name.encode())
        for t in (self.train.x, self.train.y, self.val.y):
            h.update(t.cpu().numpy().tobytes())
        return h.hexdigest()[:12]

    def to(self, device: torch.device) -> Dataset:
        def move(s: Split) -> Split:
            return Split(s.x.to(device), s.y.to(device))

        return Dataset(self.name, move(self.train), move(self.val), move(self.test), self.classes,
                       self.mean, self.std, self.augment)


@dataclass(frozen=True)
class RawData:
    """What a loader returns: the original train and test sets, before the val split."""

    train: Split
    test: Split | None  # None: carve one from train
    classes: tuple[str, ...]
    augment: Augment


Loader = Callable[[Path | None], RawData]
DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    def wrap(fn: Loader) -> Loader:
        DATASETS[name] = fn
        return fn

    return wrap


def dataset_names() -> list[str]:
    return [*DATASETS, "folder:PATH"]


def load_dataset(name: str, data_dir: Path | None = None, val_fraction: float = 0.1) -> Dataset:
    """Load a registered dataset (or `folder:PATH`) and carve the validation split."""
    if name.startswith("folder:"):
        raw = load_folder(Path(name.split(":", 1)[1]))
    elif name in DATASETS:
        raw = DATASETS[name](data_dir)
    else:
        raise InputError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}")
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"validation fraction must be in (0, 1), got {val_fraction}")
    train, test = raw.train, raw.test
    if test is None:
        test, train = _carve(train, 0.2, SPLIT_SEED + 1)
    val, train = _carve(train, val_fraction, SPLIT_SEED)
    scaled = train.x.float() / 255.0
    mean = tuple(scaled.mean(dim=(0, 2, 3)).tolist())
    std = tuple(scaled.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return Dataset(name, train, val, test, raw.classes, mean, std, raw.augment)


MIN_CARVED_PER_CLASS = 3  # images of every class a carved split (validation, test) keeps at least


def _carve(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split off `fraction` of the images, stratified by class, with a fixed seed. Every class
    gives at least MIN_CARVED_PER_CLASS images (so a small dataset's validation split still
    measures every class), but no more than a third of its images (at least one of two; none
    of a class of one: the rest train)."""
    g = torch.Generator().manual_seed(seed)
    taken = []
    for c in torch.unique(split.y):
        idx = torch.nonzero(split.y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        taken.append(idx[: min(max(MIN_CARVED_PER_CLASS, round(len(idx) * fraction)), max(1, len(idx) // 3) if len(idx) > 1 else 0)])
    carved = torch.sort(torch.cat(taken)).values
    keep = torch.ones(len(split), dtype=torch.bool)
    keep[carved] = False
    return split.subset(carved), split.subset(torch.nonzero(keep).flatten())


# ---------------------------------------------------------------- loaders


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut gzip an EOFError
        raise InputError(f"{path} cannot be read as an idx file: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise InputError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise InputError(f"{path} is truncated: header says {dims}, found {array.size} bytes")
    return array.reshape(dims)


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (f"{stem}.gz", stem):
            if (d / name).is_file():
                return d / name
    return None


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")


@register_dataset("fashion-mnist")
def load_fashion_mnist(data_dir: Path | None) -> RawData:
    """Fashion-MNIST: `data_dir`, then the Debian package's files, then a torchvision download."""
    dirs = []
    if data_dir is not None:
        dirs += [data_dir, data_dir / "fashion-mnist", data_dir / "FashionMNIST" / "raw"]
    dirs.append(DEBIAN_FASHION_MNIST)
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    # all four files from one folder: never Debian's labels with the images of --data-dir
    found = ([_find_idx([d], s) for s in stems] for d in dirs)
    paths = next((p for p in found if all(p)), None)
    if paths:
        xtr, ytr, xte, yte = (_read_idx(p) for p in paths)  # type: ignore[arg-type]
        for x, y, px in ((xtr, ytr, paths[0]), (xte, yte, paths[2])):
            if len(x) != len(y):
                raise InputError(f"{px} holds {len(x)} images but its labels file {len(y)} labels")
        train = Split(torch.from_numpy(xtr.copy()).unsqueeze(1), torch.from_numpy(ytr.astype(np.int64)))
        test = Split(torch.from_numpy(xte.copy()).unsqueeze(1), torch.from_numpy(yte.astype(np.int64)))
        return RawData(train, test, FASHION_CLASSES, Augment(pad=2, flip=True))
    try:
        return _torchvision("FashionMNIST", data_dir, Augment(pad=2, flip=True))
    except InputError as e:
        looked = ", ".join(str(d) for d in dirs)
        raise InputError(
            f"Fashion-MNIST not found (looked in {looked}) and the download failed ({e}); "
            "install it with `apt-get install -y dataset-fashion-mnist` or pass --data-dir "
            "with the four idx files") from None


def _torchvision(cls_name: str, data_dir: Path | None, augment: Augment) -> RawData:
    """Load a torchvision dataset, downloading it into `data_dir` (default ./data) if needed."""
    import torchvision.datasets as tvd

    root = str(data_dir or Path("data"))
    cls = getattr(tvd, cls_name)
    try:
        if cls_name == "SVHN":
            sets = [cls(root, split=s, download=True) for s in ("train", "test")]
        else:
            sets = [cls(root, train=t, download=True) for t in (True, False)]
    except Exception as e:  # torchvision raises URLError, RuntimeError, ... when offline
        detail = " ".join(str(e).split())  # torchvision's messages span lines; ours is one
        raise InputError(f"could not load or download {cls_name} into {root}: {detail}") from None
    splits = []
    for s in sets:
        x = np.asarray(s.data)
        if x.ndim == 3:  # (N, H, W) grayscale
            x = x[:, None]
        elif x.shape[-1] == 3:  # (N, H, W, C)
            x = x.transpose(0, 3, 1, 2)
        y = np.asarray(getattr(s, "targets", None) if hasattr(s, "targets") else s.labels)
        splits.append(Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))))
    classes = tuple(getattr(sets[0], "classes", None) or [str(i) for i in range(int(splits[0].y.max()) + 1)])
    return RawData(splits[0], splits[1], classes, augment)


@register_dataset("mnist")
def load_mnist(data_dir: Path | None) -> RawData:
    return _torchvision("MNIST", data_dir, Augment(pad=2, flip=False))  # digits must not flip


@register_dataset("cifar10")
def load_cifar10(data_dir: Path | None) -> RawData:
    return _torchvision("CIFAR10", data_dir, Augment(pad=4, flip=True))


@register_dataset("cifar100")
def load_cifar100(data_dir: Path | None) -> RawData:
    return _torchvision("CIFAR100", data_dir, Augment(pad=4, flip=True))


@register_dataset("svhn")
def load_svhn(data_dir: Path | None) -> RawData:
    return _torchvision("SVHN", data_dir, Augment(pad=4, flip=False))


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _read_image_folder(root: Path, classes: tuple[str, ...] | None, like: tuple[str, tuple[int, int]] | None = None
                       ) -> tuple[Split, tuple[str, ...], tuple[str, tuple[int, int]]]:
    """Read `root/<class>/*.<image>` into tensors. Every image takes the mode ('L' or 'RGB') and
    size of `like`, or else of the first image; returns the split, the classes and that (mode, size)."""
    from PIL import Image

    if classes is None:
        classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
        if len(classes) < 2:
            raise InputError(f"{root} must hold one folder per class (at least 2), found {len(classes)}")
    images, labels = [], []
    mode, size = like if like is not None else (None, None)
    for label, cls in enumerate(classes):
        folder = root / cls
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        for path in files:
            with Image.open(path) as im:
                if mode is None:
                    mode = "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"
                    size = im.size
                im = im.convert(mode)
                if im.size != size:
                    im = im.resize(size, Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}/<class>/")
    return Split(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)), classes, (mode, size)


def load_folder(path: Path) -> RawData:
    """`folder:PATH`: PATH/train/<class>/* and optionally PATH/test/<class>/* (ImageFolder layout)."""
    if not (path / "train").is_dir():
        raise InputError(f"folder dataset {path} needs {path}/train/<class>/<images> "
                         "(and optionally {path}/test/<class>/<images>)")
    train, classes, look = _read_image_folder(path / "train", None)
    test = None
    if (path / "test").is_dir():  # test images take the training images' mode and size
        test, _, _ = _read_image_folder(path / "test", classes, look)
    return RawData(train, test, classes, Augment(pad=max(1, train.x.shape[-1] // 8), flip=True))
