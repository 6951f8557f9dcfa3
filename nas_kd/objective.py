"""One Optuna trial: sample a spec, check its cost, then reject it or distil it briefly."""

from __future__ import annotations

import time
from dataclasses import dataclass

import optuna
import torch

from nas_kd.arch import Spec, build
from nas_kd.config import DistillConfig, TrainConfig
from nas_kd.cost import Budget, Cost, count, format_count
from nas_kd.data import BatchIterator, Dataset
from nas_kd.distill import criterion_for, distill
from nas_kd.space import SearchSpace
from nas_kd.teachers import Ensemble, TargetSource
from nas_kd.train import evaluate

# optuna-dashboard 0.21 reads feasibility only from this legacy list attribute; Optuna 5 writes
# `constraints:<name>` keys. Both are written so the dashboard and the samplers agree.
LEGACY_CONSTRAINTS_KEY = "constraints"


@dataclass
class TrialContext:
    """Everything a trial needs, built once per search by the command line."""

    space: SearchSpace
    dataset: Dataset  # on the training device
    ensemble: Ensemble
    budget: Budget
    batches: BatchIterator  # the trial subset, with the cached views
    targets: TargetSource | None  # None when the recipe uses no teacher
    recipe: DistillConfig
    train: TrainConfig
    epochs: int
    pareto: bool  # objectives (accuracy, MACs) instead of accuracy alone
    seed: int
    progress: bool = True


def compression(cost: Cost, reference: Cost) -> tuple[float, float]:
    """(teacher MACs / student MACs, teacher params / student params)."""
    return reference.macs / max(1, cost.macs), reference.params / max(1, cost.params)


def record_cost(trial: optuna.Trial, spec: Spec, cost: Cost, reference: Cost, budget: Budget) -> bool:
    """Store the spec, its cost and its constraints on the trial; return whether it fits."""
    macs_c, params_c = compression(cost, reference)
    for key, value in (("spec", str(spec)), ("macs", cost.macs), ("params", cost.params),
                       ("macs_compression", round(macs_c, 4)), ("params_compression", round(params_c, 4))):
        trial.set_user_attr(key, value)
    violations = budget.violations(cost)
    for key, value in violations.items():
        trial.set_constraint(key, value)
    trial.storage.set_trial_system_attr(trial._trial_id, LEGACY_CONSTRAINTS_KEY, list(violations.values()))
    return budget.fits(cost)


def run_trial(ctx: TrialContext, trial: optuna.Trial) -> float | tuple[float, float]:
    spec = ctx.space.sample(trial)
    model = build(spec, ctx.dataset.input_shape, ctx.dataset.num_classes)
    cost = count(model, ctx.dataset.input_shape)
    if not record_cost(trial, spec, cost, ctx.ensemble.largest(), ctx.budget):
        over = ", ".join(f"{k} {format_count(getattr(cost, k))} > {format_count(getattr(ctx.budget, k))}"
                         for k, v in ctx.budget.violations(cost).items() if v > 0)
        raise optuna.TrialPruned(f"over budget ({over}); not trained")

    torch.manual_seed(ctx.seed * 100_003 + trial.number)
    device = ctx.dataset.train.x.device
    model = build(spec, ctx.dataset.input_shape, ctx.dataset.num_classes).to(device)
    criterion = criterion_for(model, ctx.recipe, ctx.ensemble.feature_channels)
    accuracies: list[float] = []
    eval_seconds = 0.0

    def on_epoch(epoch: int) -> None:
        nonlocal eval_seconds
        start = time.perf_counter()
        accuracies.append(round(evaluate(model, ctx.dataset.val, ctx.dataset), 6))
        eval_seconds += time.perf_counter() - start
        trial.set_user_attr("val_acc_per_epoch", accuracies)
        if not ctx.pareto:  # Trial.report raises in multi-objective studies
            trial.report(accuracies[-1], epoch)
            # pruning after the last epoch would only throw finished work away
            if epoch + 1 < ctx.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} at val acc {accuracies[-1]:.4f}")

    start = time.perf_counter()
    try:
        distill(model, ctx.batches, ctx.targets, criterion, ctx.train, ctx.epochs, on_epoch,
                desc=f"trial {trial.number}", progress=ctx.progress)
    finally:
        trial.set_user_attr("train_seconds", round(time.perf_counter() - start - eval_seconds, 3))
    return (accuracies[-1], float(cost.macs)) if ctx.pareto else accuracies[-1]


def was_trained(trial: optuna.trial.FrozenTrial) -> bool:
    """Trained trials carry validation accuracies; budget rejections never do."""
    return "val_acc_per_epoch" in trial.user_attrs


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())
