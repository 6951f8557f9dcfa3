"""Registry of distillation losses.

Each loss is a small module with the paper named in its docstring and one call shape,
`loss(student, targets, labels) -> scalar`, where `student` holds the student's logits and
per-stage features and `targets` the teachers' (see `teachers.Targets`). Losses with trainable
parts (adapters) are built per student, from its stage widths and the teachers' widths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nas_kd.errors import InputError
from nas_kd.teachers import Targets, soft_targets


@dataclass(frozen=True)
class StudentOutput:
    logits: torch.Tensor  # (B, K)
    features: list[torch.Tensor]  # per stage, shallow to deep: (B, C_i, H_i, W_i)


class Loss(nn.Module):
    uses_teachers = True  # False: needs only the labels
    uses_features = False  # True: needs the teachers' feature maps

    def __init__(self, student_channels: list[int], teacher_channels: list[int], temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, student: StudentOutput, targets: Targets | None, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


LOSSES: dict[str, type[Loss]] = {}


def register_loss(name: str) -> Callable[[type[Loss]], type[Loss]]:
    def wrap(cls: type[Loss]) -> type[Loss]:
        LOSSES[name] = cls
        return cls

    return wrap


def loss_class(name: str) -> type[Loss]:
    if name not in LOSSES:
        raise InputError(f"unknown distillation loss {name!r}; known: {', '.join(LOSSES)}")
    return LOSSES[name]


@register_loss("ce")
class CrossEntropy(Loss):
    """Cross-entropy with the hard labels."""

    uses_teachers = False

    def forward(self, student: StudentOutput, targets: Targets | None, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student.logits, labels)


@register_loss("kl")
class SoftTargetKL(Loss):
    """KL(ensemble || student) on temperature-softened outputs, scaled by T^2 so its gradients keep
    their size as T changes (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
    Network", 2015). The ensemble's distribution is the mean of its members' softened ones."""

    def forward(self, student: StudentOutput, targets: Targets | None, labels: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        p_teacher = soft_targets(targets.logits, t)  # (B, K)
        log_p_student = F.log_softmax(student.logits / t, dim=-1)
        return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * t * t


def align(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two (B, C, H, W) maps to the other's spatial size."""
    hs, ht = student.shape[-2:], teacher.shape[-2:]
    if hs[0] * hs[1] > ht[0] * ht[1]:
        student = F.adaptive_avg_pool2d(student, ht)
    elif ht[0] * ht[1] > hs[0] * hs[1]:
        teacher = F.adaptive_avg_pool2d(teacher, hs)
    return student, teacher


@register_loss("hint")
class Hint(Loss):
    """FitNets hint (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015): the student's
    deepest stage, mapped by a 1x1-conv adapter per teacher to that teacher's width, regresses
    the teacher's deepest stage (MSE), spatial sizes aligned by average pooling; averaged over
    the ensemble's members."""

    uses_features = True

    def __init__(self, student_channels: list[int], teacher_channels: list[int], temperature: float):
        super().__init__(student_channels, teacher_channels, temperature)
        self.adapters = nn.ModuleList(
            nn.Sequential(nn.Conv2d(student_channels[-1], c, 1, bias=False), nn.BatchNorm2d(c))
            for c in teacher_channels)

    def forward(self, student: StudentOutput, targets: Targets | None, labels: torch.Tensor) -> torch.Tensor:
        losses = []
        for adapter, feature in zip(self.adapters, targets.features):
            s, t = align(adapter(student.features[-1]), feature)
            losses.append(F.mse_loss(s, t))
        return torch.stack(losses).mean()


class Criterion(nn.Module):
    """The weighted sum of the recipe's losses; losses of weight 0 are not built."""

    def __init__(self, weights: dict[str, float], student_channels: list[int], teacher_channels: list[int],
                 temperature: float):
        super().__init__()
        if temperature <= 0:
            raise InputError(f"--temperature must be > 0, got {temperature}")
        active = {name: w for name, w in weights.items() if w > 0}
        if not active:
            raise InputError(f"every loss of the recipe has weight 0: {weights}")
        self.weights = active
        self.losses = nn.ModuleDict({name: loss_class(name)(student_channels, teacher_channels, temperature)
                                     for name in active})

    @property
    def uses_teachers(self) -> bool:
        return any(loss.uses_teachers for loss in self.losses.values())

    @property
    def uses_features(self) -> bool:
        return any(loss.uses_features for loss in self.losses.values())

    def forward(self, student: StudentOutput, targets: Targets | None, labels: torch.Tensor) -> torch.Tensor:
        return sum(w * self.losses[name](student, targets, labels) for name, w in self.weights.items())
