"""Teachers from files (`--teacher PATH`): an ONNX model or a torch.export program gives the soft targets
the same network gives as a zoo teacher, joins an ensemble with zoo teachers end to end, and every bad
file is refused in one line with exit status 2 before anything is written."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
import torch.nn as nn
from conftest import TINY_DATA_FLAGS, run_cli

from nas_kd import search as search_cli
from nas_kd.data.batches import BatchIterator
from nas_kd.nets.arch import build
from nas_kd.nets.cost import count
from nas_kd.nets.zoo import teacher_spec
from nas_kd.teaching.cache import SHIPPED_TEACHERS, Teacher
from nas_kd.teaching.ensemble import CachedTargets, Ensemble, soft_targets
from nas_kd.teaching.files import load_file_teacher
from nas_kd.training.train import accuracy, predict


def to_onnx(model: nn.Module, path: Path, shape: tuple[int, ...] = (1, 28, 28), meta: dict[str, str] | None = None) -> Path:
    torch.onnx.export(model.eval(), (torch.zeros(2, *shape),), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    if meta:
        proto = onnx.load(str(path))
        for key, value in meta.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, str(path))
    return path


def to_program(model: nn.Module, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(model.eval(), (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path), extra_files={"nas_kd.input": "dataset"})
    return path


@pytest.fixture(scope="module")
def wrn(mini_dataset) -> nn.Module:
    """The shipped wrn16_2 teacher, as a zoo network."""
    model = build(teacher_spec("wrn16_2"), mini_dataset.input_shape, mini_dataset.num_classes)
    from nas_kd.nets.weights import load_weights

    load_weights(model, next(SHIPPED_TEACHERS.glob("wrn16_2-*.safetensors")), "wrn16_2")
    return model.float().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def files(wrn: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("teacher-files")
    return {"onnx": to_onnx(wrn, folder / "wrn16_2.onnx"), "export": to_program(wrn, folder / "wrn16_2.pt2")}


@pytest.mark.parametrize("kind", ["onnx", "export"])
def test_a_teacher_file_gives_the_zoo_teachers_soft_targets(kind: str, wrn: nn.Module, files: dict[str, Path],
                                                            mini_dataset) -> None:
    teacher = load_file_teacher(files[kind], mini_dataset, torch.device("cpu"))
    zoo = predict(wrn, mini_dataset.val, mini_dataset)
    assert torch.allclose(teacher.val_logits, zoo, atol=1e-4)
    assert teacher.val_acc == accuracy(zoo, mini_dataset.val.y)
    cost = count(build(teacher_spec("wrn16_2"), mini_dataset.input_shape, mini_dataset.num_classes),
                 mini_dataset.input_shape)
    if kind == "export":  # the same counter (ptflops) on the same graph
        assert (teacher.cost.macs, teacher.cost.params) == (cost.macs, cost.params)
    else:  # onnx-tool on the ONNX graph: BatchNorm folded into the convolutions, element-wise operations counted
        assert abs(teacher.cost.macs / cost.macs - 1) < 0.02
        stored = sum(int(torch.tensor(i.dims).prod()) for i in onnx.load(str(files[kind])).graph.initializer)
        assert teacher.cost.params == stored
    # as an ensemble member, its cached soft targets are the zoo teacher's
    batches = BatchIterator(mini_dataset.train, mini_dataset, 64, 0, views=1, augment=False)
    as_zoo = Ensemble([Teacher("wrn16_2", wrn, cost, 0.5, "zoo")])
    ours, theirs = CachedTargets(Ensemble([teacher]), batches, None, progress=False), CachedTargets(
        as_zoo, batches, None, progress=False)
    for t in (4.0, 1.0):
        assert torch.allclose(soft_targets(ours.logits[0], t), soft_targets(theirs.logits[0], t), atol=1e-4)


def test_an_ensemble_of_a_zoo_teacher_and_an_onnx_teacher_runs_end_to_end(files: dict[str, Path], tmp_path: Path,
                                                                          mini_fashion_dir: Path) -> None:
    result = run_cli("nas_kd.search", *TINY_DATA_FLAGS, "--flops-budget", "12M", "--teachers", "resnet8",
                     "--teacher-epochs", "1", "--teacher", str(files["onnx"]), "--trials", "1", "--trial-epochs", "1",
                     "--subset", "200", "--final-epochs", "1", "--no-onnx", "--quiet", "--data-dir",
                     str(mini_fashion_dir), "--study-name", "f", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher wrn16_2.onnx: " in result.stderr and "(ONNX model file: " in result.stderr
    assert "ensemble of 2: val acc" in result.stderr
    assert "no teacher exposes feature maps" not in result.stderr  # resnet8 serves the hint loss
    # the retrain command reloads the teacher from where it is now
    moved = tmp_path / "elsewhere.onnx"
    moved.write_bytes(files["onnx"].read_bytes())
    args = ("--study-name", "f", "--final-epochs", "1", "--no-onnx", "--quiet")
    result = run_cli("nas_kd.retrain", *args, "--teacher", str(moved), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"(ONNX model file: {moved}; logits only)" in result.stderr
    refused = run_cli("nas_kd.retrain", *args, "--teacher", str(moved), "--teacher", str(moved), cwd=tmp_path)
    assert refused.returncode == 2 and "distilled from 1 teacher file(s)" in refused.stderr.strip().splitlines()[-1]


def test_only_file_teachers_leave_the_feature_losses_out_in_one_line(files: dict[str, Path], tmp_path: Path,
                                                                      mini_fashion_dir: Path) -> None:
    argv = [*TINY_DATA_FLAGS, "--flops-budget", "12M", "--teachers", "none", "--teacher", str(files["export"]),
            "--trials", "1", "--trial-epochs", "1", "--subset", "200", "--final-epochs", "0", "--no-onnx", "--quiet",
            "--data-dir", str(mini_fashion_dir), "--out-dir", str(tmp_path), "--study-name", "g"]
    result = run_cli("nas_kd.search", *argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "no teacher exposes feature maps" in line]
    assert len(lines) == 1 and "feature loss hint left out; distilling with ce=1,kl=1" in lines[0]


class Seven(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :7]


class NotFinite(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10] * float("nan")


class Conv32(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


BAD = {
    "not a model": (lambda p: p.write_bytes(b"these bytes are no model at all" * 10), "is not an ONNX model"),
    "a pickle": (lambda p: torch.save({"w": torch.zeros(2)}, p), "is a torch.save archive (a pickle), which is never "
                                                                "loaded"),
    "a raw pickle": (lambda p: p.write_bytes(b"\x80\x04\x95" + b"\x00" * 20), "is a pickle"),
    "output width": (lambda p: to_onnx(Seven(), p), "one logit per class of the data"),
    "input shape": (lambda p: to_onnx(Conv32(), p, (3, 32, 32)), "the data cannot fill it"),
    "NaN": (lambda p: to_onnx(NotFinite(), p), "outputs values that are not finite"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_teacher_file_is_one_line_and_exit_2_before_anything_is_written(
        case: str, tmp_path: Path, mini_fashion_dir: Path, capsys: pytest.CaptureFixture) -> None:
    make, message = BAD[case]
    path = tmp_path / "teacher.bin"
    make(path)
    argv = [*TINY_DATA_FLAGS, "--flops-budget", "12M", "--teachers", "resnet8", "--teacher", str(path), "--trials",
            "1", "--data-dir", str(mini_fashion_dir), "--out-dir", str(tmp_path / "studies"), "--study-name", "b",
            "--no-onnx", "--quiet"]
    assert search_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: teacher ") and message in err[-1], err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "studies").exists()  # no study, no storage
