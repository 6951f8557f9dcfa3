"""The time budget: how a run given `--time-budget 30m` splits its time between the search and the retrain.

Users of AutoML tools state the time they have, not counts (auto-sklearn's
`time_left_for_this_task`, FLAML's `time_budget`, AutoGluon's `time_limit`). A run plans from
costs it measures on this machine: the seconds already spent (teachers, target caching), a
trial's seconds (first from timed steps of a student of the budget's size, then the mean of the
trials that finished), a retrain epoch's seconds (timed steps of the student to retrain), and a
fixed allowance for the test, export and report (less without ONNX). The search gets `search_share` of what is
left after that allowance; the retrain gets the rest, in whole epochs.

The arithmetic (`make_plan`, `epochs_left`) is pure, and the tests drive it with a fake clock and
fake costs; the functions at the end measure this machine's costs and apply the plan to a run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import optuna
import torch

from nas_kd.core.config import DistillConfig, SearchConfig, steps_per_epoch
from nas_kd.core.errors import InputError
from nas_kd.core.progress import RunClock
from nas_kd.core.units import format_duration
from nas_kd.data.batches import BatchIterator, eval_batches, forward_batch
from nas_kd.data.datasets import Dataset
from nas_kd.distill.losses import recipe_features, recipe_uses_teachers
from nas_kd.distill.student import (
    LONG_RETRAIN_EPOCHS,
    RetrainRecipe,
    criterion_for,
    step_seconds,
)
from nas_kd.nas.budget import Budget
from nas_kd.nas.picks import pick_winner
from nas_kd.nas.records import SPEC_ATTR
from nas_kd.nas.study import study_training, update_study_attr
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.cost import count
from nas_kd.nets.space import SearchSpace
from nas_kd.teaching.ensemble import Ensemble, FeatureSet, LiveTargets, TargetSource
from nas_kd.training.train import epochs_that_fit

# the share of the planned time the search gets by default (SearchConfig.search_share); the rest
# goes to the retrain
SEARCH_SHARE = SearchConfig.search_share
MIN_EPOCHS = 1  # a retrain shorter than this is not a retrain
EXPORT_SECONDS = 60.0  # test, ONNX and int8 export, report: about 30-50 s for a 50M student here
REPORT_SECONDS = 20.0  # test, weights and report without ONNX (--no-onnx)
TIMED_STEPS = 8  # optimizer steps timed to price a trial or a retrain epoch (after WARMUP_STEPS)
WARMUP_STEPS = 2


@dataclass(frozen=True)
class Costs:
    """What the run measured, in seconds."""

    spent: float  # before planning: dataset, teachers, target caching
    trial: float  # one trial
    epoch: float  # one retrain epoch
    export: float = EXPORT_SECONDS  # test, export and report after the retrain


@dataclass(frozen=True)
class Plan:
    """How the budget is spent: the search's seconds and trials, the retrain's seconds and epochs."""

    budget: float
    spent: float
    search: float
    trials: int  # trials the study should hold when the search ends (those it held before included)
    retrain: float
    epochs: int
    export: float

    def line(self, new_trials: int) -> str:
        return (f"time budget {format_duration(self.budget)} on this machine: "
                + (f"{format_duration(self.spent)} spent on setup, " if self.spent >= 1 else "")
                + f"search ~{format_duration(self.search)} (~{new_trials} trials), retrain "
                f"~{format_duration(self.retrain)} (~{self.epochs} epochs), export ~{format_duration(self.export)}")

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(self).items()}


def least_budget(costs: Costs, trials: int = 1) -> float:
    """The smallest budget that fits what was already spent, `trials` trials, a minimal retrain and the export."""
    return costs.spent + trials * costs.trial + MIN_EPOCHS * costs.epoch + costs.export


def make_plan(budget: float, costs: Costs, search_share: float = SEARCH_SHARE, trials: int | None = None,
              epochs: int | None = None, held: int = 0) -> Plan:
    """Split `budget` seconds. `trials` / `epochs` given explicitly override their part of the
    plan (the other part gets what is left); `held` trials' worth the study already holds (a
    resumed study) count towards the plan's trials and cost nothing more. A budget too small for
    one new trial (when the study holds none) and a minimal retrain is refused, naming the least
    that works."""
    need = 0 if held or trials is not None else 1
    if epochs is None and trials is None and budget < least_budget(costs, need):
        raise InputError(f"--time-budget {format_duration(budget)} is too small on this machine: "
                         f"{format_duration(costs.spent)} of setup, {need} trial of ~{costs.trial:.0f}s, "
                         f"{MIN_EPOCHS} retrain epoch of ~{costs.epoch:.0f}s and ~{costs.export:.0f}s of export need "
                         f"at least {format_duration(least_budget(costs, need))}; give more or pass --trials and "
                         "--final-epochs")
    left = max(0.0, budget - costs.spent - costs.export)
    if trials is not None:
        search = max(0, trials - held) * costs.trial
    elif epochs is not None:
        search = max(0.0, left - epochs * costs.epoch)
    else:
        search = max(costs.trial * need, search_share * left)
    new = math.floor(search / costs.trial + 1e-9) if trials is None else max(0, trials - held)
    if trials is None:
        search = new * costs.trial
    if epochs is None:
        epochs = max(MIN_EPOCHS, math.floor((left - search) / costs.epoch + 1e-9))
    return Plan(budget, costs.spent, search, held + new, epochs * costs.epoch, epochs, costs.export)


def export_seconds(cfg: SearchConfig) -> float:
    """What the plan keeps for after the retrain: the ONNX and int8 export only when it is made."""
    return EXPORT_SECONDS if cfg.onnx else REPORT_SECONDS


def epochs_left(budget: float, elapsed: float, epoch: float, export: float = EXPORT_SECONDS) -> int:
    """The whole retrain epochs that end nearest to what is left of `budget` after `elapsed`
    seconds, keeping `export` for the end, as `train.Deadline` re-plans them (at least MIN_EPOCHS:
    a run past its budget still hands over a trained student). Rounded down, a 10-minute run with
    1.95 epochs' time left trained 1 and ended 16% under: a training's last epoch is never
    re-planned, its learning rate having fallen to 0."""
    return max(MIN_EPOCHS, epochs_that_fit(budget - elapsed - export, epoch))


# ---------------------------------------------------------------- the run's costs, measured here

TRIAL_OVERHEAD = 1.25  # a trial's validation passes, BatchNorm recalibration and latency check, over its steps
TIME_ATTR = "time_budget"  # study user attribute: the plan and the actual split of a run with --time-budget


@functools.lru_cache(maxsize=8)
def typical_student(space: SearchSpace, budget: Budget, input_shape: tuple[int, int, int], num_classes: int,
                    seed: int, n: int = 20) -> Spec:
    """The median-MACs spec of `n` seeded random specs within the budget's MACs and params bounds
    (the space's smallest when none is): what a trial of this search typically trains. Kept per
    run's arguments: the refusal before the teachers and the plan after them ask for the same."""
    bounds = Budget(budget.macs, budget.params)
    fitting = sorted((c.macs, str(s), s) for s in space.random_specs(n, seed)
                     if bounds.fits(c := count(build(s, input_shape, num_classes, channels_last=False), input_shape)))
    return fitting[len(fitting) // 2][2] if fitting else space.smallest(input_shape, num_classes)[0][0]


def spec_step_seconds(spec: Spec, dataset: Dataset, ensemble: Ensemble, cfg: SearchConfig, batches: BatchIterator,
                      targets: TargetSource | None) -> float:
    """Seconds of one training step of `spec` with the run's recipe, timed here (`distill.step_seconds`)."""
    with torch.random.fork_rng(devices=[]):  # the run's random stream is not moved by the timing
        model = build(spec, dataset.input_shape, dataset.num_classes).to(dataset.train.x.device)
        criterion = criterion_for(model, cfg.distill, ensemble.feature_channels)
        if criterion.uses_teachers and targets is None:
            targets = LiveTargets(ensemble, criterion.features)
        return step_seconds(model, batches, targets, criterion, cfg.train, TIMED_STEPS, WARMUP_STEPS)


def refuse_too_small(cfg: SearchConfig, space: SearchSpace, budget: Budget, dataset: Dataset, clock: RunClock) -> None:
    """Before any teacher, target or trial: refuse a time budget that cannot hold even one retrain
    epoch and the export, pricing the epoch by a typical student's plain cross-entropy steps
    (distillation costs more, so this errs towards letting a run start; `make_plan` checks again
    with the real costs once the teachers are ready)."""
    if cfg.time_budget is None or set(cfg.time_fixed) == {"trials", "final_epochs"}:
        return
    with torch.random.fork_rng(devices=[]):  # the run's random stream is not moved by the timing
        model = build(typical_student(space, budget, dataset.input_shape, dataset.num_classes, cfg.seed),
                      dataset.input_shape, dataset.num_classes)
        batches = BatchIterator(dataset.train, dataset, cfg.train.batch_size, cfg.seed, views=1, augment=False)
        criterion = criterion_for(model, DistillConfig(losses=(("ce", 1.0),)), [])
        step = step_seconds(model, batches, None, criterion, cfg.train, TIMED_STEPS, WARMUP_STEPS)
    epoch = step * steps_per_epoch(len(dataset.train), cfg.train.batch_size)
    least = clock.elapsed() + MIN_EPOCHS * epoch + export_seconds(cfg)
    if cfg.time_budget < least:
        raise InputError(f"--time-budget {format_duration(cfg.time_budget)} is too small on this machine: "
                         f"{format_duration(clock.elapsed())} of setup, {MIN_EPOCHS} retrain epoch of at least "
                         f"~{epoch:.0f}s and ~{export_seconds(cfg):.0f}s of export need more than "
                         f"{format_duration(least)}; give more or pass --trials and --final-epochs")


def teacher_pass_seconds(ensemble: Ensemble, dataset: Dataset, features: FeatureSet, batches: int = 4) -> float:
    """Seconds the teachers take over one view of the whole training split, from `batches` timed batches."""
    size = forward_batch(dataset.train.x.device)
    x = next(eval_batches(dataset.train, dataset, size))[0]
    with torch.inference_mode():
        ensemble(x, features)  # warm-up
        start = time.perf_counter()
        for _ in range(batches):
            ensemble(x, features)
    return (time.perf_counter() - start) / (batches * len(x)) * len(dataset.train)


def plan_search(cfg: SearchConfig, study: optuna.Study, space: SearchSpace, budget: Budget, dataset: Dataset,
                ensemble: Ensemble, batches: BatchIterator, targets: TargetSource | None,
                clock: RunClock) -> tuple[SearchConfig, Plan]:
    """The run's plan once its teachers and targets are ready: a typical student's steps timed
    here price a trial and a retrain epoch; the config gets the search's trials and timeout (and
    the retrain's epochs) unless they were given explicitly (`cfg.time_fixed`)."""
    step = spec_step_seconds(typical_student(space, budget, dataset.input_shape, dataset.num_classes, cfg.seed),
                             dataset, ensemble, cfg, batches, targets)
    costs = Costs(spent=clock.elapsed(), trial=step * len(batches) * cfg.trial_epochs * TRIAL_OVERHEAD,
                  epoch=step * steps_per_epoch(len(dataset.train), cfg.train.batch_size) * cfg.finalists,
                  export=export_seconds(cfg))
    fixed = set(cfg.time_fixed)
    held = math.floor(study_training(study))
    plan = make_plan(cfg.time_budget, costs, cfg.search_share, trials=held + cfg.trials if "trials" in fixed else None,
                     epochs=cfg.final_epochs if "final_epochs" in fixed else None, held=held)
    if "trials" not in fixed:
        cfg = dataclasses.replace(cfg, trials=max(0, plan.trials - held), timeout=plan.search)
    if "final_epochs" not in fixed:
        cfg = dataclasses.replace(cfg, final_epochs=plan.epochs)
    update_study_attr(study, TIME_ATTR, {"plan": plan.to_dict(), "costs": asdict(costs)})
    return cfg, plan


def stored_plan(study: optuna.Study) -> Plan | None:
    """The plan a run's first session stored (`plan_search`), for a session that resumes after the search."""
    stored = study.user_attrs.get(TIME_ATTR, {}).get("plan")
    try:
        return Plan(**stored) if isinstance(stored, dict) else None
    except TypeError:
        return None


def plan_retrain(cfg: SearchConfig, study: optuna.Study, dataset: Dataset, ensemble: Ensemble,
                 batches: BatchIterator, targets: TargetSource | None, clock: RunClock) -> tuple[SearchConfig, str]:
    """After the search: the retrain's epochs from what is left of the budget, the winner's own steps
    timed here; and a line that says so."""
    if "final_epochs" in cfg.time_fixed:
        return cfg, f"retrain: {cfg.final_epochs} epochs (--final-epochs)"
    winner = Spec.parse(pick_winner(study, cfg.retrain_trial).user_attrs[SPEC_ATTR])
    epoch = (spec_step_seconds(winner, dataset, ensemble, cfg, batches, targets)
             * steps_per_epoch(len(dataset.train), cfg.train.batch_size) * cfg.finalists)
    epochs = epochs_left(cfg.time_budget, clock.elapsed(), epoch, export_seconds(cfg))
    recipe = RetrainRecipe.of(cfg)
    if recipe.augments(epochs) and recipe_uses_teachers(cfg.distill.weights()):
        # an augmented retrain first runs the teachers over its views (distill.retrain_targets)
        views = min(recipe.views, epochs)
        cache = views * teacher_pass_seconds(ensemble, dataset, recipe_features(cfg.distill.weights()))
        augmented = epochs_left(cfg.time_budget, clock.elapsed() + cache, epoch, export_seconds(cfg))
        if recipe.augments(augmented):
            epochs = augmented
        else:  # only "auto" with a threshold: the views' cost leaves too few epochs, so none, under it
            assert LONG_RETRAIN_EPOCHS is not None
            epochs = min(epochs, LONG_RETRAIN_EPOCHS - 1)
    return dataclasses.replace(cfg, final_epochs=epochs), (
        f"retrain: {epochs} epochs of ~{epoch:.0f}s fit the ~{format_duration(cfg.time_budget - clock.elapsed())} "
        f"left of the time budget ({format_duration(clock.elapsed())} spent); {recipe.describe(epochs)}")


def retrain_end(cfg: SearchConfig, elapsed: float, now: Callable[[], float] = time.perf_counter) -> float | None:
    """When the retrains must end, as a time of `now`, `elapsed` seconds into the run: the budget
    less the export's allowance. None when --final-epochs was given: its count is kept."""
    if "final_epochs" in cfg.time_fixed:
        return None
    return now() + cfg.time_budget - export_seconds(cfg) - elapsed


WITHIN = 0.10  # how far from its budget a run may end without a word on why


def record_split(study: optuna.Study, plan: Plan, marks: dict[str, float], trials: int, epochs: int) -> str:
    """The actual split of the run (`marks`: elapsed seconds when setup, search and retrain ended;
    no retrain mark when nothing was retrained), stored beside the plan; one line."""
    end, marks = marks["end"], {"retrain": marks["search"], **marks}
    actual = {"setup": marks["setup"], "search": marks["search"] - marks["setup"],
              "retrain": marks["retrain"] - marks["search"], "export": end - marks["retrain"], "total": end,
              "trials": trials, "epochs": epochs}
    update_study_attr(study, TIME_ATTR, {**study.user_attrs.get(TIME_ATTR, {}),
                                         "actual": {k: round(v, 1) for k, v in actual.items()}})
    over = end / plan.budget - 1
    line = (f"time budget {format_duration(plan.budget)}: setup {format_duration(actual['setup'])}, search "
            f"{format_duration(actual['search'])} ({trials} trials), retrain {format_duration(actual['retrain'])} "
            f"({epochs} epochs), export and report {format_duration(actual['export'])}; total "
            f"{format_duration(end)}, {abs(over):.0%} {'over' if over > 0 else 'under'} the budget")
    if abs(over) > WITHIN:  # why: the part that strayed furthest from its plan, the way the run did
        planned = {"setup": plan.spent, "search": plan.search, "retrain": plan.retrain, "export": plan.export}
        part = (max if over > 0 else min)(planned, key=lambda k: actual[k] - planned[k])
        line += f" (the {part} took {format_duration(actual[part])} of the ~{format_duration(planned[part])} planned)"
    return line


def check_time_budget(cfg: SearchConfig) -> None:
    """A time budget from a config file is checked as the flag is."""
    if cfg.time_budget is not None and not (math.isfinite(cfg.time_budget) and cfg.time_budget > 0):
        raise InputError(f"time_budget must be a positive number of seconds, got {cfg.time_budget!r}")
    if not 0 < cfg.search_share < 1:
        raise InputError(f"search_share must be between 0 and 1 (exclusive), got {cfg.search_share!r}")
    if bad := [k for k in cfg.time_fixed if k not in ("trials", "final_epochs")]:
        raise InputError(f"time_fixed names counts the plan keeps: trials and/or final_epochs, got {bad[0]!r}")
