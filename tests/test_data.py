"""Datasets: fixed splits of Fashion-MNIST and image folders, loader errors, indexed augmentation."""

from __future__ import annotations

import gzip
import shutil
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nas_kd.core.errors import InputError
from nas_kd.data import datasets as data
from nas_kd.data.batches import BatchIterator, Normalizer, augment_params, seeded_subset, shift_flip
from nas_kd.data.datasets import (
    DATASETS,
    FASHION_CLASSES,
    Augment,
    Split,
    dataset_names,
    load_dataset,
    load_fashion_mnist,
)

# Loaders that read local files; every other registered one must download.
OFFLINE = {"fashion-mnist"}
NETWORK = sorted(set(DATASETS) - OFFLINE)
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def rows(split: Split) -> list[bytes]:
    """One key per image: its pixels and its label, to compare splits as multisets of examples."""
    x = split.x.reshape(len(split), -1).numpy()
    return [r.tobytes() + int(y).to_bytes(2, "big") for r, y in zip(x, split.y.tolist())]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Batches of a few hundred 28x28 images: on a busy 2-core machine a second intra-op thread
    makes them several times slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fashion():
    """The full Fashion-MNIST (Debian files), loaded twice."""
    return load_dataset("fashion-mnist"), load_dataset("fashion-mnist")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No name resolution: downloads fail at once whether or not the machine is online."""
    def refuse(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "offline (test)")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ---------------------------------------------------------------- Fashion-MNIST


def test_registered_names():
    assert set(DATASETS) == {"fashion-mnist", "mnist", "cifar10", "cifar100", "svhn"}
    assert dataset_names() == [*DATASETS, "folder:PATH"]


def test_fashion_mnist_splits(fashion):
    ds, _ = fashion
    assert (len(ds.train), len(ds.val), len(ds.test)) == (54000, 6000, 10000)
    for split, n in ((ds.train, 54000), (ds.val, 6000), (ds.test, 10000)):
        assert split.x.shape == (n, 1, 28, 28)
        assert split.x.dtype == torch.uint8
        assert split.y.shape == (n,)
        assert split.y.dtype == torch.int64
        assert sorted(split.y.unique().tolist()) == list(range(10))
    assert ds.classes == FASHION_CLASSES
    assert (ds.input_shape, ds.num_classes) == ((1, 28, 28), 10)
    assert ds.augment == Augment(pad=2, flip=True)
    # stratified: 10% of each class's 6000 training images
    assert torch.bincount(ds.val.y, minlength=10).tolist() == [600] * 10
    assert torch.bincount(ds.train.y, minlength=10).tolist() == [5400] * 10
    assert torch.bincount(ds.test.y, minlength=10).tolist() == [1000] * 10


def test_fashion_mnist_val_and_train_partition_the_original(fashion):
    ds, _ = fashion
    raw = load_fashion_mnist(None)
    assert len(raw.train) == 60000
    original, train, val = Counter(rows(raw.train)), Counter(rows(ds.train)), Counter(rows(ds.val))
    assert len(original) == 60000  # no repeated (image, label): set arithmetic below is exact
    assert not set(train) & set(val)
    assert train + val == original
    assert torch.equal(ds.test.x, raw.test.x) and torch.equal(ds.test.y, raw.test.y)


def test_fashion_mnist_mean_std(fashion):
    ds, _ = fashion
    # exact figures from the histogram of the 256 pixel values
    hist = torch.bincount(ds.train.x.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    n = hist.sum()
    mean = (hist * values).sum() / n
    std = ((hist * (values - mean) ** 2).sum() / (n - 1)).sqrt()
    assert ds.mean[0] == pytest.approx(mean.item(), abs=1e-5)
    assert ds.std[0] == pytest.approx(std.item(), abs=1e-5)
    assert ds.mean[0] == pytest.approx(0.2860, abs=1e-3)  # Fashion-MNIST's well-known figures
    assert ds.std[0] == pytest.approx(0.3530, abs=1e-3)


def test_fashion_mnist_deterministic(fashion):
    a, b = fashion
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(a, name).x, getattr(b, name).x)
        assert torch.equal(getattr(a, name).y, getattr(b, name).y)
    assert a.fingerprint() == b.fingerprint()
    # pinned: a change here moves every study's validation images and invalidates every cache
    assert a.fingerprint() == "36c8bd06fe10"


def test_data_dir_wins_over_debian(mini_fashion_dir, mini_dataset):
    ds = mini_dataset
    # the first 600 images hold [62, 66, 57, 58, 59, 58, 66, 61, 58, 55] per class; 10% of each, rounded
    assert torch.bincount(ds.val.y, minlength=10).tolist() == [6, 7, 6, 6, 6, 6, 7, 6, 6, 6]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (538, 62, 200)
    assert ds.train.x.shape == (538, 1, 28, 28)
    debian = load_fashion_mnist(None)
    assert torch.equal(ds.test.x, debian.test.x[:200])
    assert Counter(rows(ds.train)) + Counter(rows(ds.val)) == Counter(rows(debian.train.subset(torch.arange(600))))
    assert ds.fingerprint() != "36c8bd06fe10"  # the full dataset's


@pytest.mark.parametrize("layout", [".", "fashion-mnist", "FashionMNIST/raw"])
def test_data_dir_layouts(tmp_path, mini_fashion_dir, mini_dataset, layout):
    target = tmp_path / layout
    target.mkdir(parents=True, exist_ok=True)
    for p in mini_fashion_dir.iterdir():
        shutil.copy(p, target)
    ds = load_dataset("fashion-mnist", tmp_path)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (538, 62, 200)
    assert ds.fingerprint() == mini_dataset.fingerprint()


def test_uncompressed_idx_files(tmp_path, mini_fashion_dir, mini_dataset):
    for p in mini_fashion_dir.iterdir():
        (tmp_path / p.name.removesuffix(".gz")).write_bytes(gzip.decompress(p.read_bytes()))
    ds = load_dataset("fashion-mnist", tmp_path)
    assert ds.fingerprint() == mini_dataset.fingerprint()
    assert torch.equal(ds.test.x, mini_dataset.test.x)


# ---------------------------------------------------------------- folders of images


def write_folder(root: Path, classes: list[str], n: int, size: tuple[int, int], mode: str, start: int = 0) -> dict:
    """n distinct images per class under root/<class>/; returns {(class, i): array as written}."""
    rng = np.random.default_rng(start)
    written = {}
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(arr, mode).save(root / c / f"{i:03d}.png")
            written[(c, i)] = arr
    return written


def chw(arr: np.ndarray) -> np.ndarray:
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


CLASSES = ["cat", "ant", "bird"]  # deliberately unsorted on disk


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3)])
@pytest.mark.parametrize("with_test", [True, False], ids=["test-folder", "carved-test"])
def test_folder_dataset(tmp_path, mode, channels, with_test):
    train = write_folder(tmp_path / "train", CLASSES, 10, (12, 10), mode)
    test = write_folder(tmp_path / "test", CLASSES, 4, (12, 10), mode, start=1) if with_test else {}
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.classes == ("ant", "bird", "cat")
    assert ds.input_shape == (channels, 10, 12)
    assert ds.augment == Augment(pad=1, flip=True)  # pad = max(1, 12 // 8)
    # 4 per class; or carved: 20% of 10 is 2, raised to 3 a class (MIN_CARVED_PER_CLASS, at most a third)
    n_test = 12 if with_test else 9
    # validation: 10% of 10 (or 7) is 1, raised to 3 a class (or 2: a third of 7)
    n_val = 9 if with_test else 6
    assert (len(ds.test), len(ds.val), len(ds.train)) == (n_test, n_val, 30 - n_val - (0 if with_test else n_test))
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == torch.uint8
        assert split.x.shape[1:] == (channels, 10, 12)
    per_class = n_test // 3
    assert torch.bincount(ds.test.y, minlength=3).tolist() == [per_class] * 3
    # every image comes back with the label of its (sorted) class folder, pixel for pixel
    expect_train = Counter(chw(a).tobytes() + ds.classes.index(c).to_bytes(2, "big") for (c, _), a in train.items())
    got_train = Counter(rows(ds.train)) + Counter(rows(ds.val))
    test_rows = Counter(rows(ds.test))
    assert not set(test_rows) & set(got_train)
    if with_test:
        assert got_train == expect_train
        assert test_rows == Counter(chw(a).tobytes() + ds.classes.index(c).to_bytes(2, "big")
                                    for (c, _), a in test.items())
    else:
        assert got_train + test_rows == expect_train


def test_folder_carved_test_is_fixed(tmp_path):
    write_folder(tmp_path / "train", CLASSES, 10, (8, 8), "L")
    a, b = load_dataset(f"folder:{tmp_path}"), load_dataset(f"folder:{tmp_path}")
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.val.x, b.val.x)


def test_folder_resizes_to_first_image(tmp_path):
    """The first image (first file of the first sorted class) sets the size; others are resized."""
    write_folder(tmp_path / "train", ["a"], 3, (12, 10), "RGB")
    odd = np.random.default_rng(5).integers(0, 256, (7, 9, 3), dtype=np.uint8)  # (H, W, C)
    (tmp_path / "train" / "b").mkdir()
    Image.fromarray(odd, "RGB").save(tmp_path / "train" / "b" / "0.png")
    gray = np.random.default_rng(6).integers(0, 256, (10, 12), dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "train" / "b" / "1.png")
    ds = load_dataset(f"folder:{tmp_path}", val_fraction=0.4)
    assert ds.input_shape == (3, 10, 12)
    everything = Counter(rows(ds.train)) + Counter(rows(ds.val)) + Counter(rows(ds.test))
    resized = np.asarray(Image.fromarray(odd, "RGB").resize((12, 10), Image.BILINEAR))
    as_rgb = np.asarray(Image.fromarray(gray, "L").convert("RGB"))
    assert everything[chw(resized).tobytes() + (1).to_bytes(2, "big")] == 1
    assert everything[chw(as_rgb).tobytes() + (1).to_bytes(2, "big")] == 1


def test_folder_test_images_take_the_training_mode_and_size(tmp_path):
    write_folder(tmp_path / "train", ["a", "b"], 3, (8, 8), "L")
    write_folder(tmp_path / "test", ["a", "b"], 1, (6, 6), "RGB")
    ds = load_dataset(f"folder:{tmp_path}")
    assert tuple(ds.test.x.shape) == (2, 1, 8, 8) and ds.input_shape == (1, 8, 8)


@pytest.mark.parametrize("setup,match", [
    ("no-train", r"needs .*/train/<class>"),
    ("one-class", r"at least 2\), found 1"),
    ("no-images", r"no images .* found under"),
])
def test_folder_errors(tmp_path, setup, match):
    if setup == "one-class":
        write_folder(tmp_path / "train", ["only"], 3, (8, 8), "L")
    elif setup == "no-images":
        for c in ("a", "b"):
            (tmp_path / "train" / c).mkdir(parents=True)
            (tmp_path / "train" / c / "notes.txt").write_text("not an image")
    else:
        write_folder(tmp_path / "images", ["a", "b"], 3, (8, 8), "L")
    with pytest.raises(InputError, match=match) as e:
        load_dataset(f"folder:{tmp_path}")
    assert str(tmp_path) in str(e.value)


# ---------------------------------------------------------------- errors


def test_unknown_dataset_lists_known():
    with pytest.raises(InputError, match="unknown dataset 'imagenet'") as e:
        load_dataset("imagenet")
    for name in dataset_names():
        assert name in str(e.value)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_val_fraction(mini_fashion_dir, fraction):
    with pytest.raises(InputError, match="validation fraction"):
        load_dataset("fashion-mnist", mini_fashion_dir, val_fraction=fraction)


@pytest.mark.parametrize("name", NETWORK)
def test_network_loader_offline(tmp_path, offline, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as e:
        load_dataset(name, tmp_path / "empty")
    message = str(e.value)
    assert name.replace("-", "") in message.lower()
    assert str(tmp_path / "empty") in message
    assert "\n" not in message  # the command line shows it as one line


def test_fashion_mnist_missing_everywhere(tmp_path, offline, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    with pytest.raises(InputError, match="Fashion-MNIST not found") as e:
        load_dataset("fashion-mnist", tmp_path / "empty")
    message = str(e.value)
    assert str(tmp_path / "empty") in message and "no-debian-package" in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "\n" not in message


def corrupt(path: Path, how: str) -> None:
    raw = gzip.decompress(path.read_bytes())
    if how == "truncated-content":  # a valid gzip of too few pixels
        path.write_bytes(gzip.compress(raw[:-100]))
    elif how == "truncated-gzip":  # the download or copy stopped half way
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif how == "not-gzip":
        path.write_bytes(b"<html>404 Not Found</html>")
    elif how == "wrong-type":  # idx of int32 instead of unsigned bytes
        path.write_bytes(gzip.compress(bytes([0, 0, 0x0C]) + raw[3:]))


@pytest.mark.parametrize("how", ["truncated-content", "truncated-gzip", "not-gzip", "wrong-type"])
def test_corrupt_idx_file(tmp_path, mini_fashion_dir, how):
    for p in mini_fashion_dir.iterdir():
        shutil.copy(p, tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    corrupt(bad, how)
    with pytest.raises(InputError) as e:
        load_dataset("fashion-mnist", tmp_path)
    assert str(bad) in str(e.value)


def test_partial_data_dir_is_not_mixed_with_debian(tmp_path, mini_fashion_dir):
    """Only the 600 training images in --data-dir: never pair them with Debian's 60000 labels.
    The incomplete folder is passed over as a whole, and all four of Debian's files are used."""
    shutil.copy(mini_fashion_dir / "train-images-idx3-ubyte.gz", tmp_path)
    ds = load_dataset("fashion-mnist", tmp_path)
    debian = load_dataset("fashion-mnist", None)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (54_000, 6_000, 10_000)
    assert ds.fingerprint() == debian.fingerprint()
    assert torch.equal(ds.train.x, debian.train.x) and torch.equal(ds.train.y, debian.train.y)


# ---------------------------------------------------------------- augmentation


AUG = Augment(pad=2, flip=True)


@pytest.mark.parametrize("augment", [AUG, Augment(4, False), Augment(0, True)])
def test_augment_params(augment):
    n = 500
    dy, dx, flip = augment_params(n, augment, 0, seed=3)
    assert not dy.any() and not dx.any() and not flip.any()
    a = augment_params(n, augment, 1, seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a, augment_params(n, augment, 1, seed=3)))
    b = augment_params(n, augment, 2, seed=3)
    c = augment_params(n, augment, 1, seed=4)
    dy, dx, flip = a
    assert dy.dtype == dx.dtype == torch.int64 and flip.dtype == torch.bool
    for offsets in (dy, dx):
        assert offsets.min() == -augment.pad and offsets.max() == augment.pad  # the whole range, at n=500
    assert bool(flip.any()) == augment.flip and bool(flip.all()) is False
    varied = [i for i, t in enumerate(a) if t.unique().numel() > 1]
    assert varied == ([0, 1] if augment.pad else []) + ([2] if augment.flip else [])
    for other in (b, c):
        assert any(not torch.equal(a[i], other[i]) for i in varied)


def test_augment_params_none():
    for view in (0, 1, 5):
        dy, dx, flip = augment_params(10, Augment(0, False), view, seed=1)
        assert not dy.any() and not dx.any() and not flip.any()


def naive_shift_flip(x: np.ndarray, dy: int, dx: int, flip: bool) -> np.ndarray:
    """One (C, H, W) image: out[:, i, j] = x[:, i + dy, j + dx], zero outside; then mirror columns."""
    c, h, w = x.shape
    out = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            if 0 <= i + dy < h and 0 <= j + dx < w:
                out[:, i, j] = x[:, i + dy, j + dx]
    return out[:, :, ::-1] if flip else out


@pytest.mark.parametrize("dy,dx,flip", [(0, 0, False), (0, 0, True), (1, 0, False), (0, -1, False), (-2, 3, True),
                                        (2, -2, False), (-4, -4, True), (6, 0, False)])
def test_shift_flip_single(dy, dx, flip):
    x = torch.randint(0, 256, (1, 3, 5, 7), dtype=torch.uint8)  # H != W catches swapped axes
    got = shift_flip(x, torch.tensor([dy]), torch.tensor([dx]), torch.tensor([flip]))
    assert got.dtype == torch.uint8
    assert np.array_equal(got[0].numpy(), naive_shift_flip(x[0].numpy(), dy, dx, flip))


@pytest.mark.parametrize("pad,channels", [(0, 1), (1, 1), (2, 3), (4, 3)])
def test_shift_flip_batch(pad, channels):
    """Mixed offsets in one batch: each image moves by its own (dy, dx), as the reference does."""
    g = torch.Generator().manual_seed(pad)
    x = torch.randint(0, 256, (64, channels, 9, 8), dtype=torch.uint8, generator=g)
    dy, dx, flip = augment_params(64, Augment(pad, True), view=1, seed=pad)
    got = shift_flip(x, dy, dx, flip)
    assert got.shape == x.shape
    for i in range(64):
        assert np.array_equal(got[i].numpy(), naive_shift_flip(x[i].numpy(), int(dy[i]), int(dx[i]), bool(flip[i])))


def test_shift_flip_empty_batch():
    x = torch.zeros(0, 1, 4, 4, dtype=torch.uint8)
    empty = torch.zeros(0, dtype=torch.int64)
    assert shift_flip(x, empty, empty, empty.bool()).shape == (0, 1, 4, 4)


# ---------------------------------------------------------------- batches


@pytest.mark.parametrize("views,expected", [(None, [1, 2, 3, 4, 5, 6]), (1, [0] * 6), (3, [0, 1, 2, 0, 1, 2])])
def test_batch_iterator_views(mini_dataset, views, expected):
    split = mini_dataset.train.subset(torch.arange(100))
    it = BatchIterator(split, mini_dataset, batch_size=32, seed=0, views=views)
    assert [it.view_of(e) for e in range(6)] == expected
    for e in range(6):
        assert {b.view for b in it.epoch(e)} == {expected[e]}


@pytest.mark.parametrize("views", [0, -1])
def test_batch_iterator_bad_views(mini_dataset, views):
    with pytest.raises(ValueError, match="views must be >= 1"):
        BatchIterator(mini_dataset.train, mini_dataset, batch_size=64, seed=0, views=views)


@pytest.mark.parametrize("batch_size,n_batches", [(1000, 1), (538, 1), (269, 2), (100, 5), (64, 8)])
def test_batch_iterator_epochs(mini_dataset, batch_size, n_batches):
    """Full batches only (one batch of everything when the split is smaller): no image twice in an
    epoch, and every image once when the batch size divides the split."""
    split = mini_dataset.train
    size = min(batch_size, 538)
    it = BatchIterator(split, mini_dataset, batch_size=batch_size, seed=2, views=2)
    assert len(it) == n_batches
    orders = []
    for e in range(3):
        batches = list(it.epoch(e))
        assert [len(b.index) for b in batches] == [size] * n_batches
        index = torch.cat([b.index for b in batches])
        assert len(index.unique()) == len(index)
        if 538 % size == 0:
            assert torch.equal(index.sort().values, torch.arange(538))
        for b in batches:
            assert torch.equal(b.y, split.y[b.index])
            assert b.x.dtype == torch.float32 and b.x.shape == (size, 1, 28, 28)
            assert torch.equal(b.x, it.images(b.index, b.view))
        orders.append(index)
    assert not torch.equal(orders[0], orders[1])  # reshuffled each epoch
    again = BatchIterator(split, mini_dataset, batch_size=batch_size, seed=2, views=2)
    assert torch.equal(torch.cat([b.index for b in again.epoch(1)]), orders[1])


def test_images_depend_on_index_and_view_only(mini_dataset):
    """What the teacher cache relies on: the pixels of (image, view) never depend on the batch."""
    split = mini_dataset.train
    it = BatchIterator(split, mini_dataset, batch_size=100, seed=5, views=4)
    other = BatchIterator(split, mini_dataset, batch_size=37, seed=5, views=4)
    everything = torch.arange(538)
    for view in range(4):
        full = it.images(everything, view)
        assert torch.equal(full, it.images(everything, view))
        assert torch.equal(full, other.images(everything, view))
        for b in other.epoch(view + 4):  # same view, another order
            assert torch.equal(b.x, full[b.index])
    normalize = Normalizer(mini_dataset.mean, mini_dataset.std, torch.device("cpu"))
    assert torch.equal(it.images(everything, 0), normalize(split.x))  # view 0 is the image itself
    for view in (1, 2, 3):
        assert not torch.equal(it.images(everything, view), it.images(everything, 0))
    assert not torch.equal(it.images(everything, 1), it.images(everything, 2))
    seeded = BatchIterator(split, mini_dataset, batch_size=100, seed=6, views=4)
    assert not torch.equal(seeded.images(everything, 1), it.images(everything, 1))


def test_no_augment(mini_dataset):
    split = mini_dataset.train
    it = BatchIterator(split, mini_dataset, batch_size=100, seed=5, augment=False)
    index = torch.arange(538)
    assert all(torch.equal(it.images(index, v), it.images(index, 0)) for v in (1, 2, 7))


# ---------------------------------------------------------------- subsets


@pytest.mark.parametrize("n_total,n,seed", [(538, 100, 0), (538, 100, 1), (10, 9, 3), (1000, 1, 7)])
def test_seeded_subset(n_total, n, seed):
    s = seeded_subset(n_total, n, seed)
    assert torch.equal(s, seeded_subset(n_total, n, seed))
    assert len(s) == n and len(s.unique()) == n
    assert torch.equal(s, s.sort().values)
    assert 0 <= int(s.min()) and int(s.max()) < n_total
    if n_total - n > 1:
        assert not torch.equal(s, seeded_subset(n_total, n, seed + 1))


@pytest.mark.parametrize("n", [None, 538, 10_000])
def test_seeded_subset_all(n):
    assert torch.equal(seeded_subset(538, n, 0), torch.arange(538))
