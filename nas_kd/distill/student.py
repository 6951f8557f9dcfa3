"""Distil a student from the ensemble's targets (cached or live) with a weighted sum of losses,
in one stage or two (feature alignment first, then KL + CE)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from nas_kd.core.config import DistillConfig, SearchConfig, TrainConfig
from nas_kd.core.errors import InputError
from nas_kd.data.batches import Batch, BatchIterator
from nas_kd.data.datasets import Dataset
from nas_kd.distill.losses import Criterion, StudentOutput, loss_class
from nas_kd.nets.arch import Network
from nas_kd.teaching.ensemble import CachedTargets, Ensemble, LiveTargets, TargetSource
from nas_kd.training.train import Checkpoint, fit


def criterion_for(student: Network, recipe: DistillConfig, teacher_channels: list[list[int]]) -> Criterion:
    device = next(student.parameters()).device
    criterion = Criterion(recipe.weights(), student.stage_channels, teacher_channels, recipe.temperature)
    return criterion.to(device).to(memory_format=torch.channels_last)


def check_two_stage(recipe: DistillConfig) -> None:
    """Two-stage training needs a feature loss for stage one and a logit loss for stage two."""
    if not 0 <= recipe.two_stage < 1:
        raise InputError(f"--two-stage must be a fraction of the epochs in [0, 1), got {recipe.two_stage:g}")
    if recipe.two_stage:
        kinds = {loss_class(name).kind for name, w in recipe.losses if w > 0}
        if kinds != {"logits", "features"}:
            raise InputError(f"--two-stage needs a feature loss (hint, crosslayer, at, rtk) for stage one and a "
                             f"logit loss (ce, kl) for stage two; the recipe is {recipe}")


def stage_epochs(epochs: int, fraction: float) -> tuple[int, int]:
    """(stage-one epochs, stage-two epochs): each stage gets at least one when there are two."""
    if fraction <= 0 or epochs < 2:
        return 0, epochs
    first = min(epochs - 1, max(1, round(epochs * fraction)))
    return first, epochs - first


def criterion_stages(criterion: Criterion, epochs: int, fraction: float) -> tuple[int, int]:
    """`stage_epochs` for a criterion: one stage unless it has both feature and logit losses."""
    return stage_epochs(epochs, fraction) if criterion.kinds() == {"logits", "features"} else (0, epochs)


def distill(student: Network, batches: BatchIterator, targets: TargetSource | None, criterion: Criterion,
            cfg: TrainConfig, epochs: int, on_epoch: Callable[[int], None] | None = None,
            desc: str = "distill", progress: bool = True, two_stage: float = 0.0,
            on_step: Callable[[int], None] | None = None, epoch_lines: bool = False,
            checkpoint: Checkpoint | None = None, replan: Callable[[int, float], int] | None = None) -> float:
    """Train `student` (and the criterion's adapters) for `epochs`; returns training seconds.

    With `two_stage` > 0 the first `two_stage` of the epochs train on the feature losses only and
    the rest on the logit losses only, each stage with its own one-cycle schedule; `on_epoch`
    sees the epochs numbered through both, `on_step` the optimizer steps counted through both.
    `targets` may be None only when no loss of the criterion uses the teachers. With
    `checkpoint`, every epoch's state is saved and a killed run resumes (`train.fit`); the
    stage-one state goes beside it, suffixed `-align`. `replan` re-plans the length after each
    epoch (`train.fit`); two-stage training keeps its planned length.
    """
    if criterion.uses_teachers and targets is None:
        raise ValueError("this recipe needs teacher targets")

    def step_of(kind: str | None) -> Callable[[Batch], torch.Tensor]:
        def step(batch: Batch) -> torch.Tensor:
            features = student.forward_features(batch.x)
            out = StudentOutput(student.forward_head(features[-1]), features)
            return criterion(out, targets(batch) if criterion.uses_teachers else None, batch.y, kind)
        return step

    modules = nn.ModuleDict({"student": student, "criterion": criterion})
    first, second = criterion_stages(criterion, epochs, two_stage)
    if not first:
        return fit(modules, batches, step_of(None), cfg, epochs, on_epoch, desc, progress, on_step=on_step,
                   epoch_lines=epoch_lines, checkpoint=checkpoint, replan=replan)

    offset = first * len(batches)
    align = None if checkpoint is None else Checkpoint(checkpoint.path.with_stem(checkpoint.path.stem + "-align"),
                                                         checkpoint.on_damage)
    seconds = fit(modules, batches, step_of("features"), cfg, first, on_epoch, f"{desc} align", progress,
                  on_step=on_step, epoch_lines=epoch_lines, checkpoint=align)
    return seconds + fit(modules, batches, step_of("logits"), cfg, second, on_epoch, desc, progress, first_epoch=first,
                         on_step=None if on_step is None else lambda n: on_step(offset + n), epoch_lines=epoch_lines,
                         checkpoint=checkpoint)


# "auto" augments a retrain of this many epochs or more (--final-augment); None: "auto" never does
# (only --augment or --final-augment on). None because at 8 epochs crop and flip cost the main
# command's winner 0.29 points of validation accuracy (95.08% with 4 cached views against 95.37%
# without; benchmarks/retrain_curve.py, seed 0); longer retrains are not measured yet
LONG_RETRAIN_EPOCHS: int | None = None
FINAL_AUGMENT = ("auto", "on", "off")


@dataclass(frozen=True)
class RetrainRecipe:
    """What a full-schedule training (the retrain, a finalist, a baseline, the online ensemble)
    takes from the settings: the distillation and optimizer recipes, its epochs, its seed, whether
    it augments (`augment`: the settings' final_augment, "auto", "on" or "off"), and how many of the
    teachers' views it may cache (`views`) in how many GB (`cache_gb`)."""

    distill: DistillConfig
    train: TrainConfig
    epochs: int
    seed: int
    augment: str = "auto"
    views: int = 4
    cache_gb: float = 4.0

    @classmethod
    def of(cls, cfg: SearchConfig) -> RetrainRecipe:
        """A run's, from its settings."""
        return cls(cfg.distill, cfg.train, cfg.final_epochs, cfg.seed, cfg.final_augment, cfg.ensemble_views,
                   cfg.target_cache_gb)

    def augments(self, epochs: int | None = None) -> bool:
        """Whether a retrain of `epochs` (default: the recipe's) uses padding-crop and flips."""
        if self.augment not in FINAL_AUGMENT:
            raise InputError(f"final_augment must be one of {', '.join(FINAL_AUGMENT)}, got {self.augment!r}")
        epochs = self.epochs if epochs is None else epochs
        if self.augment == "auto":
            return self.train.augment or (LONG_RETRAIN_EPOCHS is not None and epochs >= LONG_RETRAIN_EPOCHS)
        return self.augment == "on"

    def describe(self, epochs: int | None = None) -> str:
        """How a retrain of `epochs` (default: the recipe's) is trained, for its first line."""
        epochs = self.epochs if epochs is None else epochs
        if not self.augments(epochs):
            return "no augmentation"
        why = f" (from {LONG_RETRAIN_EPOCHS} epochs on)" if self.augment == "auto" and not self.train.augment else ""
        views = min(self.views, epochs)
        teachers = f"teachers' outputs for up to {views} views" if views > 1 else "teachers live on a fresh view every epoch"
        return f"padding-crop and flips{why}, {teachers}"


def retrain_views(ensemble: Ensemble, dataset: Dataset, recipe: RetrainRecipe, criterion: Criterion, epochs: int) -> int:
    """How many views an augmented retrain caches the teachers' outputs for: the most, up to
    min(recipe.views, epochs), that fit recipe.cache_gb (4 views of Fashion-MNIST through the
    shipped teachers' logits and last stages take 4.06 GB: 3 fit the default 4 GB); under 2, the
    teachers run live."""
    for views in range(min(recipe.views, epochs), 1, -1):
        if CachedTargets.fits(ensemble, dataset.input_shape, len(dataset.train), views, criterion.features,
                              recipe.cache_gb):
            return views
    return 1


def retrain_targets(ensemble: Ensemble, dataset: Dataset, recipe: RetrainRecipe, criterion: Criterion | None,
                    cached: CachedTargets | None = None, progress: bool = True,
                    epochs: int | None = None) -> tuple[BatchIterator, TargetSource | None]:
    """Batches over the whole training split for a retrain of `epochs` (default: the recipe's)
    and where their targets come from (nowhere when `criterion` is None or reads no teacher).

    Without augmentation every epoch shows the same pixels, so the teachers' outputs are computed
    once (or taken from the search's cache) and reused by every epoch. With augmentation
    (`RetrainRecipe.augments`) epoch e shows view e mod V (`retrain_views`), view 0 the images as they
    are, and the teachers' outputs for the V views are computed once; without teachers every
    epoch is a fresh view. When even 2 views would not fit in `recipe.cache_gb` (or `recipe.views`
    is 1), the teachers run live on a fresh view every epoch.
    """
    epochs = recipe.epochs if epochs is None else epochs
    augment = recipe.augments(epochs)

    def iterator(views: int | None) -> BatchIterator:
        return BatchIterator(dataset.train, dataset, recipe.train.batch_size, recipe.seed, views=views, augment=augment)

    if criterion is None or not criterion.uses_teachers:
        return iterator(None), None
    views = retrain_views(ensemble, dataset, recipe, criterion, epochs) if augment else 1
    if augment and views < 2:
        return iterator(None), LiveTargets(ensemble, criterion.features)
    batches = iterator(views)
    if augment:
        return batches, CachedTargets(ensemble, batches, criterion.features, progress=progress)
    if cached is not None and cached.covers(batches.indices) and cached.serves(criterion.features):
        return batches, cached
    if not CachedTargets.fits(ensemble, dataset.input_shape, len(dataset.train), 1, criterion.features,
                              recipe.cache_gb):
        return iterator(None), LiveTargets(ensemble, criterion.features)
    return batches, CachedTargets(ensemble, batches, criterion.features, progress=progress)


# ---------------------------------------------------------------- the retrain recipe


def seeded_student(make: Callable[[], Network], seed: int, recipe: DistillConfig | None,
                   teacher_channels: list[list[int]]) -> tuple[Network, Criterion | None]:
    """How every full-schedule training starts a student: the global generator seeded with
    `seed`, then the network `make` returns (a fresh spec, or a copy of a pruned teacher), then
    the criterion of `recipe` (None without one), whose adapters draw from the same stream."""
    torch.manual_seed(seed)
    model = make()
    return model, None if recipe is None else criterion_for(model, recipe, teacher_channels)


def retrain_student(make: Callable[[], Network], dataset: Dataset, ensemble: Ensemble, recipe: RetrainRecipe,
                    epochs: int | None = None, desc: str = "retrain", progress: bool = True,
                    cached: CachedTargets | None = None, epoch_lines: bool = False,
                    checkpoint: Checkpoint | None = None,
                    replan: Callable[[int, float], int] | None = None) -> tuple[Network, float]:
    """The retrain: `seeded_student` (seed recipe.seed), its targets over the whole training split
    (`retrain_targets`, the search's cache when it covers them), then `epochs` (default: the
    recipe's) of distillation with recipe.distill, saved to `checkpoint` every epoch when given,
    its length re-planned after each epoch by `replan` when given (a time budget's
    `train.Deadline`). Returns the network in eval mode and the training seconds."""
    epochs = recipe.epochs if epochs is None else epochs
    model, criterion = seeded_student(make, recipe.seed, recipe.distill, ensemble.feature_channels)
    batches, targets = retrain_targets(ensemble, dataset, recipe, criterion, cached, progress, epochs)
    seconds = distill(model, batches, targets, criterion, recipe.train, epochs, desc=desc, progress=progress,
                      two_stage=recipe.distill.two_stage, epoch_lines=epoch_lines, checkpoint=checkpoint, replan=replan)
    return model.eval(), seconds


class _Timed(Exception):
    """Stops a timing run of `distill` after its last timed step."""


def step_seconds(student: Network, batches: BatchIterator, targets: TargetSource | None, criterion: Criterion,
                 cfg: TrainConfig, steps: int, warmup: int = 2) -> float:
    """Seconds of one optimizer step of `student` with this recipe on this machine: the mean of
    `steps` steps after `warmup` untimed ones, through the real training loop (a copy of the
    student and the criterion is trained, so neither moves). What `nas_kd.pipeline.plan` prices a trial
    and a retrain epoch with."""
    import copy

    student, criterion = copy.deepcopy(student), copy.deepcopy(criterion)
    marks: list[float] = []

    def on_step(n: int) -> None:
        marks.append(time.perf_counter())
        if n >= warmup + steps:
            raise _Timed

    try:
        distill(student, batches, targets, criterion, cfg, 1 + (warmup + steps) // max(1, len(batches)),
                progress=False, on_step=on_step)
    except _Timed:
        pass
    timed = marks[warmup - 1:] if warmup else marks
    if len(timed) < 2:
        raise ValueError(f"an epoch of {len(batches)} batches is too short to time {steps} steps")
    return (timed[-1] - timed[0]) / (len(timed) - 1)
