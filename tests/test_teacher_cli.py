"""`python -m nas_kd.teachers`: resumable training into the search's cache, the list of teachers,
and how shipped teacher files are found, checked and refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nas_kd.core.config import TrainConfig
from nas_kd.core.errors import InputError
from nas_kd.nets.arch import build
from nas_kd.nets.cost import count
from nas_kd.nets.weights import read_metadata, save_model
from nas_kd.nets.zoo import teacher_spec
from nas_kd.teaching import cache as teacher_cache
from nas_kd.teaching.cache import (
    cache_file,
    load_or_train,
    partial_file,
    shipped_teacher,
    teacher_metadata,
    train_teacher,
)
from nas_kd.training.train import Checkpoint, evaluate
from tests.conftest import TINY_DATA_FLAGS, run_cli

CPU = torch.device("cpu")
TINY = TrainConfig(batch_size=100, augment=True)


class Killed(Exception):
    pass


@pytest.mark.parametrize("bf16", [False, True])
def test_a_killed_training_resumes_to_the_same_weights(mini_dataset, tmp_path, bf16) -> None:
    cfg = TrainConfig(batch_size=100, augment=True, bf16=bf16)
    whole, _ = train_teacher("resnet8", mini_dataset, 3, 0, cfg, CPU, progress=False)

    ckpt = Checkpoint(tmp_path / "partial.pt")

    def kill(model, epoch: int) -> None:
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        train_teacher("resnet8", mini_dataset, 3, 0, cfg, CPU, progress=False, checkpoint=ckpt, on_epoch=kill)
    assert torch.load(ckpt.path, weights_only=True)["epoch"] == 1  # two epochs done when it was killed
    done = []
    resumed, _ = train_teacher("resnet8", mini_dataset, 3, 0, cfg, CPU, progress=False, checkpoint=ckpt,
                               on_epoch=lambda model, epoch: done.append(epoch))
    assert done == [2]  # only the missing epoch ran
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_damaged_training_checkpoint_is_one_line(tmp_path) -> None:
    path = tmp_path / "partial.pt"
    path.write_bytes(b"half a checkpoint")
    with pytest.raises(InputError, match=r"cannot resume from .*partial.pt: the file is damaged .*delete it"):
        Checkpoint(path).load()


def test_train_command_writes_a_self_describing_teacher_the_search_uses(mini_fashion_dir, mini_dataset,
                                                                        tmp_path) -> None:
    args = ["train", "--dataset", "fashion-mnist", "--data-dir", str(mini_fashion_dir), "--arch", "resnet8",
            "--epochs", "2", "--augment", "--label-smoothing", "0.1", "--batch-size", "100", "--seed", "4",
            "--quiet", "--out-dir", "out"]
    result = run_cli("nas_kd.teachers", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "teacher resnet8 epoch 1/2: val acc" in result.stderr and "epoch 2/2" in result.stderr
    cfg = TrainConfig(batch_size=100, augment=True, label_smoothing=0.1)
    path = tmp_path / cache_file("resnet8", mini_dataset, 2, 4, cfg, Path("out/cache"))
    assert path.is_file() and not partial_file(path).exists()  # the checkpoint is gone once done
    meta = read_metadata(path)
    assert meta["command"] == "python -m nas_kd.teachers " + " ".join(args)
    assert (meta["format"], meta["arch"], meta["dataset"], meta["data_fingerprint"], meta["epochs"], meta["seed"]) == \
        ("nas_kd.teacher", "resnet8", "fashion-mnist", mini_dataset.fingerprint(), "2", "4")
    assert json.loads(meta["train"]) == cfg.__dict__
    assert set(json.loads(meta["versions"])) >= {"nas_kd", "torch"}
    assert {"val_acc", "test_acc", "macs", "params", "weights_sha256"} <= set(meta)

    again = run_cli("nas_kd.teachers", *args, cwd=tmp_path)  # already trained: nothing to do
    assert again.returncode == 0 and "already trained" in again.stderr

    # the search's loader finds it in the cache, though its own teacher schedule differs
    teacher = load_or_train("resnet8", mini_dataset, 1, 0, TrainConfig(), tmp_path / "out/cache", CPU, min_gain=0,
                            progress=False, log=lambda m: None)
    assert (teacher.source, teacher.path) == ("cache", str(path))
    assert f"{teacher.val_acc:.6f}" == meta["val_acc"]

    listed = run_cli("nas_kd.teachers", "list", "--out-dir", "out", cwd=tmp_path)
    assert listed.returncode == 0
    row = [line for line in listed.stdout.splitlines() if line.startswith("cache")]
    assert len(row) == 1 and "resnet8" in row[0] and f"{float(meta['val_acc']):.4f}" in row[0] and row[0].endswith(str(path.relative_to(tmp_path)))


def test_list_on_an_empty_cache(tmp_path, monkeypatch, capsys) -> None:
    from nas_kd.teachers import main

    monkeypatch.setattr(teacher_cache, "SHIPPED_TEACHERS", tmp_path / "none shipped")
    assert main(["list", "--cache-dir", str(tmp_path / "nothing")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["source  arch  dataset  fingerprint  cost  epochs  val acc  test acc  path",
                   f"(no teachers: none shipped in {tmp_path / 'none shipped'}, none cached in "
                   f"{tmp_path / 'nothing' / 'teachers'})"]


def test_a_diverging_or_interrupted_training_is_one_line(mini_fashion_dir, tmp_path, monkeypatch, capsys) -> None:
    from nas_kd import teachers

    args = ["train", "--data-dir", str(mini_fashion_dir), "--arch", "resnet8", "--epochs", "1", "--batch-size", "100",
            "--lr", "1e6", "--quiet", "--cache-dir", str(tmp_path)]
    assert teachers.main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[nas_kd]")]
    assert len(err) == 1 and err[0].startswith("error: teacher resnet8: loss became") and \
        "the training diverged; lower --lr (it was 1e+06)" in err[0], err

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(teachers, "train_teacher", interrupt)
    assert teachers.main(args[:-5] + ["--quiet", "--cache-dir", str(tmp_path)]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err


def test_ship_refuses_a_file_that_is_not_a_teacher(tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    from nas_kd.teachers import main

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "something"})
    assert main(["ship", str(tmp_path / "other.safetensors"), "--to", str(tmp_path / "out")]) == 2
    assert "is not a teacher written by `python -m nas_kd.teachers train` (metadata format 'something'" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_model_is_one_line(mini_dataset, tmp_path) -> None:
    ckpt = Checkpoint(tmp_path / "partial.pt")
    ckpt.save({"model": {"w": torch.zeros(1)}, "optimizer": {}, "scheduler": {}, "epoch": 0, "seconds": 1.0})
    with pytest.raises(InputError, match="cannot resume from .*: it was saved by another model or schedule"):
        train_teacher("resnet8", mini_dataset, 2, 0, TINY, CPU, progress=False, checkpoint=ckpt)
    ckpt.save({"model": {}})
    with pytest.raises(InputError, match="not a training checkpoint of nas_kd"):
        ckpt.load()


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--arch", "resnet19", "--epochs", "1"], "unknown teacher 'resnet19'; known: resnet8"),
    (["train", "--arch", "resnet8", "--epochs", "0"], "argument --epochs: must be >= 1, got '0'"),
    (["train", "--arch", "resnet8", "--epochs", "1", "--label-smoothing", "1"],
     "argument --label-smoothing: must be in [0.0, 1.0), got '1'"),
    (["train", "--arch", "resnet8", "--epochs", "1", "--lr", "inf"], "argument --lr: expected a finite number, got 'inf'"),
    (["ship", "nope.safetensors"], "cannot read nope.safetensors: not a readable safetensors file"),
    (["train", "--arch", "resnet8", "--epochs", "1", "--dataset", "nope"], "unknown dataset 'nope'"),
])
def test_bad_train_flags_are_one_line(tmp_path, args, message) -> None:
    result = run_cli("nas_kd.teachers", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


# ---------------------------------------------------------------- shipped teachers


def _fake_shipped(folder: Path, dataset, fingerprint: str | None = None) -> Path:
    """A resnet8 'shipped' file for `dataset`, as `ship` writes them (float16)."""
    model = build(teacher_spec("resnet8"), dataset.input_shape, dataset.num_classes)
    cost = count(build(teacher_spec("resnet8"), dataset.input_shape, 10, channels_last=False), dataset.input_shape)
    meta = teacher_metadata("resnet8", dataset, 1, 0, TrainConfig(), cost, 0.5, 0.5, 1.0, "test")
    if fingerprint:
        meta["data_fingerprint"] = fingerprint
    path = folder / "resnet8-fashion-mnist.safetensors"
    save_model(model, path, {**meta, "val_acc": f"{evaluate(model, dataset.val, dataset):.6f}"}, dtype=torch.float16)
    return path


def test_a_shipped_teacher_is_used_and_never_trained_over(mini_dataset, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(teacher_cache, "SHIPPED_TEACHERS", tmp_path / "shipped")
    path = _fake_shipped(tmp_path / "shipped", mini_dataset)
    teacher = load_or_train("resnet8", mini_dataset, 1, 0, TrainConfig(), tmp_path / "cache", CPU, min_gain=0, progress=False,
                            log=lambda m: None)
    assert (teacher.source, teacher.path) == ("shipped", str(path))
    assert f"{teacher.val_acc:.6f}" == read_metadata(path)["val_acc"]
    assert not (tmp_path / "cache").exists()
    off = load_or_train("resnet8", mini_dataset, 1, 0, TrainConfig(batch_size=100), tmp_path / "cache", CPU, min_gain=0,
                        progress=False, log=lambda m: None, shipped=False)
    assert off.source == "trained"


def _flip_a_weight_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the last tensor's bytes; the header stays readable
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "message"), [
    ("fingerprint", r"shipped teacher resnet8 \(.*\) was trained on fashion-mnist with data fingerprint 0123456789ab, "
                    r"but the data loaded has \w+; run the search with --no-shipped-teachers"),
    ("flip", r"shipped teacher resnet8 .* is damaged: its weights do not match the digest it recorded; reinstall"),
    ("truncate", r"cannot read .*resnet8-fashion-mnist.safetensors: not a readable safetensors file"),
])
def test_a_mismatched_or_damaged_shipped_teacher_is_refused(mini_fashion_dir, mini_dataset, tmp_path, monkeypatch,
                                                            capsys, damage, message) -> None:
    from nas_kd.search import main

    monkeypatch.setattr(teacher_cache, "SHIPPED_TEACHERS", tmp_path / "shipped")
    path = _fake_shipped(tmp_path / "shipped", mini_dataset, "0123456789ab" if damage == "fingerprint" else None)
    if damage == "flip":
        _flip_a_weight_byte(path)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:20])
    before = path.read_bytes()
    code = main(["--flops-budget", "5M", "--teachers", "resnet8", "--data-dir", str(mini_fashion_dir), "--quiet",
                 *TINY_DATA_FLAGS,
                 "--out-dir", str(tmp_path / "out"), "--trials", "1"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and __import__("re").search(message, lines[0]), err
    assert "Traceback" not in err
    assert path.read_bytes() == before  # never trained over
    assert not (tmp_path / "out" / "cache" / "teachers").exists()


def test_shipped_teachers_do_not_apply_to_other_datasets(mini_dataset, tmp_path) -> None:
    other = mini_dataset.__class__("mnist", mini_dataset.train, mini_dataset.val, mini_dataset.test,
                                   mini_dataset.classes, mini_dataset.mean, mini_dataset.std, mini_dataset.augment)
    _fake_shipped(tmp_path, mini_dataset)
    assert shipped_teacher("resnet8", other, tmp_path) is None
    assert shipped_teacher("resnet20", mini_dataset, tmp_path) is None


def test_a_study_does_not_go_on_with_other_teacher_weights() -> None:
    import optuna

    from nas_kd.nas.study import STUDY_ATTR, check_same_teachers

    study = optuna.create_study(study_name="s")
    first = [{"name": "wrn16_2", "path": "a.safetensors", "weights_sha256": "aaa"}]
    check_same_teachers(study, first)  # a new study takes any teachers
    study.set_user_attr(STUDY_ATTR, {"teachers": first})
    check_same_teachers(study, first)
    check_same_teachers(study, [{"name": "resnet20", "path": "b.safetensors", "weights_sha256": "bbb"}])
    with pytest.raises(InputError, match=r"study 's' distilled from other weights of teacher wrn16_2 \(a.safetensors\) "
                                         r"than this run loaded \(c.safetensors\); pass that file with "
                                         r"--teacher-ckpt wrn16_2=PATH, or start another --study-name"):
        check_same_teachers(study, [{"name": "wrn16_2", "path": "c.safetensors", "weights_sha256": "ccc"}])
    study.set_user_attr(STUDY_ATTR, {"teachers": [{"name": "wrn16_2", "path": "a.safetensors"}]})  # recorded before
    check_same_teachers(study, [{"name": "wrn16_2", "path": "c.safetensors", "weights_sha256": "ccc"}])
