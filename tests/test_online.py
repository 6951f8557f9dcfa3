"""nas_kd.retraining.online: the online-ensemble loss against its formula, which students a study yields
(exact trial numbers on a hand-built study), training with and without the offline teachers, and
`python -m nas_kd.retrain --online-ensemble K` end to end on a copy of the e2e study."""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pytest
import torch
import torch.nn.functional as F
from conftest import E2E_STUDY, load_json, run_cli

from nas_kd import retrain as retrain_cli
from nas_kd.core.config import DistillConfig, SearchConfig, TrainConfig
from nas_kd.core.errors import InputError
from nas_kd.data.datasets import load_dataset
from nas_kd.device.export import load_student
from nas_kd.distill.losses import Criterion, StudentOutput
from nas_kd.distill.student import RetrainRecipe
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.cost import count
from nas_kd.retraining.online import (
    ONLINE_ATTR,
    OnlineEnsembleLoss,
    retrain_online,
    teacher_recipe,
    top_students,
    train_online,
)
from nas_kd.teaching.cache import Teacher
from nas_kd.teaching.ensemble import Ensemble, Targets
from nas_kd.training.train import predict, resolve_device

B, C, T = 6, 10, 4.0

# ---------------------------------------------------------------- the loss


def outputs(logits: list[torch.Tensor]) -> list[StudentOutput]:
    return [StudentOutput(x, []) for x in logits]


def random_logits(k: int) -> list[torch.Tensor]:
    return [torch.randn(B, C, requires_grad=True) for _ in range(k)]


def test_equal_students_have_no_kl_and_are_their_own_ensemble() -> None:
    one = torch.randn(B, C)
    labels = torch.randint(0, C, (B,))
    terms = OnlineEnsembleLoss(3, T).terms(outputs([one.clone() for _ in range(3)]), None, labels)
    torch.testing.assert_close(terms.kl, torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(terms.ensemble, one)
    torch.testing.assert_close(terms.ce, F.cross_entropy(one, labels).repeat(3))


def test_ensemble_is_the_mean_and_each_term_matches_its_formula() -> None:
    logits = random_logits(3)
    labels = torch.randint(0, C, (B,))
    terms = OnlineEnsembleLoss(3, T).terms(outputs(logits), None, labels)
    mean = torch.stack(logits).mean(0)
    torch.testing.assert_close(terms.ensemble, mean)
    torch.testing.assert_close(terms.ensemble_ce, F.cross_entropy(mean, labels))
    soft = F.softmax(mean / T, dim=-1)
    for k, s in enumerate(logits):
        torch.testing.assert_close(terms.kl[k], F.kl_div(F.log_softmax(s / T, -1), soft, reduction="batchmean") * T * T)
        torch.testing.assert_close(terms.ce[k], F.cross_entropy(s, labels))
    assert terms.teachers is None
    torch.testing.assert_close(terms.total(), terms.ce.sum() + terms.kl.sum() + terms.ensemble_ce)


def test_gradients_reach_every_student_and_the_kl_target_is_detached() -> None:
    logits = random_logits(3)
    terms = OnlineEnsembleLoss(3, T).terms(outputs(logits), None, torch.randint(0, C, (B,)))
    # student 0's KL moves student 0 only: the ensemble's side is a fixed target
    grads = torch.autograd.grad(terms.kl[0], logits, retain_graph=True, allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert all(g is None or not g.any() for g in grads[1:])
    terms.total().backward()
    for s in logits:
        assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_teacher_losses_are_per_student_with_their_own_adapters() -> None:
    teacher_channels = [[16, 32]]
    widths = [[8, 12], [4, 20]]  # two students of different widths
    criteria = [Criterion({"kl": 1.0, "hint": 1.0}, w, teacher_channels, T) for w in widths]
    loss = OnlineEnsembleLoss(2, T, criteria)
    students = [StudentOutput(torch.randn(B, C, requires_grad=True),
                              [torch.randn(B, c, 8 // (i + 1), 8 // (i + 1), requires_grad=True) for i, c in enumerate(w)])
                for w in widths]
    targets = Targets(torch.randn(1, B, C), [[torch.randn(B, 32, 4, 4)]])
    labels = torch.randint(0, C, (B,))
    terms = loss.terms(students, targets, labels)
    assert terms.teachers is not None and terms.teachers.shape == (2,)
    for k, s in enumerate(students):
        torch.testing.assert_close(terms.teachers[k], criteria[k](s, targets, labels))
    terms.total().backward()
    for s in students:
        assert s.logits.grad.abs().sum() > 0 and s.features[-1].grad.abs().sum() > 0
    for c in criteria:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in c.parameters())


def test_teacher_recipe_keeps_only_the_losses_that_read_the_teachers() -> None:
    recipe = DistillConfig(losses=(("ce", 1.0), ("kl", 0.5), ("hint", 0.0), ("at", 2.0)), temperature=3.0)
    assert teacher_recipe(recipe) == DistillConfig(losses=(("kl", 0.5), ("at", 2.0)), temperature=3.0)
    with pytest.raises(InputError, match="has no loss that uses the teachers"):
        teacher_recipe(DistillConfig(losses=(("ce", 1.0),)))


# ---------------------------------------------------------------- which students


def add(study: optuna.Study, macs: int, acc: float | None, over: float = -0.5,
        state: optuna.trial.TrialState = optuna.trial.TrialState.COMPLETE) -> None:
    """A trial with the attributes objective.record_cost / run_trial write; acc None: never trained."""
    attrs = {"spec": "c8|basic_d1_w8_s1_k3_e1", "macs": macs, "params": macs // 100}
    if acc is not None:
        attrs["val_acc_per_epoch"] = [acc]
    value = acc if state == optuna.trial.TrialState.COMPLETE else None
    study.add_trial(optuna.trial.create_trial(state=state, value=value, user_attrs=attrs,
                                              constraints={"macs": over}))


@pytest.fixture
def study() -> optuna.Study:
    s = optuna.create_study(study_name="hand", direction="maximize")
    pruned = optuna.trial.TrialState.PRUNED
    add(s, 4_000_000, 0.80)  # 0: front
    add(s, 2_000_000, 0.70)  # 1: front
    add(s, 6_000_000, 0.75)  # 2: beaten by 0
    add(s, 3_000_000, 0.65)  # 3: beaten by 1
    add(s, 9_000_000, 0.95, over=0.2)  # 4: over budget: never a student
    add(s, 20_000_000, None, over=1.0, state=pruned)  # 5: rejected before training
    add(s, 1_000_000, 0.60)  # 6: front (cheapest)
    add(s, 500_000, 0.90, state=pruned)  # 7: stopped by the pruner: not complete
    return s


@pytest.mark.parametrize(("k", "numbers"), [
    pytest.param(2, [0, 1], id="the front's most accurate"),
    pytest.param(3, [0, 1, 6], id="the whole front"),
    pytest.param(4, [0, 1, 6, 2], id="filled by accuracy off the front"),
    pytest.param(5, [0, 1, 6, 2, 3], id="every feasible trained trial"),
])
def test_top_students(study: optuna.Study, k: int, numbers: list[int]) -> None:
    assert [t.number for t in top_students(study, k)] == numbers


def test_top_students_refuses_too_few(study: optuna.Study) -> None:
    with pytest.raises(InputError, match="study 'hand' has only 5 feasible trained trials"):
        top_students(study, 6)
    with pytest.raises(InputError, match="at least 2 students, got 1"):
        top_students(study, 1)


# ---------------------------------------------------------------- training

SPECS = [Spec.parse("c8|basic_d1_w8_s2_k3_e1"), Spec.parse("c8|basic_d1_w12_s2_k3_e1")]


@pytest.fixture(scope="module")
def tiny_ensemble(mini_dataset) -> Ensemble:
    """One untrained small teacher: the loss needs its outputs, not its accuracy."""
    torch.manual_seed(0)
    model = build(Spec.parse("c8|basic_d1_w16_s2_k3_e1"), mini_dataset.input_shape, mini_dataset.num_classes)
    return Ensemble([Teacher("tiny", model, count(model, mini_dataset.input_shape), 0.5, "test")])


def test_train_online_with_and_without_teachers(mini_dataset, tiny_ensemble: Ensemble) -> None:
    cfg = SearchConfig(train=TrainConfig(batch_size=128), distill=DistillConfig(), seed=5)
    alone, _ = train_online(SPECS, mini_dataset, tiny_ensemble, RetrainRecipe.of(cfg), 1, with_teachers=False, progress=False)
    taught, seconds = train_online(SPECS, mini_dataset, tiny_ensemble, RetrainRecipe.of(cfg), 1, with_teachers=True, progress=False)
    assert seconds > 0 and [s.spec for s in taught] == SPECS and not any(s.training for s in taught)
    for k, (a, b) in enumerate(zip(alone, taught)):
        torch.manual_seed(cfg.seed + k)
        fresh = build(SPECS[k], mini_dataset.input_shape, mini_dataset.num_classes)
        first = "stem.0.0.weight"
        assert not torch.equal(fresh.state_dict()[first], a.state_dict()[first])  # trained
        # same seeds and batches: only the teachers' losses can make the two runs differ
        assert not torch.equal(a.state_dict()[first], b.state_dict()[first])


def test_retrain_online_with_teachers(mini_dataset, tiny_ensemble: Ensemble, tmp_path: Path) -> None:
    study = optuna.create_study(study_name="tiny", direction="maximize")
    for spec, acc in zip(SPECS, (0.5, 0.6)):
        macs = count(build(spec, mini_dataset.input_shape, mini_dataset.num_classes), mini_dataset.input_shape).macs
        study.add_trial(optuna.trial.create_trial(value=acc, constraints={"macs": -0.1}, user_attrs={
            "spec": str(spec), "macs": macs, "params": 1, "val_acc_per_epoch": [acc]}))
    cfg = SearchConfig(final_epochs=1, distill=DistillConfig(losses=(("ce", 1.0), ("kl", 1.0))), seed=1)
    summary = retrain_online(study, mini_dataset, tiny_ensemble, cfg, 2, True, tmp_path, progress=False,
                             log=lambda _: None)
    assert summary["trials"] == [1, 0] and summary["with_teachers"] is True
    assert summary["recipe"] == "online ensemble of 2 (T=4) + offline teachers kl=1 (T=4)"
    assert load_json(tmp_path / "online.json") == summary == study.user_attrs[ONLINE_ATTR]
    for i, (student, number) in enumerate(zip(summary["students"], (1, 0))):
        assert student["trial"] == number and student["spec"] == str(SPECS[number])
        model, meta = load_student(tmp_path / f"student{i}-trial{number}" / "model.safetensors")
        assert model.spec == SPECS[number] and meta["metrics"]["with_teachers"] is True


# ---------------------------------------------------------------- the command


def right(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of (N, C) logits whose largest entry is the label."""
    return (logits.argmax(1) == labels).float().mean().item()


def test_online_ensemble_command(e2e_run: dict, tmp_path: Path) -> None:
    db = tmp_path / "copy.db"
    shutil.copy(e2e_run["db"], db)  # the session's study stays as other tests read it
    url, out = f"sqlite:///{db}", tmp_path / "out"
    expected = [t.number for t in top_students(optuna.load_study(study_name=E2E_STUDY, storage=url), 2)]
    result = run_cli("nas_kd.retrain", "--study-name", E2E_STUDY, "--storage", url, "--out-dir", str(out),
                     "--online-ensemble", "2", "--final-epochs", "1", "--quiet", cwd=e2e_run["work"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(cache: " in result.stderr  # the search's teacher, not a new one
    assert not (out / "cache").exists()
    online = out / E2E_STUDY / "online"
    summary = load_json(online / "online.json")
    assert summary["trials"] == expected and summary["k"] == 2 and summary["with_teachers"] is False
    stored = optuna.load_study(study_name=E2E_STUDY, storage=url).user_attrs[ONLINE_ATTR]
    assert stored["trials"] == expected and stored["online_ensemble_test_acc"] == summary["online_ensemble_test_acc"]
    assert "Online ensemble of students" in (out / E2E_STUDY / "report.html").read_text()
    device = resolve_device("auto")  # where the command ran, so near-ties fall the same way
    dataset = load_dataset("fashion-mnist", e2e_run["data_dir"]).to(device)
    students, test_logits = [], []
    for i, number in enumerate(expected):
        folder = online / f"student{i}-trial{number}"
        model, meta = load_student(folder / "model.safetensors")
        students.append(model.to(device))
        test_logits.append(predict(model, dataset.test, dataset))  # (N, C)
        metrics = load_json(folder / "metrics.json")
        assert str(model.spec) == metrics["spec"] == meta["metrics"]["spec"]
        assert metrics["trial"] == number and metrics["final_epochs"] == 1
        assert metrics["recipe"].startswith("online ensemble of 2")
        assert metrics["test_acc"] == right(test_logits[-1], dataset.test.y)  # the exported weights were tested
        # each online student ships as ONNX and int8 ONNX, run by ONNX Runtime on the test images
        assert (folder / "model.onnx").is_file() and (folder / "model.int8.onnx").is_file()
        assert metrics["onnx_matches_torch"] is True
        assert metrics["onnx_test_acc"] == pytest.approx(metrics["test_acc"], abs=0.01)
    # the online ensemble is the students' mean logits: its accuracies, recomputed from the exported
    # students, are those recorded (with the e2e run's students, student 0 alone scores otherwise
    # on the validation split and student 1 alone on both)
    val_logits = [predict(model, dataset.val, dataset) for model in students]
    test_acc = right(torch.stack(test_logits).mean(0), dataset.test.y)
    val_acc = right(torch.stack(val_logits).mean(0), dataset.val.y)
    assert (summary["online_ensemble_test_acc"], summary["online_ensemble_val_acc"]) == (test_acc, val_acc)


@pytest.mark.parametrize(("args", "message"), [
    (["--online-ensemble", "1"], "--online-ensemble needs at least 2 students, got 1"),
    (["--with-teachers"], "--with-teachers applies to an online ensemble only"),
    (["--online-ensemble", "2", "--trial", "0"], "--trial picks one student"),
])
def test_online_ensemble_command_bad_input(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    # checked before the study is opened: no storage needed, and in-process to spare a start-up
    assert retrain_cli.main(["--study-name", E2E_STUDY, *args, "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}")


def test_online_ensemble_command_too_few_students(e2e_run: dict, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "copy.db"
    shutil.copy(e2e_run["db"], db)
    argv = ["--study-name", E2E_STUDY, "--storage", f"sqlite:///{db}", "--out-dir", str(tmp_path),
            "--online-ensemble", "3", "--quiet"]
    assert retrain_cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: --online-ensemble 3: study {E2E_STUDY!r} has only 2 feasible trained trials; "
                     "run more trials (--trials) or ask for fewer"]
    assert not (tmp_path / "cache").exists()  # refused before any teacher was loaded or trained
