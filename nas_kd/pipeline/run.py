"""The whole run, in order: check the settings, load the data and the search space, check the
budget, open the study, build or load the teachers and cache their targets, run the trials, write
the report, retrain the winner (and the baselines asked for), and print the summary.

`search` is what `python -m nas_kd.search` runs; `run` is the same job as a Python API, returning
the study and its retrained winner (`RunResult`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial
from tqdm.auto import tqdm

from nas_kd.core.config import SearchConfig, adapt_schedule
from nas_kd.core.errors import InputError
from nas_kd.core.progress import TimeBudget, bars_shown, budget_status, log
from nas_kd.core.units import format_count
from nas_kd.data.batches import BatchIterator, seeded_subset
from nas_kd.data.datasets import load_dataset
from nas_kd.device.convert import require_runtime
from nas_kd.device.int8 import check_target
from nas_kd.device.latency import check_precision, latency_meter
from nas_kd.distill.blockwise import BlockwiseScorer, most_accurate
from nas_kd.distill.losses import Criterion, loss_class, recipe_features, recipe_uses_teachers
from nas_kd.distill.student import check_two_stage, retrain_augments, retrain_recipe_text
from nas_kd.nas.budget import Budget, budget_warning, check_reachable, effective_floor
from nas_kd.nas.objective import run_trial, trial_context, trial_score_named
from nas_kd.nas.picks import enqueue_start_points
from nas_kd.nas.records import (
    stored_blockwise_scores,
    training_done,
    trial_score,
    was_trained,
)
from nas_kd.nas.start import start_points
from nas_kd.nas.study import (
    COMPRESSION_TEACHER_KEY,
    PRUNERS,
    SAMPLERS,
    STUDY_ATTR,
    WINNER_ATTR,
    check_same_teachers,
    check_study_name,
    check_url,
    default_study_name,
    guarded,
    open_storage,
    open_study,
    shares_its_study,
    space_id,
    storage_url,
    study_training,
    update_study_attr,
)
from nas_kd.nas.study import run as run_trials
from nas_kd.nets.space import describe, load_space
from nas_kd.nets.zoo import TEACHERS
from nas_kd.pipeline.plan import (
    Clock,
    check_time_budget,
    plan_retrain,
    plan_search,
    record_split,
    refuse_too_small,
    retrain_end,
)
from nas_kd.reporting.html import write_report
from nas_kd.reporting.summary import summary_table, trial_line
from nas_kd.retraining.baselines import check_prunable, pruned_baseline
from nas_kd.retraining.retrain import finish_retrain
from nas_kd.teaching.ensemble import (
    CachedTargets,
    check_weighting,
    ensemble_from_config,
    ensemble_summary,
    teacher_names,
)
from nas_kd.training.train import resolve_device

PARETO_COSTS = ("macs", "latency_ms")  # the Cost fields --objective pareto can minimise


def validate(cfg: SearchConfig) -> SearchConfig:
    if all(getattr(cfg, k) is None for k in ("flops_budget", "params_budget", "latency_budget_ms", "memory_budget")):
        raise InputError("give a budget: --flops-budget (MACs, e.g. 50M), --params-budget (e.g. 500K), "
                         "--latency-budget (e.g. 2ms) and/or --memory-budget (e.g. 256K)")
    if cfg.study_name is not None:
        check_study_name(cfg.study_name)
    trial_score_named(cfg.trial_score)
    check_time_budget(cfg)
    if cfg.sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {cfg.sampler!r}; known: {', '.join(SAMPLERS)}")
    if cfg.pruner not in PRUNERS:
        raise InputError(f"unknown pruner {cfg.pruner!r}; known: {', '.join(PRUNERS)}")
    if cfg.bn_recalibration < 0 or cfg.trial_reports < 1:
        raise InputError(f"bn_recalibration must be >= 0 and trial_reports >= 1, got {cfg.bn_recalibration} "
                         f"and {cfg.trial_reports}")
    if cfg.objective not in ("accuracy", "pareto"):
        raise InputError(f"objective must be 'accuracy' or 'pareto', got {cfg.objective!r}")
    if cfg.pareto_cost not in PARETO_COSTS:
        raise InputError(f"unknown pareto cost {cfg.pareto_cost!r}; known: {', '.join(PARETO_COSTS)}")
    check_precision(cfg.latency_precision)
    check_target(cfg.int8_target)
    if cfg.latency_threads < 1:
        raise InputError(f"latency_threads must be >= 1, got {cfg.latency_threads}")
    for key in ("latency_budget_ms", "memory_budget"):
        value = getattr(cfg, key)
        if value is not None and not value > 0:
            raise InputError(f"{key} must be positive, got {value!r}")
    if cfg.onnx or cfg.latency_budget_ms is not None or cfg.pareto_cost == "latency_ms" or cfg.latency_table:
        require_runtime()
    resolve_device(cfg.device)
    names = teacher_names(cfg)
    if not names:
        raise InputError("no teachers: pass --teachers, e.g. --teachers resnet20")
    for name in names:
        if name not in TEACHERS:
            raise InputError(f"unknown teacher {name!r}; known: {', '.join(TEACHERS)}")
    if len(set(cfg.teachers)) != len(cfg.teachers):
        raise InputError(f"--teachers lists a teacher twice: {','.join(cfg.teachers)}")
    for name, _ in cfg.distill.losses:
        loss_class(name)
    Criterion(cfg.distill.weights(), [8], [[8]], cfg.distill.temperature)  # weights and temperature
    check_two_stage(cfg.distill)
    check_weighting(cfg.distill.ensemble_weighting)
    if cfg.heartbeat < 1 or (cfg.study_trials is not None and cfg.study_trials < 1):
        raise InputError(f"heartbeat must be >= 1 s and study_trials >= 1, got {cfg.heartbeat} and {cfg.study_trials}")
    if cfg.finalists < 1:
        raise InputError(f"finalists must be >= 1, got {cfg.finalists}")
    if cfg.finalists > 1 and cfg.retrain_trial is not None:
        raise InputError(f"--retrain-trial picks one trial and --finalists {cfg.finalists} the best "
                         f"{cfg.finalists}; give one of them")
    if not 0 <= cfg.budget_floor < 1:
        raise InputError(f"budget_floor must be a share in [0, 1), got {cfg.budget_floor}")
    if cfg.budget_edge not in ("on", "off"):
        raise InputError(f"budget_edge must be 'on' or 'off', got {cfg.budget_edge!r}")
    if cfg.budget_floor and cfg.budget_edge == "on":
        raise InputError(f"--budget-floor {cfg.budget_floor:g} applies only with --budget-edge off: at the budget's "
                         "edge every trial already uses 95% of the budget; drop it, or add --budget-edge off")
    if cfg.min_steps < 0 or not 0 <= cfg.teacher_min_gain < 1:
        raise InputError(f"min_steps must be >= 0 and teacher_min_gain in [0, 1), got {cfg.min_steps} and "
                         f"{cfg.teacher_min_gain}")
    for key in ("trial_epochs", "teacher_epochs", "ensemble_views"):
        if getattr(cfg, key) < 1:
            raise InputError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.train.batch_size < 1 or cfg.train.lr <= 0:
        raise InputError(f"batch size and learning rate must be positive, got {cfg.train.batch_size}, {cfg.train.lr}")
    retrain_augments(cfg, cfg.final_epochs)  # a bad final_augment from YAML is named here
    return cfg


def trial_text(cfg: SearchConfig, images: int) -> str:
    """One line: how this search's trials are scored (and pruned)."""
    kind = trial_score_named(cfg.trial_score)
    if not kind.trains:
        return f"trial score {cfg.trial_score}: computed from the untrained spec, nothing trained; no pruning"
    schedule = f"{cfg.trial_epochs} epoch{'s' if cfg.trial_epochs > 1 else ''} x {images} images"
    recal = (f"BatchNorm recalibrated on {cfg.bn_recalibration} batches before validation" if cfg.bn_recalibration
             else "no BatchNorm recalibration")
    if kind.blockwise:
        return f"trial score {cfg.trial_score}: {schedule} per stage; no pruning"
    pruner = "none (--objective pareto cannot prune)" if cfg.objective == "pareto" else cfg.pruner
    return (f"trial score {cfg.trial_score}: {schedule}, {recal}, {cfg.trial_reports} validation passes; "
            f"pruner {pruner}")


def search(cfg: SearchConfig, progress: bool = True) -> optuna.Study:
    """The whole job; returns the study. Bad settings raise `InputError` before any work. With a
    time budget, the trial and epoch lines say the time elapsed of it (on a terminal, a bar)."""
    clock = Clock()
    with TimeBudget(cfg.time_budget, clock.start, progress):
        return run_search(cfg, progress, clock)


def run_search(cfg: SearchConfig, progress: bool, clock: Clock) -> optuna.Study:
    validate(cfg)
    # every check of the user's input comes before the first progress line and any training
    space = load_space(cfg.search_space)
    budget = Budget.from_config(cfg)
    if cfg.storage:
        check_url(cfg.storage)
    dataset = load_dataset(cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None)
    (min_macs_spec, min_macs), (min_params_spec, min_params) = space.smallest(dataset.input_shape, dataset.num_classes)
    if (budget.macs is not None and min_macs.macs > budget.macs) or (budget.params is not None and min_params.params > budget.params):
        raise InputError(f"no student of search space {space.name!r} fits {budget}: the smallest reach "
                         f"{format_count(min_macs.macs)} MACs ({min_macs_spec}) and {format_count(min_params.params)} "
                         f"params at input {'x'.join(map(str, dataset.input_shape))}; raise the budget or use another space")
    cfg, schedule_text = adapt_schedule(cfg, len(dataset.train))
    latency, latency_text = latency_meter(cfg, space, dataset.input_shape, dataset.num_classes)
    check_reachable(cfg, space, dataset.input_shape, dataset.num_classes, [min_macs_spec, min_params_spec], latency)
    floor, floor_text = effective_floor(cfg.budget_floor, budget, space, dataset.input_shape, dataset.num_classes)
    starts, starts_skipped = start_points(cfg.start_from, space, budget, dataset.input_shape, dataset.num_classes,
                                          floor, latency if cfg.latency_table else None,
                                          None if cfg.latency_table else latency)
    if cfg.pruned_baseline:
        check_prunable(cfg, dataset.input_shape, dataset.num_classes, latency)
    refuse_too_small(cfg, space, budget, dataset, clock)
    device = resolve_device(cfg.device)
    log(f"dataset {dataset.name}: {len(dataset.train)} train / {len(dataset.val)} val / {len(dataset.test)} test "
        f"images of {'x'.join(map(str, dataset.input_shape))}, {dataset.num_classes} classes; device {device}")
    dataset = dataset.to(device)
    log(f"search space {describe(space)}; budget {budget}")
    log(schedule_text)
    if cfg.final_epochs > 0 and not cfg.worker:
        log(f"retrain: {'planned by the time budget' if cfg.time_budget is not None else f'{cfg.final_epochs} epochs'}"
            f", recipe {cfg.distill.describe()}, {retrain_recipe_text(cfg, cfg.final_epochs)}")
    log(latency_text)
    if floor_text:
        log(floor_text)
    if (warning := budget_warning(budget, teacher_names(cfg), dataset.input_shape, dataset.num_classes)):
        log(warning)

    keys = guarded(cfg, space_id(space), space.fingerprint())
    name = cfg.study_name or default_study_name(keys)
    url = storage_url(cfg.storage, name, Path(cfg.out_dir))
    study = open_study(open_storage(url, interval=cfg.heartbeat), name, cfg.objective == "pareto", cfg.seed, keys, cfg.pruner,
                       cfg.trial_reports, cfg.sampler, shared=shares_its_study(cfg))
    if cfg.objective == "pareto" and cfg.pruner != "none":
        log("--objective pareto: trials are not pruned (Optuna cannot prune multi-objective studies); "
            "every trial trains to its end")
    log(f"study {name} in {url} ({len(study.trials)} trials already)")
    for line in starts_skipped:
        log(line)

    ensemble = ensemble_from_config(cfg, dataset, progress, log)
    check_same_teachers(study, ensemble_summary(ensemble))
    ensemble_val = ensemble.accuracy(dataset.val, dataset)
    compression_teacher = ensemble.largest_member()
    update_study_attr(study, STUDY_ATTR, {
        "config": cfg.to_dict(), "space": space.name,
        "budget": {"macs": budget.macs, "params": budget.params, "latency_ms": budget.latency_ms, "memory": budget.memory},
        "budget_text": str(budget), "budget_floor": floor, "teachers": ensemble_summary(ensemble), "ensemble": {"val_acc": ensemble_val},
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
        whole = cfg.final_epochs > 0 and not cfg.worker and not retrain_augments(cfg, cfg.final_epochs) and CachedTargets.fits(
            ensemble, dataset.input_shape, len(dataset.train), views, features, cfg.target_cache_gb)
        cover = BatchIterator(dataset.train, dataset, cfg.train.batch_size, cfg.seed, views=views,
                              augment=cfg.train.augment, indices=None if whole else subset)
        targets = CachedTargets(ensemble, cover, features, progress=progress)
        log(f"cached ensemble targets for {len(cover.indices)} images x {views} views "
            f"({targets.nbytes() / 1e6:.0f} MB){' (trials and retrain)' if whole else ''}")
    ctx = trial_context(space, dataset, ensemble, budget, batches, targets, cfg, progress, scorer, latency, floor)
    log(trial_text(cfg, len(subset)))
    time_plan = None
    if cfg.time_budget is not None:
        cfg, time_plan = plan_search(cfg, study, space, budget, dataset, ensemble, batches, targets, clock)
        log(time_plan.line(cfg.trials))
    marks = {"setup": clock.elapsed()}

    # the bar counts trials' worth of training, as --trials does: a pruned trial its share
    bar = tqdm(total=cfg.trials, desc="trials", unit="trial", disable=not progress or None, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.2f}/{total} [{elapsed}<{remaining}{postfix}]")
    pruned = []

    lines = not bars_shown(progress)  # no bars (--quiet, or stderr is a log file): a line per trial

    def on_trial(trial: optuna.trial.FrozenTrial) -> None:
        if lines:
            log(trial_line(trial) + budget_status())
        if was_trained(trial):
            bar.update(training_done(trial))
            if trial.state == optuna.trial.TrialState.PRUNED:
                pruned.append(training_done(trial))
            bar.set_postfix_str(f"#{trial.number} score {trial_score(trial):.4f} "
                                f"{format_count(trial.user_attrs['macs'])} MACs")

    out = Path(cfg.out_dir) / name
    # the start points go in only now, when this run trains (a run refused above, or one with
    # nothing to train, leaves the study as it was)
    if cfg.trials > 0 if cfg.study_trials is None else study_training(study) < cfg.study_trials:
        for line in enqueue_start_points(study, starts):
            log(line)
    try:
        trained = run_trials(study, lambda trial: run_trial(ctx, trial), cfg.trials, cfg.timeout, on_trial,
                      study_target=cfg.study_trials)
    finally:
        bar.close()
        if not cfg.worker:  # workers leave the report to the one retrain after them
            write_report(study, out)
    done = f" ({len(pruned)} pruned, {trained - len(pruned) + sum(pruned):.2f} trials' worth of training)" if pruned else ""
    if cfg.worker:
        log(f"{trained} trials trained by this worker{done}; the study holds "
            f"{study_training(study):.2f} trials' worth. When every worker is done, run once: "
            f"python -m nas_kd.retrain --study-name {name} --storage '{url}'")
    else:
        log(f"{trained} trials trained in this run{done}; report {out / 'report.html'}")
        if cfg.final_epochs == 0:
            finalists = f" its {cfg.finalists} best trials" if cfg.finalists > 1 else " its winner"
            log(f"--final-epochs 0: nothing retrained; to retrain{finalists}: python -m nas_kd.retrain "
                f"--study-name {name} --storage '{url}'")
    marks["search"] = clock.elapsed()
    if time_plan is not None and cfg.final_epochs > 0 and not cfg.worker:
        cfg, line = plan_retrain(cfg, study, dataset, ensemble, batches, targets, clock)
        log(line)
    if cfg.final_epochs > 0 and not cfg.worker:
        started = clock.elapsed()
        end = retrain_end(cfg, started) if time_plan is not None else None
        retrained = finish_retrain(study, dataset, ensemble, cfg, progress, log, targets, end)
        cfg = replace(cfg, final_epochs=retrained["final_epochs"])  # as trained, re-planned or not
        # the retrain ends where its test pass ends; the export and the report come after
        marks["retrain"] = min(clock.elapsed(), started + retrained["retrain_seconds"])
        if cfg.pruned_baseline:
            pruned_baseline(study, dataset, ensemble, cfg, out, progress, log, targets, latency)
            write_report(study, out)
    if time_plan is not None:
        marks["end"] = clock.elapsed()
        log(record_split(study, time_plan, marks, trained, cfg.final_epochs))
    print(f"\nnas_kd search finished\n{summary_table(study, cfg, url, clock.elapsed())}")
    return study


@dataclass(frozen=True)
class RunResult:
    """What `run` returns, read back from what the run stored in its study. Every field but
    `study` is None when the run retrained nothing (`final_epochs` 0, or a worker)."""

    study: optuna.Study
    winner: FrozenTrial | None  # the winner's trial: its search figures (spec, cost, trial score)
    spec: str | None  # the winner's architecture string (`arch.Spec.parse` rebuilds it)
    test_acc: float | None  # after the retrain: the one look at the test set
    val_acc: float | None  # after the retrain
    macs: int | None
    params: int | None
    folder: Path | None  # OUT_DIR/<study>/winner: model.safetensors, the ONNX models, metrics.json

    @classmethod
    def of(cls, study: optuna.Study) -> RunResult:
        stored = study.user_attrs.get(WINNER_ATTR)
        if stored is None:
            return cls(study, None, None, None, None, None, None, None)
        trial = next(t for t in study.get_trials(deepcopy=False) if t.number == stored["trial"])
        return cls(study, trial, stored["spec"], stored["test_acc"], stored["val_acc"], stored["macs"],
                   stored["params"], Path(stored["weights"]).parent)


def run(cfg: SearchConfig, progress: bool = False) -> RunResult:
    """`search`, returning the study and its retrained winner (`nas_kd.run` documents it)."""
    return RunResult.of(search(cfg, progress))
