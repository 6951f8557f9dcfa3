"""The whole run, in its phases: `prepare` (every check of the settings, the data, the search space,
the budget), `open_run` (the study, and this command's run in it), `teach` (the teachers and their
cached targets), `search_trials` (the time plan and the trials, then the report), `final_retrain`
(the winner retrained, tested and exported, and the baselines asked for), then the summary.

`search` is what `python -m nas_kd.search` runs; `run` is the same job as a Python API, returning
the study and its retrained winner (`RunResult`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial
from tqdm.auto import tqdm

from nas_kd.core.config import SearchConfig
from nas_kd.core.progress import RunClock, bars_shown, budget_status, log
from nas_kd.core.units import format_count, format_duration
from nas_kd.nas.objective import run_trial
from nas_kd.nas.picks import enqueue_start_points
from nas_kd.nas.records import training_done, trial_score, was_trained
from nas_kd.nas.study import WINNER_ATTR, study_training
from nas_kd.nas.study import run as run_trials
from nas_kd.pipeline.checks import trial_text
from nas_kd.pipeline.phases import Opened, Prepared, Taught, open_run, prepare, teach
from nas_kd.pipeline.plan import Plan, plan_retrain, plan_search, record_split, retrain_end, stored_plan
from nas_kd.pipeline.resume import Interrupted, Session, session_text
from nas_kd.reporting.html import write_report
from nas_kd.reporting.summary import summary_table, trial_line
from nas_kd.retraining.baselines import pruned_baseline
from nas_kd.retraining.retrain import finish_retrain


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
    """`search`'s phases in order, each handed what the one before made; `session` is told the run,
    study and outputs as soon as they are known, so that an interrupted run can store how far it got
    (`resume.Session`)."""
    session = Session() if session is None else session
    prep = prepare(cfg, clock)
    opened = open_run(prep, clock, session)
    if opened.how == "finished":
        run = opened.run
        log(f"this command's run in study {opened.name} is done ({run.asked}, {run.progress(opened.study)}, "
            f"retrained); nothing is left to do. --more starts a new run in the study")
        print(f"\nnas_kd search finished\n{summary_table(opened.study, prep.cfg.out_dir, opened.url, run.elapsed)}")
        return opened.study
    for line in prep.starts_skipped:
        log(line)
    taught = teach(prep, opened, progress)
    cfg, time_plan, trained, marks = search_trials(prep, opened, taught, clock, progress)
    if cfg.final_epochs > 0 and not cfg.worker:
        cfg = final_retrain(cfg, prep, opened, taught, clock, progress, marks, time_plan is not None)
    run = opened.run
    if time_plan is not None:
        marks["end"] = clock.elapsed()
        log(record_split(opened.study, time_plan, marks, trained, cfg.final_epochs))
    if run is not None:
        run.elapsed = clock.elapsed()
        run.done(opened.study, opened.out)
    resumed = f" ({session_text(run)})" if run is not None and run.sessions > 1 else ""
    print(f"\nnas_kd search finished{resumed}\n{summary_table(opened.study, cfg.out_dir, opened.url, clock.elapsed())}")
    return opened.study


def search_trials(prep: Prepared, opened: Opened, taught: Taught, clock: RunClock,
                  progress: bool) -> tuple[SearchConfig, Plan | None, int, dict[str, float]]:
    """The trials: the time plan (a time budget's trials and epochs), the run's target, the start points,
    then Optuna's loop and the report. Returns the config as planned, the plan, the trials trained (over
    every session of the run) and the clock's marks of the setup and the search."""
    cfg, study, run = taught.cfg, opened.study, opened.run
    log(trial_text(cfg, len(taught.subset)))
    time_plan = None
    searching = run is None or run.phase == "search"
    if cfg.time_budget is not None and searching:
        cfg, time_plan = plan_search(cfg, study, prep.space, prep.budget, prep.dataset, taught.ensemble,
                                     taught.batches, taught.targets, clock)
        log(time_plan.line(cfg.trials) + (f" (what was left of it: {format_duration(run.elapsed)} were spent before)"
                                          if opened.how == "resumed" else ""))
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
        for line in enqueue_start_points(study, prep.starts):
            log(line)
    try:
        trained = run_trials(study, lambda trial: run_trial(taught.trials, trial), cfg.trials, cfg.timeout, on_trial,
                             study_target=target)
    finally:
        bar.close()
        if not cfg.worker:  # workers leave the report to the one retrain after them
            write_report(study, opened.out)
    done = f" ({len(pruned)} pruned, {trained - len(pruned) + sum(pruned):.2f} trials' worth of training)" if pruned else ""
    if cfg.worker:
        log(f"{trained} trials trained by this worker{done}; the study holds "
            f"{study_training(study):.2f} trials' worth. When every worker is done, run once: "
            f"python -m nas_kd.retrain --study-name {opened.name} --storage '{opened.url}'")
    else:
        log(f"{trained} trials trained in this run{done}; report {opened.out / 'report.html'}")
        if cfg.final_epochs == 0:
            finalists = f" its {cfg.finalists} best trials" if cfg.finalists > 1 else " its winner"
            log(f"--final-epochs 0: nothing retrained; to retrain{finalists}: python -m nas_kd.retrain "
                f"--study-name {opened.name} --storage '{opened.url}'")
    marks["search"] = clock.elapsed()
    if run is not None:
        run.phase, run.elapsed = ("retrain" if cfg.final_epochs > 0 else "done"), clock.elapsed()
        run.save(study)
        trained = max(trained, round(run.trained(study)))  # over every session of the run
    return cfg, time_plan, trained, marks


def final_retrain(cfg: SearchConfig, prep: Prepared, opened: Opened, taught: Taught, clock: RunClock, progress: bool,
                  marks: dict[str, float], planned: bool) -> SearchConfig:
    """The winner (or the finalists) retrained, tested and exported, and the pruned baseline when asked;
    under a time budget (`planned`) the epochs come from what is left of it. Returns the config with the
    epochs as trained; `marks` gets the retrain's end."""
    study, dataset, ensemble, run = opened.study, prep.dataset, taught.ensemble, opened.run
    if planned:
        cfg, line = plan_retrain(cfg, study, dataset, ensemble, taught.batches, taught.targets, clock)
        log(line)
    started = clock.elapsed()
    end = retrain_end(cfg, started) if planned else None
    retrained = finish_retrain(study, dataset, ensemble, cfg, progress, log, taught.targets, end,
                               None if run is None else run.checkpoints(opened.out))
    cfg = replace(cfg, final_epochs=retrained["final_epochs"])  # as trained, re-planned or not
    # the retrain ends where its test pass ends; the export and the report come after
    marks["retrain"] = min(clock.elapsed(), started + retrained["retrain_seconds"])
    if cfg.pruned_baseline:
        pruned_baseline(study, dataset, ensemble, cfg, prep.budget, opened.out, progress, log, taught.targets,
                        prep.latency)
        write_report(study, opened.out)
    return cfg


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
