"""The first three phases of a search, each handing the next what it made:

- `prepare`: every check of the user's input, the data, the search space, the budget, the latency
  meter, the start points and the teacher files, before any training and before the study opens;
- `open_run`: the study, and this command's run in it (new, resumed, or already finished);
- `teach`: the teachers' ensemble, the trial batches, the cached soft targets (or the
  block-wise scorer) that every trial reads, and the trials' context with the budget.

`pipeline.run` follows them with the trials, the retrain and the summary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from nas_kd.core.config import SearchConfig, adapt_schedule
from nas_kd.core.errors import InputError
from nas_kd.core.progress import RunClock, log
from nas_kd.core.units import format_duration
from nas_kd.data.batches import BatchIterator, seeded_subset
from nas_kd.data.datasets import Dataset, load_dataset
from nas_kd.device.latency import LatencySettings, latency_meter
from nas_kd.distill.blockwise import BlockwiseScorer, most_accurate
from nas_kd.distill.losses import logits_only, recipe_features, recipe_uses_teachers
from nas_kd.distill.student import RetrainRecipe
from nas_kd.nas.budget import Budget, budget_warning, check_reachable, effective_floor
from nas_kd.nas.edge import depth_setting
from nas_kd.nas.objective import TrialContext, TrialRecipe, trial_context, trial_score_named
from nas_kd.nas.records import stored_blockwise_scores
from nas_kd.nas.start import DEPTH_FACTOR, StartPoint, depth_cap, start_points
from nas_kd.nas.study import (
    COMPRESSION_TEACHER_KEY,
    STUDY_ATTR,
    check_same_teachers,
    check_url,
    default_study_name,
    guarded,
    open_storage,
    open_study,
    shares_its_study,
    space_id,
    storage_url,
    update_study_attr,
)
from nas_kd.nets.arch import Spec
from nas_kd.nets.space import SearchSpace, describe, load_space
from nas_kd.pipeline.checks import validate
from nas_kd.pipeline.plan import refuse_too_small
from nas_kd.pipeline.resume import Run, Session, begin
from nas_kd.retraining.baselines import check_prunable
from nas_kd.teaching.ensemble import (
    CachedTargets,
    Ensemble,
    TargetSource,
    Teacher,
    ensemble_from_config,
    ensemble_summary,
    file_teachers,
    teacher_names,
)
from nas_kd.teaching.stored import stored_targets
from nas_kd.training.train import resolve_device


@dataclass(frozen=True)
class Prepared:
    """What `prepare` checked and loaded: everything the study, the teachers and the trials need."""

    asked: SearchConfig  # the command's settings, before the schedule and the plans adapt them
    cfg: SearchConfig  # with the trial schedule adapted to the dataset's size
    space: SearchSpace
    budget: Budget  # every bound of the run, built once
    dataset: Dataset  # on the run's device
    latency: Callable[[Spec], float] | None  # a spec's latency, from the table or measured here
    floor: float  # the budget floor in force (0 at the edge)
    starts: list[StartPoint]  # the start points to enqueue
    starts_skipped: list[str]  # a line for each start point left out
    files: list[Teacher]  # the teachers read from files (--teacher PATH), each checked


@dataclass(frozen=True)
class Opened:
    """The study and this command's run in it (`run` is None for a worker, which has no run of its own)."""

    study: optuna.Study
    name: str
    url: str
    out: Path  # OUT_DIR/<study>: the report, the winner, the checkpoints
    run: Run | None
    how: str  # "new", "resumed" or "finished"


@dataclass(frozen=True)
class Taught:
    """What the trials read from the teachers."""

    cfg: SearchConfig  # with the recipe reduced to logits where no teacher has feature maps
    ensemble: Ensemble
    subset: torch.Tensor  # the trial images' indices
    batches: BatchIterator  # the trials' batches
    targets: TargetSource | None  # the cached soft targets (and features), when the recipe reads teachers
    scorer: BlockwiseScorer | None  # the block-wise trial score's scorer, when that score is asked
    trials: TrialContext  # what every trial reads: the above, the space, the budget and the trial recipe


def budget_of(cfg: SearchConfig) -> Budget:
    """The budget a search, its trials, its start points, its retrain and its baselines are held to:
    every bound the settings give (--flops-budget, --params-budget, --latency-budget, --memory-budget)."""
    return Budget(cfg.flops_budget, cfg.params_budget, cfg.latency_budget_ms, cfg.memory_budget)


def edge_cap(cfg: SearchConfig, budget: Budget, input_shape: tuple[int, int, int], num_classes: int,
             table: Callable[[Spec], float] | None, log: Callable[[str], None]) -> int:
    """The most blocks a stage of a shape drawn at the edge may have (0: as the space allows), and
    one log line saying so: `--edge-depth N`'s N, or the family's cap priced at `budget` (latency
    only by a `table`: one measured here would time the family width by width)."""
    if cfg.budget_edge != "on" or cfg.edge_depth == "free":
        return 0
    if (given := depth_setting(cfg.edge_depth)) is not None:
        log(f"depths drawn at the edge: at most {given} blocks a stage (--edge-depth {given})")
        return given
    cap = 0
    try:
        cap = depth_cap(budget, input_shape, num_classes, table)
        why = f"the depth of the hand-made ResNet, the deepest at x{DEPTH_FACTOR} widths or more at this budget"
    except InputError as e:  # a latency table without the ResNets' layers
        why = f"the hand-made family cannot be priced: {e}"
    log(f"depths drawn at the edge: {f'at most {cap} blocks a stage' if cap else 'as the space allows'} "
        f"(--edge-depth family: {why})")
    return cap


def trial_recipe(cfg: SearchConfig, budget: Budget, cap: int = 0) -> TrialRecipe:
    """The trials' part of the settings. The repair raises single widths unless every latency is
    measured here (seconds a spec, with no table to read). `cap`: the most blocks a stage of a
    shape drawn may have (`teach` prices it with --edge-depth family; 0: none)."""
    measured = budget.latency_ms is not None and not cfg.latency_table
    return TrialRecipe(cfg.distill, cfg.train, cfg.trial_epochs, cfg.seed, cfg.trial_score, cfg.trial_reports,
                       cfg.bn_recalibration, cfg.objective == "pareto", cfg.pareto_cost, cfg.budget_edge == "on",
                       not measured, cfg.edge_min_width, cap)


def prepare(cfg: SearchConfig, clock: RunClock) -> Prepared:
    """Every check of the user's input, before the first progress line and any training: a bad setting,
    budget, space, dataset, storage URL or teacher file raises `InputError` here."""
    asked = cfg
    validate(cfg)
    space = load_space(cfg.search_space)
    budget = budget_of(cfg)
    if cfg.storage:
        check_url(cfg.storage)
    dataset = load_dataset(cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None)
    cfg, schedule_text = adapt_schedule(cfg, len(dataset.train))
    latency, latency_text = latency_meter(LatencySettings.of(cfg), space, dataset.input_shape, dataset.num_classes)
    check_reachable(budget, space, dataset.input_shape, dataset.num_classes, latency, cfg.seed,
                    bool(cfg.latency_table), cfg.latency_precision)
    floor, floor_text = effective_floor(cfg.budget_floor, budget, space, dataset.input_shape, dataset.num_classes)
    starts, starts_skipped = start_points(cfg.start_from, space, budget, dataset.input_shape, dataset.num_classes,
                                          floor, latency if cfg.latency_table else None,
                                          None if cfg.latency_table else latency)
    if cfg.pruned_baseline:
        check_prunable(teacher_names(cfg), budget, dataset.input_shape, dataset.num_classes, latency)
    refuse_too_small(cfg, space, budget, dataset, clock)
    device = resolve_device(cfg.device)
    log(f"dataset {dataset.name}: {len(dataset.train)} train / {len(dataset.val)} val / {len(dataset.test)} test "
        f"images of {'x'.join(map(str, dataset.input_shape))}, {dataset.num_classes} classes; device {device}")
    dataset = dataset.to(device)
    files = file_teachers(cfg, dataset)  # each checked before the study is opened: a bad file writes nothing
    log(f"search space {describe(space)}; budget {budget}")
    log(schedule_text)
    if cfg.final_epochs > 0 and not cfg.worker:
        log(f"retrain: {'planned by the time budget' if cfg.time_budget is not None else f'{cfg.final_epochs} epochs'}"
            f", recipe {cfg.distill.describe()}, {RetrainRecipe.of(cfg).describe()}")
    log(latency_text)
    if floor_text:
        log(floor_text)
    if (warning := budget_warning(budget, teacher_names(cfg), dataset.input_shape, dataset.num_classes,
                                  {t.name: t.cost for t in files})):
        log(warning)
    return Prepared(asked, cfg, space, budget, dataset, latency, floor, starts, starts_skipped, files)


def open_run(prep: Prepared, clock: RunClock, session: Session) -> Opened:
    """The study (opened or created) and this command's run in it. A resumed run's clock goes on from
    the time spent before; `session` is told the run as soon as it is known, so that an interrupted
    run can store how far it got."""
    cfg = prep.cfg
    keys = guarded(cfg, space_id(prep.space), prep.space.fingerprint())
    name = cfg.study_name or default_study_name(keys)
    url = storage_url(cfg.storage, name, Path(cfg.out_dir))
    study = open_study(open_storage(url, interval=cfg.heartbeat), name, cfg.objective == "pareto", cfg.seed, keys,
                       cfg.pruner, cfg.trial_reports, cfg.sampler, shared=shares_its_study(cfg))
    if cfg.objective == "pareto" and cfg.pruner != "none":
        log("--objective pareto: trials are not pruned (Optuna cannot prune multi-objective studies); "
            "every trial trains to its end")
    log(f"study {name} in {url} ({len(study.trials)} trials already)")
    out = Path(cfg.out_dir) / name
    run, how = (None, "new") if cfg.worker else begin(study, prep.asked)
    if run is not None and how == "resumed":
        clock.resume(run.elapsed)
        log(f"resuming this command's run ({run.asked}): {run.progress(study)}, {format_duration(run.elapsed)} "
            f"spent in {run.sessions - 1} earlier session{'s' if run.sessions > 2 else ''}; "
            + ("the search is done, the retrain goes on" if run.phase == "retrain" else "the search goes on"))
    elif run is not None and cfg.more and how != "finished":
        log(f"--more: a new run in study {name}, after the one it holds")
    if run is not None and how != "finished":  # stored once its search is planned, or when it is interrupted before
        session.run, session.study, session.out = run, study, out
    return Opened(study, name, url, out, run, how)


def teach(prep: Prepared, opened: Opened, progress: bool) -> Taught:
    """The ensemble (built, loaded or read from files), recorded in the study with the run's settings,
    and what every trial reads of it: the cached soft targets, or the block-wise scorer."""
    cfg, dataset, budget, study = prep.cfg, prep.dataset, prep.budget, opened.study
    ensemble = ensemble_from_config(cfg, dataset, progress, log, prep.files)
    cfg, recipe_line = logits_only(cfg, ensemble)
    if recipe_line:
        log(recipe_line)
    check_same_teachers(study, ensemble_summary(ensemble))
    ensemble_val = ensemble.accuracy(dataset.val, dataset)
    compression_teacher = ensemble.largest_member()
    update_study_attr(study, STUDY_ATTR, {
        "config": cfg.to_dict(), "space": prep.space.name,
        "budget": {"macs": budget.macs, "params": budget.params, "latency_ms": budget.latency_ms, "memory": budget.memory},
        "budget_text": str(budget), "budget_floor": prep.floor, "teachers": ensemble_summary(ensemble),
        "ensemble": {"val_acc": ensemble_val},
        COMPRESSION_TEACHER_KEY: f"{compression_teacher.name} for MACs, "
                                 f"{max(ensemble.members, key=lambda t: t.cost.params).name} for params",
        "recipe": cfg.distill.describe(), "input_shape": list(dataset.input_shape)})
    log(f"ensemble of {len(ensemble.members)}: val acc {ensemble_val:.4f}")

    subset = seeded_subset(len(dataset.train), cfg.subset, cfg.seed)
    views = min(cfg.ensemble_views, cfg.trial_epochs) if cfg.train.augment else 1
    batches = BatchIterator(dataset.train, dataset, cfg.train.batch_size, cfg.seed, views=views,
                            augment=cfg.train.augment, indices=subset)
    features = recipe_features(cfg.distill.weights())
    targets, scorer = None, None
    if trial_score_named(cfg.trial_score).blockwise:
        best = most_accurate(ensemble.members)
        # no BatchNorm recalibration here: measured, it left the block-wise ranking as it was
        # (Spearman -0.40 without, -0.38 with, 20 students under 5M MACs; BENCHMARKS.md)
        scorer = BlockwiseScorer(best, dataset, batches, cfg.train, cfg.trial_epochs, cfg.seed)
        scorer.preload(stored_blockwise_scores(study))
        log(f"block-wise scores against teacher {best.name}; {len(scorer.scores)} stage scores from earlier trials")
    elif recipe_uses_teachers(cfg.distill.weights()):
        # without augmentation the retrain sees the same pixels every epoch: cache its targets too
        whole = cfg.final_epochs > 0 and not cfg.worker and not RetrainRecipe.of(cfg).augments() and CachedTargets.fits(
            ensemble, dataset.input_shape, len(dataset.train), views, features, cfg.target_cache_gb)
        cover = BatchIterator(dataset.train, dataset, cfg.train.batch_size, cfg.seed, views=views,
                              augment=cfg.train.augment, indices=None if whole else subset)
        targets, kept = stored_targets(ensemble, dataset, cover, features, cfg.cache_path() / "targets", log, progress,
                                       cfg.target_cache_gb)
        log(f"cached ensemble targets for {len(cover.indices)} images x {views} views "
            f"({targets.nbytes() / 1e6:.0f} MB){' (trials and retrain)' if whole else ''}: {kept}")
    cap = edge_cap(cfg, budget, dataset.input_shape, dataset.num_classes, prep.latency if cfg.latency_table else None,
                   log)
    trials = trial_context(prep.space, dataset, ensemble, budget, batches, targets, trial_recipe(cfg, budget, cap),
                           progress, scorer, prep.latency, prep.floor)
    return Taught(cfg, ensemble, subset, batches, targets, scorer, trials)
