"""The teachers shipped with the package: present for the default ensemble, self-describing,
matching the Fashion-MNIST they were trained on, and reproducing their recorded validation
accuracy exactly (the split is fixed). They are used without training anything."""

from __future__ import annotations

import json

import pytest
import torch

from nas_kd.core.config import SearchConfig, TrainConfig
from nas_kd.data.datasets import load_dataset
from nas_kd.nets.arch import build
from nas_kd.nets.zoo import teacher_spec
from nas_kd.teaching import cache as teacher_cache
from nas_kd.teaching.cache import load_teacher_file, shipped_teacher, teacher_files
from nas_kd.teaching.ensemble import ensemble_from_config
from nas_kd.training.train import evaluate
from tests.conftest import run_cli

DEFAULT = SearchConfig()


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist")


def test_the_default_ensemble_is_shipped_and_larger_than_the_default_budget(fashion) -> None:
    files = {f.arch: f for f in teacher_files(teacher_cache.SHIPPED_TEACHERS, shipped=True)}
    assert set(DEFAULT.teachers) <= set(files)
    assert max(int(files[name].meta["macs"]) for name in DEFAULT.teachers) > 50_000_000
    assert sum(f.path.stat().st_size for f in files.values()) < 5e6  # a few MB in all


@pytest.mark.parametrize("name", DEFAULT.teachers)
def test_a_shipped_teacher_reproduces_its_recorded_validation_accuracy(fashion, name) -> None:
    file = shipped_teacher(name, fashion)  # raises if the fingerprint differed
    assert file is not None and file.meta["data_fingerprint"] == fashion.fingerprint()
    meta = file.meta
    assert meta["command"].startswith(f"python -m nas_kd.teachers train --dataset fashion-mnist --arch {name} ")
    assert {"epochs", "seed", "train", "versions", "test_acc", "train_seconds", "weights_sha256"} <= set(meta)
    # the command that made it says the epochs and seed the file records, and the schedule is the default one
    assert f"--epochs {meta['epochs']}" in meta["command"] and f"--seed {meta['seed']}" in meta["command"]
    assert json.loads(meta["train"])["batch_size"] == TrainConfig().batch_size
    model = build(teacher_spec(name), fashion.input_shape, fashion.num_classes)
    load_teacher_file(file, model)  # checks the weights against their digest
    assert f"{evaluate(model, fashion.val, fashion):.6f}" == meta["val_acc"]


def test_the_main_command_trains_no_teacher(fashion, tmp_path) -> None:
    ensemble = ensemble_from_config(SearchConfig(cache_dir=str(tmp_path)), fashion, progress=False, log=lambda m: None)
    assert [t.source for t in ensemble.members] == ["shipped"] * len(DEFAULT.teachers)
    assert not any(tmp_path.iterdir())  # nothing trained, nothing cached
    accs = [t.val_acc for t in ensemble.members]
    assert ensemble.accuracy(fashion.val, fashion) >= max(accs) - 0.005
    assert all(next(t.model.parameters()).dtype == torch.float32 for t in ensemble.members)


def test_list_shows_the_shipped_teachers(tmp_path) -> None:
    result = run_cli("nas_kd.teachers", "list", "--cache-dir", "empty", cwd=tmp_path)
    assert result.returncode == 0
    shipped = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("shipped")]
    assert sorted(shipped) == sorted(DEFAULT.teachers)
