"""One Optuna trial: sample a spec, check its cost, then reject it or distil it briefly."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import torch

from nas_kd.arch import Spec, build
from nas_kd.blockwise import BlockwiseScorer, stage_key
from nas_kd.config import DistillConfig, TrainConfig
from nas_kd.cost import Budget, Cost, count, format_count
from nas_kd.data import BatchIterator, Dataset
from nas_kd.distill import criterion_for, criterion_stages, distill
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
    trial_score: str = "distill"  # a key of TRIAL_SCORES
    scorer: BlockwiseScorer | None = None  # with trial_score "blockwise"


def compression(cost: Cost, reference: Cost) -> tuple[float, float]:
    """(teacher MACs / student MACs, teacher params / student params)."""
    return reference.macs / max(1, cost.macs), reference.params / max(1, cost.params)


def cost_facts(cost: Cost, reference: Cost) -> dict[str, int | float]:
    """A student's MACs and params and its compression against the reference, as trials, exports
    and reports record them."""
    macs_c, params_c = compression(cost, reference)
    return {"macs": cost.macs, "params": cost.params, "macs_compression": round(macs_c, 4),
            "params_compression": round(params_c, 4)}


def record_cost(trial: optuna.Trial, spec: Spec, cost: Cost, reference: Cost, budget: Budget) -> bool:
    """Store the spec, its cost and its constraints on the trial; return whether it fits."""
    for key, value in {"spec": str(spec), **cost_facts(cost, reference)}.items():
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
    score = TRIAL_SCORES[ctx.trial_score](ctx, trial, spec)
    return (score, float(cost.macs)) if ctx.pareto else score


def distill_score(ctx: TrialContext, trial: optuna.Trial, spec: Spec) -> float:
    """Validation accuracy after `ctx.epochs` of whole-network distillation, reported per epoch to
    the pruner."""
    torch.manual_seed(ctx.seed * 100_003 + trial.number)
    device = ctx.dataset.train.x.device
    model = build(spec, ctx.dataset.input_shape, ctx.dataset.num_classes).to(device)
    criterion = criterion_for(model, ctx.recipe, ctx.ensemble.feature_channels)
    trial.set_user_attr("recipe", ctx.recipe.describe())
    # in two-stage training the head is untrained until stage two: stage-one accuracies are not
    # reported to the pruner
    align_epochs, _ = criterion_stages(criterion, ctx.epochs, ctx.recipe.two_stage)
    accuracies: list[float] = []
    eval_seconds = 0.0

    def on_epoch(epoch: int) -> None:
        nonlocal eval_seconds
        start = time.perf_counter()
        accuracies.append(round(evaluate(model, ctx.dataset.val, ctx.dataset), 6))
        eval_seconds += time.perf_counter() - start
        trial.set_user_attr("val_acc_per_epoch", accuracies)
        if not ctx.pareto and epoch >= align_epochs:  # Trial.report raises in multi-objective studies
            trial.report(accuracies[-1], epoch)
            # pruning after the last epoch would only throw finished work away
            if epoch + 1 < ctx.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} at val acc {accuracies[-1]:.4f}")

    start = time.perf_counter()
    try:
        distill(model, ctx.batches, ctx.targets, criterion, ctx.train, ctx.epochs, on_epoch,
                desc=f"trial {trial.number}", progress=ctx.progress, two_stage=ctx.recipe.two_stage)
    finally:
        trial.set_user_attr("train_seconds", round(time.perf_counter() - start - eval_seconds, 3))
    return accuracies[-1]


def blockwise_score(ctx: TrialContext, trial: optuna.Trial, spec: Spec) -> float:
    """The block-wise score (see blockwise.py): mean R^2 of the student's stages, each trained alone
    to reproduce a teacher stage; stages already scored in this study are not trained again."""
    assert ctx.scorer is not None, "blockwise trials need TrialContext.scorer"
    start = time.perf_counter()
    known = len(ctx.scorer.scores)
    score, stages = ctx.scorer.score(spec)
    trial.set_user_attr("blockwise_stage_scores", [round(v, 6) for v in stages])
    trial.set_user_attr("blockwise_new_stages", len(ctx.scorer.scores) - known)
    trial.set_user_attr(BLOCKWISE_MEMO_ATTR, {key: ctx.scorer.scores[key]
                                              for key in (stage_key(spec, i) for i in range(len(spec.stages)))})
    trial.set_user_attr(BLOCKWISE_ATTR, round(score, 6))
    trial.set_user_attr("train_seconds", round(time.perf_counter() - start, 3))
    return score


BLOCKWISE_ATTR = "blockwise_score"
BLOCKWISE_MEMO_ATTR = "blockwise_memo"  # the trial's stage scores by stage key, for resumed runs

# How a trial's spec is scored (`--trial-score`); both return "higher is better".
TRIAL_SCORES: dict[str, Callable[[TrialContext, optuna.Trial, Spec], float]] = {
    "distill": distill_score,
    "blockwise": blockwise_score,
}


def was_trained(trial: optuna.trial.FrozenTrial) -> bool:
    """Trained trials carry validation accuracies or a block-wise score; budget rejections never do."""
    return "val_acc_per_epoch" in trial.user_attrs or BLOCKWISE_ATTR in trial.user_attrs


def trial_score(trial: optuna.trial.FrozenTrial) -> float | None:
    """The trial's last score: its latest validation accuracy, or its block-wise score."""
    accs = trial.user_attrs.get("val_acc_per_epoch")
    return accs[-1] if accs else trial.user_attrs.get(BLOCKWISE_ATTR)


def stored_blockwise_scores(study: optuna.Study) -> dict[str, float]:
    """Every stage score recorded by the study's finished blockwise trials (to preload a scorer)."""
    memo: dict[str, float] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        memo.update(t.user_attrs.get(BLOCKWISE_MEMO_ATTR, {}))
    return memo


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())
