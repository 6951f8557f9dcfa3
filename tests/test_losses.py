"""Every registered distillation loss: minimum where it holds, T^2 scaling, gradients, shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nas_kd.errors import InputError
from nas_kd.losses import LOSSES, Criterion, StudentOutput, align, loss_class
from nas_kd.teachers import Targets

B, K = 4, 10


def student_output(channels: list[int], sizes: list[int], requires_grad: bool = True) -> StudentOutput:
    feats = [torch.randn(B, c, s, s, requires_grad=requires_grad) for c, s in zip(channels, sizes)]
    return StudentOutput(torch.randn(B, K, requires_grad=requires_grad), feats)


def teacher_targets(channels: list[int], sizes: list[int]) -> Targets:
    return Targets(torch.randn(len(channels), B, K), [torch.randn(B, c, s, s) for c, s in zip(channels, sizes)])


# several teachers of different widths and resolutions, against a student of other widths
TEACHER_CHANNELS, TEACHER_SIZES = [64, 320, 128], [7, 4, 14]
STUDENT_CHANNELS, STUDENT_SIZES = [16, 32, 48], [28, 14, 7]


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradients_reach_the_student_and_the_adapters(name: str) -> None:
    loss = loss_class(name)(STUDENT_CHANNELS, TEACHER_CHANNELS, 4.0)
    student = student_output(STUDENT_CHANNELS, STUDENT_SIZES)
    value = loss(student, teacher_targets(TEACHER_CHANNELS, TEACHER_SIZES), torch.randint(0, K, (B,)))
    assert value.shape == () and torch.isfinite(value)
    value.backward()
    touched = [student.logits.grad is not None] + [f.grad is not None for f in student.features]
    assert any(touched), f"{name}: no gradient reaches the student"
    for n, p in loss.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: no gradient for adapter {n}"


def test_kl_is_zero_when_the_student_matches_the_ensemble() -> None:
    kl = loss_class("kl")([8], [8], 4.0)
    logits = torch.randn(B, K)
    # one member: the student equal to it gives 0; two equal members are the same distribution
    targets = Targets(torch.stack([logits, logits]), None)
    assert kl(StudentOutput(logits, []), targets, torch.zeros(B, dtype=torch.long)).item() == pytest.approx(0, abs=1e-6)


def test_kl_is_scaled_by_t_squared() -> None:
    logits_s, logits_t = torch.randn(B, K), torch.randn(1, B, K)
    for t in (1.0, 2.0, 8.0):
        value = loss_class("kl")([8], [8], t)(StudentOutput(logits_s, []), Targets(logits_t, None), None)
        raw = F.kl_div(F.log_softmax(logits_s / t, -1), F.softmax(logits_t[0] / t, -1), reduction="batchmean")
        assert value.item() == pytest.approx(raw.item() * t * t, rel=1e-5)


def test_ce_is_cross_entropy_with_labels() -> None:
    logits, labels = torch.randn(B, K), torch.randint(0, K, (B,))
    value = loss_class("ce")([8], [8], 4.0)(StudentOutput(logits, []), None, labels)
    assert value.item() == pytest.approx(F.cross_entropy(logits, labels).item())


def test_hint_is_zero_when_the_adapted_student_equals_the_teacher() -> None:
    hint = loss_class("hint")([16], [16], 4.0)
    adapter = hint.adapters[0]
    with torch.no_grad():
        adapter[0].weight.copy_(torch.eye(16).view(16, 16, 1, 1))
    adapter.eval()  # BN with running stats (0, 1) and weight 1, bias 0: the identity (up to eps)
    feature = torch.randn(B, 16, 7, 7)
    value = hint(StudentOutput(torch.randn(B, K), [feature]), Targets(torch.randn(1, B, K), [feature.clone()]), None)
    assert value.item() == pytest.approx(0, abs=1e-4)


@pytest.mark.parametrize(("student", "teacher", "expected"), [
    ((8, 8), (4, 4), (4, 4)), ((4, 4), (8, 8), (4, 4)), ((7, 7), (7, 7), (7, 7)), ((14, 14), (7, 7), (7, 7)),
])
def test_align_pools_the_larger_map(student, teacher, expected) -> None:
    s, t = align(torch.randn(2, 3, *student), torch.randn(2, 5, *teacher))
    assert s.shape[-2:] == t.shape[-2:] == expected


def test_criterion_weights_and_skips_zero_weights() -> None:
    criterion = Criterion({"ce": 0.5, "kl": 2.0, "hint": 0.0}, STUDENT_CHANNELS, TEACHER_CHANNELS, 3.0)
    assert set(criterion.losses) == {"ce", "kl"}
    assert criterion.uses_teachers and not criterion.uses_features
    student = student_output(STUDENT_CHANNELS, STUDENT_SIZES, requires_grad=False)
    targets, labels = teacher_targets(TEACHER_CHANNELS, TEACHER_SIZES), torch.randint(0, K, (B,))
    expected = 0.5 * criterion.losses["ce"](student, targets, labels) + 2.0 * criterion.losses["kl"](student, targets, labels)
    assert criterion(student, targets, labels).item() == pytest.approx(expected.item())
    assert not Criterion({"ce": 1.0}, [8], [8], 1.0).uses_teachers


@pytest.mark.parametrize(("weights", "temperature", "message"), [
    ({"ce": 0.0}, 4.0, "weight 0"), ({"ce": 1.0}, 0.0, "temperature"), ({"nope": 1.0}, 4.0, "unknown distillation loss 'nope'; known: ce, kl"),
])
def test_bad_recipes(weights, temperature, message) -> None:
    with pytest.raises(InputError, match=message):
        Criterion(weights, [8], [8], temperature)
