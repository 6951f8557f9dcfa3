"""Two-stage training: stage one trains on the feature losses only, stage two on the logit losses."""

from __future__ import annotations

import copy

import pytest
import torch

from nas_kd.core.config import DistillConfig, TrainConfig, parse_distill
from nas_kd.core.errors import InputError
from nas_kd.data.batches import BatchIterator
from nas_kd.distill.student import check_two_stage, criterion_for, distill, stage_epochs, step_seconds
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.zoo import teacher_spec
from nas_kd.teaching.cache import Teacher
from nas_kd.teaching.ensemble import CachedTargets, Ensemble

STUDENT = Spec.parse("c8|basic_d1_w8_s1_k3_e1|basic_d1_w16_s2_k3_e1")
STEM = "stem.0.0.weight"  # the student's first convolution


@pytest.mark.parametrize(("epochs", "fraction", "expected"), [
    (4, 0.0, (0, 4)), (4, 0.5, (2, 2)), (4, 0.1, (1, 3)), (4, 0.9, (3, 1)), (1, 0.5, (0, 1)), (2, 0.5, (1, 1)),
    (10, 0.3, (3, 7)),
])
def test_stage_epochs(epochs: int, fraction: float, expected: tuple[int, int]) -> None:
    assert stage_epochs(epochs, fraction) == expected


@pytest.mark.parametrize(("recipe", "fraction", "message"), [
    ("ce,kl", 0.5, "needs a feature loss"), ("crosslayer,at", 0.5, "a logit loss (ce, kl) for stage two"),
    ("ce,kl,at", 1.0, "in [0, 1)"), ("ce,kl,at", -0.1, "in [0, 1)"),
])
def test_bad_two_stage_recipes(recipe: str, fraction: float, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        check_two_stage(DistillConfig(losses=parse_distill(recipe), two_stage=fraction))
    check_two_stage(DistillConfig(losses=parse_distill("ce,kl,crosslayer"), two_stage=0.5))


def test_stage_one_aligns_features_and_leaves_the_head_alone(mini_dataset) -> None:
    """Over 2 epochs at two_stage 0.5: after epoch 1 only the feature losses have trained (the
    classifier is untouched, the adapters moved); after epoch 2 the classifier has trained."""
    torch.manual_seed(0)
    teacher = Teacher("resnet8", build(teacher_spec("resnet8"), mini_dataset.input_shape, 10), None, 0.5, "test")  # type: ignore[arg-type]
    ensemble = Ensemble([teacher])
    student = build(STUDENT, mini_dataset.input_shape, 10)
    recipe = DistillConfig(losses=parse_distill("ce,kl,crosslayer"), two_stage=0.5)
    criterion = criterion_for(student, recipe, ensemble.feature_channels)
    batches = BatchIterator(mini_dataset.train, mini_dataset, 64, seed=0, views=1, augment=False,
                            indices=torch.arange(128))
    targets = CachedTargets(ensemble, batches, criterion.features, progress=False)
    head0 = student.classifier.weight.detach().clone()
    adapter0 = next(criterion.parameters()).detach().clone()
    snapshots = []

    def on_epoch(epoch: int) -> None:
        snapshots.append((epoch, student.classifier.weight.detach().clone(), next(criterion.parameters()).detach().clone()))

    distill(student, batches, targets, criterion, TrainConfig(), 2, on_epoch, progress=False, two_stage=0.5)
    assert [e for e, _, _ in snapshots] == [0, 1]
    assert torch.equal(snapshots[0][1], head0)  # stage one: no logit loss, no gradient to the head
    assert not torch.equal(snapshots[0][2], adapter0)  # the adapters were trained
    assert not torch.equal(snapshots[1][1], head0)  # stage two trains the head
    assert torch.equal(snapshots[1][2], snapshots[0][2])  # and no longer the adapters


def test_one_stage_trains_everything_at_once(mini_dataset) -> None:
    """Without `two_stage`, every loss trains from the first step to the last. Over the two epochs
    of the two-stage test above, the head, the stem and every cross-layer adapter move in each
    epoch (two-stage training leaves the head still in epoch 1 and the adapters in epoch 2), and
    the feature loss reaches the student's first layer: the same start trained on ce,kl alone
    ends with another stem."""
    torch.manual_seed(0)
    teacher = Teacher("resnet8", build(teacher_spec("resnet8"), mini_dataset.input_shape, 10), None, 0.5, "test")  # type: ignore[arg-type]
    ensemble = Ensemble([teacher])
    student = build(STUDENT, mini_dataset.input_shape, 10)
    plain = copy.deepcopy(student)  # the same initial weights, for the run without the feature loss
    criterion = criterion_for(student, DistillConfig(losses=parse_distill("ce,kl,crosslayer")), ensemble.feature_channels)
    batches = BatchIterator(mini_dataset.train, mini_dataset, 64, seed=0, views=1, augment=False, indices=torch.arange(128))
    targets = CachedTargets(ensemble, batches, criterion.features, progress=False)

    def watched() -> dict[str, torch.Tensor]:
        adapters = {f"adapter {n}": p for n, p in criterion.named_parameters() if p.ndim == 4}  # the 1x1 convs
        assert len(adapters) == 3  # one per stage of resnet8
        return {n: p.detach().clone() for n, p in {"head": student.classifier.weight,
                                                    "stem": student.get_parameter(STEM), **adapters}.items()}

    snapshots = [watched()]
    seen = []

    def on_epoch(epoch: int) -> None:
        seen.append(epoch)
        snapshots.append(watched())

    distill(student, batches, targets, criterion, TrainConfig(), 2, on_epoch, progress=False)
    assert seen == [0, 1]
    for epoch in (1, 2):
        for name, before in snapshots[epoch - 1].items():
            assert not torch.equal(snapshots[epoch][name], before), f"{name} did not move in epoch {epoch}"
    distill(plain, batches, targets, criterion_for(plain, DistillConfig(losses=parse_distill("ce,kl")), []),
            TrainConfig(), 2, progress=False)
    difference = (plain.get_parameter(STEM) - student.get_parameter(STEM)).abs().max().item()
    assert difference > 1e-3, "the feature loss does not reach the student's first layer"


def test_step_seconds_times_real_steps_and_leaves_the_student_alone(mini_dataset) -> None:
    """`step_seconds` runs the training loop for warmup + steps optimizer steps (across epochs when
    one is shorter) on a copy: the student's weights and the criterion's adapters do not move."""
    torch.manual_seed(0)
    teacher = Teacher("resnet8", build(teacher_spec("resnet8"), mini_dataset.input_shape, 10), None, 0.5, "test")  # type: ignore[arg-type]
    ensemble = Ensemble([teacher])
    student = build(STUDENT, mini_dataset.input_shape, 10)
    criterion = criterion_for(student, DistillConfig(losses=parse_distill("ce,kl,crosslayer")), ensemble.feature_channels)
    batches = BatchIterator(mini_dataset.train, mini_dataset, 64, seed=0, views=1, augment=False, indices=torch.arange(128))
    targets = CachedTargets(ensemble, batches, criterion.features, progress=False)
    before = copy.deepcopy(student.state_dict()), copy.deepcopy(criterion.state_dict())
    seconds = step_seconds(student, batches, targets, criterion, TrainConfig(), steps=3, warmup=2)  # 5 steps, 3 epochs
    assert 0 < seconds < 10
    assert all(torch.equal(v, before[0][k]) for k, v in student.state_dict().items())
    assert all(torch.equal(v, before[1][k]) for k, v in criterion.state_dict().items())
