"""One Optuna trial: sample a spec, check its cost, then reject it or distil it briefly."""

from __future__ import annotations

import gc
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import optuna
import torch

from nas_kd.core.config import DistillConfig, TrainConfig
from nas_kd.core.errors import InputError
from nas_kd.data.batches import BatchIterator, seeded_subset
from nas_kd.data.datasets import Dataset, Split
from nas_kd.device.memory import memory_facts
from nas_kd.distill.blockwise import BlockwiseScorer, stage_key
from nas_kd.distill.student import criterion_for, criterion_stages, distill
from nas_kd.nas.budget import Budget, floor_shortfall
from nas_kd.nas.edge import capped, repair
from nas_kd.nas.proxies import naswot, synflow
from nas_kd.nas.records import (
    AT_LARGEST_ATTR,
    BLOCKWISE_ATTR,
    BLOCKWISE_MEMO_ATTR,
    BLOCKWISE_NEW_ATTR,
    BLOCKWISE_STAGES_ATTR,
    CURVE_ATTR,
    DEPTH_GIVEN_ATTR,
    EDGE_FACTOR_ATTR,
    EVAL_SECONDS_ATTR,
    FAIL_ATTR,
    FAIL_TRACE_ATTR,
    FLOOR_CONSTRAINT,
    LATENCY_ATTR,
    NASWOT,
    RECIPE_ATTR,
    REPEAT_ATTR,
    SCORE_ATTR,
    SCORE_KIND_ATTR,
    SHAPE_ATTR,
    SPEC_ATTR,
    START_ATTR,
    START_SPEC_ATTR,
    SYNFLOW,
    TRAIN_SECONDS_ATTR,
    TRAINED_FRACTION_ATTR,
    USE_ATTR,
    VAL_ACC_ATTR,
    VAL_ACC_RAW_ATTR,
    WORKER_ATTR,
    cost_facts,
    scored_before,
)
from nas_kd.nas.start import trial_spec
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.cost import Cost, count
from nas_kd.nets.space import SearchSpace
from nas_kd.teaching.ensemble import Ensemble, TargetSource
from nas_kd.training.train import evaluate, recalibrated

# optuna-dashboard 0.21 reads feasibility only from this legacy list attribute; Optuna 5 writes
# `constraints:<name>` keys. Both are written so the dashboard and the samplers agree.
LEGACY_CONSTRAINTS_KEY = "constraints"


@dataclass(frozen=True)
class TrialRecipe:
    """How a search trains and scores each trial: its part of the run's settings
    (`pipeline.phases.trial_recipe` reads it off them)."""

    distill: DistillConfig
    train: TrainConfig
    epochs: int
    seed: int = 0
    score: str = "distill"  # a key of TRIAL_SCORES
    reports: int = 1  # validation passes of a distill trial, at equal fractions of its steps
    recalibration: int = 0  # batches of training images BatchNorm's statistics are recalibrated on (0: none)
    pareto: bool = False  # objectives (accuracy, pareto_cost) instead of accuracy alone
    pareto_cost: str = "macs"  # the Cost field minimised beside accuracy when `pareto`
    edge: bool = True  # scale every shape drawn to the budget's edge (nas_kd.nas.edge)
    edge_fill: bool = True  # let the repair raise single widths too (off when every latency is measured here)
    edge_min_width: int = 0  # a shape whose repaired stages are narrower gives up depth for width (0: never)
    edge_depth: int = 0  # the most blocks a stage of a shape drawn may have (edge.capped; 0: as the space allows)


@dataclass
class TrialContext:
    """Everything a trial needs, built once per search (`pipeline.phases.teach`)."""

    space: SearchSpace
    dataset: Dataset  # on the training device
    ensemble: Ensemble
    budget: Budget
    batches: BatchIterator  # the trial subset, with the cached views
    targets: TargetSource | None  # None when the recipe uses no teacher
    recipe: TrialRecipe
    progress: bool = True
    scorer: BlockwiseScorer | None = None  # with a TrialScore.blockwise trial score
    # batches of training images whose statistics replace BatchNorm's running ones before every
    # validation pass (train.recalibrate_bn); empty = no recalibration
    calibration: list[torch.Tensor] = field(default_factory=list)
    report_val: Split | None = None  # what the passes before the last read (None: all of dataset.val)
    proxy_images: torch.Tensor | None = None  # NASWOT's batch; None = proxies not computed
    latency: Callable[[Spec], float] | None = None  # spec -> ms (latency.latency_meter); None = not known
    floor: float = 0.0  # the budget floor in force (budget.effective_floor): a lesser budget.use is not trained


def trial_context(space: SearchSpace, dataset: Dataset, ensemble: Ensemble, budget: Budget, batches: BatchIterator,
                  targets: TargetSource | None, recipe: TrialRecipe, progress: bool = True,
                  scorer: BlockwiseScorer | None = None,
                  latency: Callable[[Spec], float] | None = None, floor: float = 0.0) -> TrialContext:
    """The context of a search's trials: the calibration batches (a seeded draw of
    `recipe.recalibration` batches of the trial subset, view 0), the seeded validation subset of the
    intermediate reports and NASWOT's seeded batch of training images."""
    g = torch.Generator().manual_seed(recipe.seed + 1)
    positions = batches.indices[torch.randperm(len(batches.indices), generator=g)]
    size = recipe.train.batch_size
    calibration = [batches.images(positions[i * size:(i + 1) * size], 0)
                   for i in range(min(recipe.recalibration, -(-len(positions) // size)))]
    report_val = None
    if recipe.reports > 1 and REPORT_IMAGES < len(dataset.val):
        report_val = dataset.val.subset(seeded_subset(len(dataset.val), REPORT_IMAGES, recipe.seed).to(dataset.val.y.device))
    proxy_images = batches.images(positions[:PROXY_BATCH], 0)
    return TrialContext(space, dataset, ensemble, budget, batches, targets, recipe, progress, scorer, calibration,
                        report_val, proxy_images, latency, floor)


REPORT_IMAGES = 2000  # validation images read by a trial's intermediate reports (the last reads them all)
PROXY_BATCH = 128  # NASWOT's mini-batch, as in its paper


def record_cost(trial: optuna.Trial, spec: Spec, cost: Cost, compression_teacher: Cost, budget: Budget,
                memory: dict[str, int] | None = None, floor: float = 0.0) -> bool:
    """Store the spec, its cost (and memory figures) and its constraints on the trial, the budget
    floor's among them; return whether it fits the budget and meets the floor."""
    facts = {SPEC_ATTR: str(spec), **cost_facts(cost, compression_teacher), **(memory or {})}
    if cost.latency_ms is not None:
        facts[LATENCY_ATTR] = round(cost.latency_ms, 4)
    if (use := budget.use(cost)) is not None:
        facts[USE_ATTR] = round(use, 4)
    for key, value in facts.items():
        trial.set_user_attr(key, value)
    violations = budget.violations(cost)
    if (short := floor_shortfall(budget, cost, floor)) is not None:
        violations[FLOOR_CONSTRAINT] = short
    for key, value in violations.items():
        trial.set_constraint(key, value)
    trial.storage.set_trial_system_attr(trial._trial_id, LEGACY_CONSTRAINTS_KEY, list(violations.values()))
    return all(v <= 0 for v in violations.values())


def run_trial(ctx: TrialContext, trial: optuna.Trial) -> float | tuple[float, float]:
    """Score one sampled spec. A failure inside the trial (a loss that turned NaN or infinite, an
    out-of-memory error, any other exception) fails this trial alone: its reason and traceback go
    in its user attributes, the memory it held is released, and NaN is returned, which Optuna
    records as FAIL (`study.run` stops the study after `study.MAX_FAILURES_IN_A_ROW` of them)."""
    try:
        return score_trial(ctx, trial)
    except (optuna.TrialPruned, InputError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - a trial's failure must not end the study
        reason = failure_reason(e, ctx.recipe.train.lr)
        trace = "".join(traceback.format_exception(e)[-TRACEBACK_LINES:])
    # out of the except block the traceback, and the frames that held the model, are gone
    release_memory()
    trial.set_user_attr(FAIL_ATTR, reason)
    trial.set_user_attr(FAIL_TRACE_ATTR, trace)
    nan = float("nan")
    return (nan, nan) if ctx.recipe.pareto else nan


TRACEBACK_LINES = 12


def failure_reason(error: BaseException, lr: float) -> str:
    """One line: what failed inside a trial, and the likely remedy."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if isinstance(error, FloatingPointError):
        return (f"diverged: {text}; the likely cause is a learning rate too high (--lr {lr:g}) or a loss "
                "weight too large (--distill)")
    if isinstance(error, torch.OutOfMemoryError):
        return (f"out of memory: {text[:200]}; lower --batch-size or the budget, or run on the CPU "
                "(--device cpu)")
    return f"{type(error).__name__}: {text}"


def release_memory() -> None:
    """Free what a failed trial held: Python's cycles, then the CUDA cache, so an out-of-memory
    trial does not leave the next one short of device memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score_trial(ctx: TrialContext, trial: optuna.Trial) -> float | tuple[float, float]:
    trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
    spec = trial_spec(ctx.space, trial, ctx.recipe.edge)
    priced: float | None = None  # the latency the repair judged the spec by, not measured again
    if ctx.recipe.edge and START_SPEC_ATTR not in trial.user_attrs:  # a start point is trained as it was given
        spec, priced = at_edge(ctx, trial, spec)
    model = build(spec, ctx.dataset.input_shape, ctx.dataset.num_classes)
    memory = memory_facts(model, ctx.dataset.input_shape)
    cost = replace(count(model, ctx.dataset.input_shape), memory=memory["peak_memory_int8"])
    short = floor_shortfall(ctx.budget, cost, ctx.floor)
    # the latency (1.5-3 s to export and time) only of specs within the cheaper bounds, and of
    # those under the floor only when a latency bound could lift them over it
    if ctx.latency is not None and replace(ctx.budget, latency_ms=None).fits(cost) and (
            not (short and short > 0) or ctx.budget.latency_ms is not None):
        cost = replace(cost, latency_ms=priced if priced is not None else ctx.latency(spec))
    if not record_cost(trial, spec, cost, ctx.ensemble.compression_reference(), ctx.budget, memory, ctx.floor):
        if not ctx.budget.fits(cost):
            raise optuna.TrialPruned(f"over budget ({ctx.budget.excess(cost)}); not trained")
        raise optuna.TrialPruned(f"under the budget floor (uses {ctx.budget.use(cost):.0%} of the budget, "
                                 f"< {ctx.floor:.0%}); not trained")
    earlier = scored_before(trial, str(spec))
    if earlier is not None:
        # the spec's score is known: the stored one is returned (so the sampler sees the spec
        # again) and nothing is trained; the trial does not count towards --trials
        trial.set_user_attr(REPEAT_ATTR, earlier.number)
        return tuple(earlier.values) if ctx.recipe.pareto else earlier.values[0]
    if ctx.proxy_images is not None:
        for name, value in proxy_scores(ctx, spec, cost).items():
            if name not in ("macs", "params"):  # stored by record_cost, as integers
                trial.set_user_attr(name, value)
    score = trial_score_named(ctx.recipe.score).compute(ctx, trial, spec)
    trial.set_user_attr(SCORE_ATTR, score)
    trial.set_user_attr(SCORE_KIND_ATTR, ctx.recipe.score)
    return (score, float(getattr(cost, ctx.recipe.pareto_cost))) if ctx.recipe.pareto else score


def at_edge(ctx: TrialContext, trial: optuna.Trial, shape: Spec) -> tuple[Spec, float | None]:
    """The sampled `shape` with its widths scaled to the budget's edge (`edge.repair`), and the
    latency the repair priced it at (None: not priced); the shape, the factor and whether it
    stopped at the space's greatest widths recorded on the trial."""
    shape_in = ctx.dataset.input_shape

    def price(spec: Spec) -> Cost:
        model = build(spec, shape_in, ctx.dataset.num_classes, channels_last=False)
        cost = count(model, shape_in)
        if ctx.budget.memory is not None:
            cost = replace(cost, memory=memory_facts(model, shape_in)["peak_memory_int8"])
        if ctx.budget.latency_ms is not None and ctx.latency is not None and replace(
                ctx.budget, latency_ms=None).fits(cost):  # a latency (seconds when measured) only within the rest
            cost = replace(cost, latency_ms=ctx.latency(spec))
        return cost

    drawn = capped(shape, ctx.space, ctx.recipe.edge_depth) if ctx.recipe.edge_depth else shape
    fixed = repair(drawn, ctx.space, ctx.budget, price, ctx.recipe.edge_fill, ctx.recipe.edge_min_width)
    trial.set_user_attr(SHAPE_ATTR, str(shape))
    trial.set_user_attr(EDGE_FACTOR_ATTR, fixed.factor)
    if fixed.depth_given:
        trial.set_user_attr(DEPTH_GIVEN_ATTR, fixed.depth_given)
    if fixed.at_largest:
        trial.set_user_attr(AT_LARGEST_ATTR, True)
    return fixed.spec, fixed.cost.latency_ms


def proxy_scores(ctx: TrialContext, spec: Spec, cost: Cost) -> dict[str, float]:
    """The training-free scores of `spec`, all of them, each from the same seeded initialisation."""
    out: dict[str, float] = {"macs": float(cost.macs), "params": float(cost.params)}
    for name, fn in ((NASWOT, lambda m: naswot(m, ctx.proxy_images)),
                     (SYNFLOW, lambda m: synflow(m, ctx.dataset.input_shape))):
        torch.manual_seed(ctx.recipe.seed)
        model = build(spec, ctx.dataset.input_shape, ctx.dataset.num_classes).to(ctx.proxy_images.device)
        out[name] = round(fn(model), 6)
    return out


def report_steps(total: int, reports: int, start: int = 0) -> list[int]:
    """The optimizer steps after which a trial of `total` steps is validated: `reports` of them at
    equal fractions of the steps after `start` (stage one of two-stage training is not
    validated), the last one at the end."""
    span = total - start
    return sorted({start + max(1, round(span * k / reports)) for k in range(1, reports + 1)})


def distill_score(ctx: TrialContext, trial: optuna.Trial, spec: Spec) -> float:
    """Validation accuracy after `ctx.recipe.epochs` of whole-network distillation, BatchNorm statistics
    recalibrated (`ctx.calibration`), the score of the search by default.

    It is also measured `ctx.recipe.reports` - 1 times during training, on `ctx.report_val`, and each
    measurement is reported to the pruner with the report's number (1, 2, ...) as its step. The
    last is on the whole validation split and is the score; the accuracy without recalibration
    is measured there too and stored as `val_acc_raw`."""
    torch.manual_seed(ctx.recipe.seed * 100_003 + trial.number)
    device = ctx.dataset.train.x.device
    model = build(spec, ctx.dataset.input_shape, ctx.dataset.num_classes).to(device)
    criterion = criterion_for(model, ctx.recipe.distill, ctx.ensemble.feature_channels)
    trial.set_user_attr(RECIPE_ATTR, ctx.recipe.distill.describe())
    # in two-stage training the head is untrained until stage two: stage one is not validated
    align_epochs, _ = criterion_stages(criterion, ctx.recipe.epochs, ctx.recipe.distill.two_stage)
    per_epoch = len(ctx.batches)
    total = ctx.recipe.epochs * per_epoch
    steps = report_steps(total, max(1, ctx.recipe.reports), align_epochs * per_epoch)
    curve: list[list[float]] = []  # [epochs trained, recalibrated val accuracy]
    eval_seconds = 0.0

    def measure(split: Split) -> float:
        if not ctx.calibration:
            return round(evaluate(model, split, ctx.dataset), 6)
        # the running statistics go back after, so the raw accuracy and the training are untouched
        with recalibrated(model, ctx.calibration):
            return round(evaluate(model, split, ctx.dataset), 6)

    def on_step(step: int) -> None:
        nonlocal eval_seconds
        if step not in steps:
            return
        start = time.perf_counter()
        last = step == total
        if last and ctx.calibration:
            trial.set_user_attr(VAL_ACC_RAW_ATTR, round(evaluate(model, ctx.dataset.val, ctx.dataset), 6))
        split = ctx.dataset.val if last or ctx.report_val is None else ctx.report_val
        curve.append([round(step / per_epoch, 4), measure(split)])
        eval_seconds += time.perf_counter() - start
        trial.set_user_attr(CURVE_ATTR, curve)
        if not ctx.recipe.pareto:  # Trial.report raises in multi-objective studies
            trial.report(curve[-1][1], len(curve))
            # pruning after the last report would only throw finished work away
            if not last and may_prune(trial):
                trial.set_user_attr(TRAINED_FRACTION_ATTR, round(step / total, 4))
                raise optuna.TrialPruned(f"pruned after {curve[-1][0]:g} epochs at val acc {curve[-1][1]:.4f}")

    start = time.perf_counter()
    try:
        distill(model, ctx.batches, ctx.targets, criterion, ctx.recipe.train, ctx.recipe.epochs, desc=f"trial {trial.number}",
                progress=ctx.progress, two_stage=ctx.recipe.distill.two_stage, on_step=on_step)
    finally:
        trial.set_user_attr(TRAIN_SECONDS_ATTR, round(time.perf_counter() - start - eval_seconds, 3))
        trial.set_user_attr(EVAL_SECONDS_ATTR, round(eval_seconds, 3))
    trial.set_user_attr(VAL_ACC_ATTR, curve[-1][1])
    return curve[-1][1]


def may_prune(trial: optuna.Trial) -> bool:
    """Whether the pruner stops the trial here. Never a start point (nas_kd.nas.start): it is the
    search's baseline, retrained whatever it scores, and a brief trial underrates exactly the
    deep networks a person would pick."""
    return START_ATTR not in trial.user_attrs and trial.should_prune()


def blockwise_score(ctx: TrialContext, trial: optuna.Trial, spec: Spec) -> float:
    """The block-wise score (see blockwise.py): mean R^2 of the student's stages, each trained alone
    to reproduce a teacher stage; stages already scored in this study are not trained again."""
    assert ctx.scorer is not None, "blockwise trials need TrialContext.scorer"
    start = time.perf_counter()
    known = len(ctx.scorer.scores)
    score, stages = ctx.scorer.score(spec)
    trial.set_user_attr(BLOCKWISE_STAGES_ATTR, [round(v, 6) for v in stages])
    trial.set_user_attr(BLOCKWISE_NEW_ATTR, len(ctx.scorer.scores) - known)
    trial.set_user_attr(BLOCKWISE_MEMO_ATTR, {key: ctx.scorer.scores[key]
                                              for key in (stage_key(spec, i) for i in range(len(spec.stages)))})
    trial.set_user_attr(BLOCKWISE_ATTR, round(score, 6))
    trial.set_user_attr(TRAIN_SECONDS_ATTR, round(time.perf_counter() - start, 3))
    return score


def training_free(name: str) -> Callable[[TrialContext, optuna.Trial, Spec], float]:
    """A trial score read from the proxies `run_trial` stored on the trial (nothing is trained)."""
    def score(ctx: TrialContext, trial: optuna.Trial, spec: Spec) -> float:
        if ctx.proxy_images is None:
            raise ValueError(f"trial score {name!r} needs TrialContext.proxy_images")
        return float(trial.user_attrs[name])
    score.__doc__ = f"The spec's {name}, computed before training (see proxies.py); nothing is trained."
    return score



@dataclass(frozen=True)
class TrialScore:
    """One way to score a trial's spec (`--trial-score NAME`); every score is "higher is better"."""

    compute: Callable[[TrialContext, optuna.Trial, Spec], float]
    label: str  # what the report's axes call it
    trains: bool  # False: computed from the untrained network or its cost, in about a second
    blockwise: bool = False  # scored by TrialContext.scorer, stage by stage against one teacher


# The trial scores by name, each registered once: the first two train, the others do not.
TRIAL_SCORES: dict[str, TrialScore] = {
    "distill": TrialScore(distill_score, "validation accuracy", trains=True),
    "blockwise": TrialScore(blockwise_score, "block-wise score (mean R^2 of stages)", trains=True, blockwise=True),
    NASWOT: TrialScore(training_free(NASWOT), "NASWOT score (log |K_H|)", trains=False),
    SYNFLOW: TrialScore(training_free(SYNFLOW), "SynFlow score (ln S)", trains=False),
    "macs": TrialScore(training_free("macs"), "MACs", trains=False),
    "params": TrialScore(training_free("params"), "parameters", trains=False),
}


def trial_score_named(name: str) -> TrialScore:
    """The registered trial score `name`; an unknown name is an error listing the known ones."""
    if name not in TRIAL_SCORES:
        raise InputError(f"unknown trial score {name!r}; known: {', '.join(TRIAL_SCORES)}")
    return TRIAL_SCORES[name]
