"""Distil a student from the ensemble's targets (cached or live) with a weighted sum of losses."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from nas_kd.arch import Network
from nas_kd.config import DistillConfig, TrainConfig
from nas_kd.data import Batch, BatchIterator
from nas_kd.losses import Criterion, StudentOutput
from nas_kd.teachers import TargetSource
from nas_kd.train import fit


def criterion_for(student: Network, recipe: DistillConfig, teacher_channels: list[int]) -> Criterion:
    device = next(student.parameters()).device
    criterion = Criterion(recipe.weights(), student.stage_channels, teacher_channels, recipe.temperature)
    return criterion.to(device).to(memory_format=torch.channels_last)


def distill(student: Network, batches: BatchIterator, targets: TargetSource | None, criterion: Criterion,
            cfg: TrainConfig, epochs: int, on_epoch: Callable[[int], None] | None = None,
            desc: str = "distill", progress: bool = True) -> float:
    """Train `student` (and the criterion's adapters) for `epochs`; returns training seconds.

    `targets` may be None only when no loss of the criterion uses the teachers.
    """
    if criterion.uses_teachers and targets is None:
        raise ValueError("this recipe needs teacher targets")

    def step(batch: Batch) -> torch.Tensor:
        features = student.forward_features(batch.x)
        out = StudentOutput(student.forward_head(features[-1]), features)
        return criterion(out, targets(batch) if criterion.uses_teachers else None, batch.y)

    modules = nn.ModuleDict({"student": student, "criterion": criterion})
    return fit(modules, batches, step, cfg, epochs, on_epoch, desc, progress)
