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
from nas_kd.core.progress import RunClock, bars_shown, budget_status, log
from nas_kd.core.units import format_count, format_duration
from nas_kd.data.batches import BatchIterator, seeded_subset
from nas_kd.data.datasets import load_dataset
from nas_kd.device.latency import latency_meter
from nas_kd.distill.blockwise import BlockwiseScorer, most_accurate
from nas_kd.distill.losses import logits_only, recipe_features, recipe_uses_teachers
from nas_kd.distill.student import retrain_augments, retrain_recipe_text
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
    STUDY_ATTR,
    WINNER_ATTR,
    check_same_teachers,
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
from nas_kd.pipeline.checks import trial_text, validate
from nas_kd.pipeline.plan import (
    plan_retrain,
    plan_search,
    record_split,
    refuse_too_small,
    retrain_end,
    stored_plan,
)
from nas_kd.pipeline.resume import Interrupted, Session, begin, session_text
from nas_kd.reporting.html import write_report
from nas_kd.reporting.summary import summary_table, trial_line
from nas_kd.retraining.baselines import check_prunable, pruned_baseline
from nas_kd.retraining.retrain import finish_retrain
from nas_kd.teaching.ensemble import (
    CachedTargets,
    ensemble_from_config,
    ensemble_summary,
    file_teachers,
    teacher_names,
)
from nas_kd.teaching.stored import stored_targets
from nas_kd.training.train import resolve_device


def search(cfg: SearchConfig, progress: bool = True) -> optuna.Study:
    """The whole job; returns the study. Bad settings raise `InputError` before any work. With a
    time budget, the trial and epoch lines say the time elapsed of it (on a terminal, a bar)."""
    session = Session()
    with RunClock(cfg.time_budget, progress=progress) as clock:
        try:
            return run_search(cfg, progress, clock, session)
        except Interrupted:
            raise
        except KeyboardInterrupt:
            raise session.interrupted(clock.elapsed()) from None


def run_search(cfg: SearchConfig, progress: bool, clock: RunClock, session: Session | None = None) -> optuna.Study:
    """`search`'s phases in order; `session` is told the run, study and outputs as soon as they are known,
    so that an interrupted run can store how far it got (`resume.Session`)."""
    session = Session() if session is None else session
    asked = cfg  # the command's settings, before the schedule and the plan adapt them
    validate(cfg)
    # every check of the user's input comes before the first progress line and any training
    space = load_space(cfg.search_space)
    budget = Budget.from_config(cfg)
    if cfg.storage:
        check_url(cfg.storage)
    dataset = load_dataset(cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None)
    cfg, schedule_text = adapt_schedule(cfg, len(dataset.train))
    latency, latency_text = latency_meter(cfg, space, dataset.input_shape, dataset.num_classes)
    check_reachable(budget, space, dataset.input_shape, dataset.num_classes, latency, cfg.seed,
                    bool(cfg.latency_table), cfg.latency_precision)
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
    files = file_teachers(cfg, dataset)  # each checked before the study is opened: a bad file writes nothing
    log(f"search space {describe(space)}; budget {budget}")
    log(schedule_text)
    if cfg.final_epochs > 0 and not cfg.worker:
        log(f"retrain: {'planned by the time budget' if cfg.time_budget is not None else f'{cfg.final_epochs} epochs'}"
            f", recipe {cfg.distill.describe()}, {retrain_recipe_text(cfg, cfg.final_epochs)}")
    log(latency_text)
    if floor_text:
        log(floor_text)
    if (warning := budget_warning(budget, teacher_names(cfg), dataset.input_shape, dataset.num_classes,
                                  {t.name: t.cost for t in files})):
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
    out = Path(cfg.out_dir) / name
    run, how = (None, "new") if cfg.worker else begin(study, asked)
    if run is not None and how == "finished":
        log(f"this command's run in study {name} is done ({run.asked}, {run.progress(study)}, retrained); nothing "
            f"is left to do. --more starts a new run in the study")
        print(f"\nnas_kd search finished\n{summary_table(study, cfg, url, run.elapsed)}")
        return study
    if run is not None and how == "resumed":
        clock.resume(run.elapsed)
        log(f"resuming this command's run ({run.asked}): {run.progress(study)}, {format_duration(run.elapsed)} "
            f"spent in {run.sessions - 1} earlier session{'s' if run.sessions > 2 else ''}; "
            + ("the search is done, the retrain goes on" if run.phase == "retrain" else "the search goes on"))
    elif run is not None and cfg.more:
        log(f"--more: a new run in study {name}, after the one it holds")
    if run is not None:  # stored once its search is planned, or when it is interrupted before
        session.run, session.study, session.out = run, study, out
    for line in starts_skipped:
        log(line)

    ensemble = ensemble_from_config(cfg, dataset, progress, log, files)
    cfg, recipe_line = logits_only(cfg, ensemble)
    if recipe_line:
        log(recipe_line)
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
        targets, kept = stored_targets(ensemble, dataset, cover, features, cfg.cache_path() / "targets", log, progress,
                                      cfg.target_cache_gb)
        log(f"cached ensemble targets for {len(cover.indices)} images x {views} views "
            f"({targets.nbytes() / 1e6:.0f} MB){' (trials and retrain)' if whole else ''}: {kept}")
    ctx = trial_context(space, dataset, ensemble, budget, batches, targets, cfg, progress, scorer, latency, floor)
    log(trial_text(cfg, len(subset)))
    time_plan = None
    searching = run is None or run.phase == "search"
    if cfg.time_budget is not None and searching:
        cfg, time_plan = plan_search(cfg, study, space, budget, dataset, ensemble, batches, targets, clock)
        log(time_plan.line(cfg.trials) + (f" (what was left of it: {format_duration(run.elapsed)} were spent before)"
                                          if how == "resumed" else ""))
    elif cfg.time_budget is not None:
        time_plan = stored_plan(study)
    if run is not None and (run.target is None or run.planned) and searching:
        # a count's run ends at the study's trials when it began plus the count, however many sessions it
        # takes; a time budget's trials are re-planned in each session from the time left
        run.target = (float(cfg.study_trials) if cfg.study_trials is not None else
                      (study_training(study) if run.planned else run.trials_before) + cfg.trials)
        run.save(study)
    target = cfg.study_trials if run is None else run.target
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

    # the start points go in only now, when this run trains (a run refused above, or one with
    # nothing to train, leaves the study as it was)
    if cfg.trials > 0 if target is None else study_training(study) < target:
        for line in enqueue_start_points(study, starts):
            log(line)
    try:
        trained = run_trials(study, lambda trial: run_trial(ctx, trial), cfg.trials, cfg.timeout, on_trial,
                             study_target=target)
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
    if run is not None:
        run.phase, run.elapsed = ("retrain" if cfg.final_epochs > 0 else "done"), clock.elapsed()
        run.save(study)
        trained = max(trained, round(run.trained(study)))  # over every session of the run
    if time_plan is not None and cfg.final_epochs > 0 and not cfg.worker:
        cfg, line = plan_retrain(cfg, study, dataset, ensemble, batches, targets, clock)
        log(line)
    if cfg.final_epochs > 0 and not cfg.worker:
        started = clock.elapsed()
        end = retrain_end(cfg, started) if time_plan is not None else None
        retrained = finish_retrain(study, dataset, ensemble, cfg, progress, log, targets, end,
                                   None if run is None else run.checkpoints(out))
        cfg = replace(cfg, final_epochs=retrained["final_epochs"])  # as trained, re-planned or not
        # the retrain ends where its test pass ends; the export and the report come after
        marks["retrain"] = min(clock.elapsed(), started + retrained["retrain_seconds"])
        if cfg.pruned_baseline:
            pruned_baseline(study, dataset, ensemble, cfg, out, progress, log, targets, latency)
            write_report(study, out)
    if time_plan is not None:
        marks["end"] = clock.elapsed()
        log(record_split(study, time_plan, marks, trained, cfg.final_epochs))
    if run is not None:
        run.elapsed = clock.elapsed()
        run.done(study, out)
    resumed = f" ({session_text(run)})" if run is not None and run.sessions > 1 else ""
    print(f"\nnas_kd search finished{resumed}\n{summary_table(study, cfg, url, clock.elapsed())}")
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
