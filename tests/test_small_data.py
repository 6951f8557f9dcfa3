"""Small real datasets: schedules adapt to the dataset's size, every class is validated, and a
teacher trained on about a thousand images learns (or, at the old schedule, is refused)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nas_kd.core.config import SearchConfig, TrainConfig, adapt_schedule
from nas_kd.data.datasets import DEBIAN_FASHION_MNIST, _read_idx, load_dataset
from nas_kd.teaching.cache import load_or_train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fashion-MNIST as PNG folders: 100 training and 30 test images of each of the 10 classes,
    halved to 14x14 pixels (a quarter of the compute of the teacher trained on them)."""
    root = tmp_path_factory.mktemp("fashion-folder")
    rng = np.random.default_rng(0)
    for split, idx, per_class in (("train", "train", 100), ("test", "t10k", 30)):
        x = _read_idx(DEBIAN_FASHION_MNIST / f"{idx}-images-idx3-ubyte.gz")
        y = _read_idx(DEBIAN_FASHION_MNIST / f"{idx}-labels-idx1-ubyte.gz")
        for c in range(10):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in rng.choice(np.flatnonzero(y == c), per_class, replace=False):
                Image.fromarray(x[i], "L").resize((14, 14), Image.BILINEAR).save(root / split / f"c{c}" / f"{i:05d}.png")
    return root


@pytest.mark.parametrize(("images", "steps", "expected"), [
    # Fashion-MNIST's 54,000: 421 steps an epoch, 31 a trial epoch of 4,000 images: nothing raised
    (54_000, 421, (3, 2, 3)),
    # 1,260 images: 9 steps an epoch, so 1,200 steps need 134 epochs; a trial's 60 steps 7
    (1_260, 9, (134, 7, 134)),
    # fewer images than a batch: one step an epoch
    (100, 1, (1200, 60, 1200)),
])
def test_schedules_adapt_to_the_dataset_size(images: int, steps: int, expected: tuple[int, int, int]) -> None:
    cfg, text = adapt_schedule(SearchConfig(), images)
    assert (cfg.teacher_epochs, cfg.trial_epochs, cfg.final_epochs) == expected
    assert text.startswith(f"schedule: {steps} steps an epoch ({images} training images, batch 128)")
    assert ("no epochs raised" in text) == (expected == (3, 2, 3))


def test_no_floor_and_no_retrain_stay_as_asked() -> None:
    off, text = adapt_schedule(SearchConfig(min_steps=0), 1_260)
    assert (off.teacher_epochs, off.trial_epochs, off.final_epochs) == (3, 2, 3) and "no epochs raised" in text
    workers, _ = adapt_schedule(SearchConfig(final_epochs=0), 1_260)
    assert workers.final_epochs == 0 and workers.teacher_epochs == 134


def test_the_validation_split_keeps_every_class(small_folder: Path) -> None:
    ds = load_dataset(f"folder:{small_folder}")
    assert torch.bincount(ds.val.y, minlength=10).tolist() == [10] * 10
    assert torch.bincount(ds.train.y, minlength=10).tolist() == [90] * 10
    assert len(ds.test) == 300


def test_a_teacher_learns_a_small_dataset_at_the_adapted_schedule(small_folder: Path, tmp_path: Path) -> None:
    """900 training images: the old 3 epochs (21 steps) leave ResNet-8 far below what it learns
    at 300 steps, which reach 70% validation accuracy."""
    ds = load_dataset(f"folder:{small_folder}")
    train = TrainConfig()
    old = load_or_train("resnet8", ds, 3, 0, train, tmp_path / "old", CPU, progress=False, log=lambda m: None,
                        min_gain=0)
    cfg, _ = adapt_schedule(SearchConfig(min_steps=300, teacher_epochs=3), len(ds.train))
    assert cfg.teacher_epochs == 43  # 7 steps an epoch
    new = load_or_train("resnet8", ds, cfg.teacher_epochs, 0, train, tmp_path / "new", CPU, progress=False,
                        log=lambda m: None)
    assert new.val_acc >= 0.70 and new.val_acc - old.val_acc >= 0.15, (old.val_acc, new.val_acc)
