"""A run that resumes where it stopped: what the command asked for and how much of it is done,
stored in its study, so that the same command after an interruption does only what is left.

A run is one command's settings (`run_id`: the whole config but `more`). Its record says how many
trials' worth of training the study held when it began, how many it must hold when its search is
done, its phase (search, retrain, done), the seconds it has taken in all its sessions (a time
budget goes on from there), and how many sessions it took. The same command on an unfinished run
finishes it; on a finished one it does nothing and says so; other settings on an unfinished run
are refused, unless `--more` says to leave it and start a new run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import optuna

from nas_kd.core.config import SearchConfig
from nas_kd.core.errors import InputError
from nas_kd.core.units import format_duration
from nas_kd.nas.study import study_training, update_study_attr
from nas_kd.training.train import Checkpoint

RUN_ATTR = "run"  # study user attribute: the record of the last run a command made in it
PHASES = ("search", "retrain", "done")
FREE_KEYS = ("more",)  # settings that say how to start a run, not what it is
# settings added after runs were first recorded: left out at their defaults, so that an unfinished
# run of before them keeps its id (the study's own guard says whether its trials still match)
LATER_KEYS = ("edge_depth",)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run, once its progress is stored: `next` says what the same command does next."""

    def __init__(self, next_step: str):
        super().__init__(next_step)
        self.next = next_step


def run_id(cfg: SearchConfig) -> str:
    """The settings of one command, as a short id: the same command gives the same id."""
    settings = {k: v for k, v in cfg.to_dict().items()
                if k not in FREE_KEYS and not (k in LATER_KEYS and v == getattr(SearchConfig, k))}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def planned(cfg: SearchConfig) -> bool:
    """Whether the run's trials come from its time budget (re-planned in each session from the time
    left) rather than from a count."""
    return cfg.time_budget is not None and "trials" not in cfg.time_fixed and cfg.study_trials is None


def asked(cfg: SearchConfig) -> str:
    """What the command asked for, in its flags' words."""
    count = f"--study-trials {cfg.study_trials}" if cfg.study_trials is not None else f"--trials {cfg.trials}"
    if cfg.time_budget is None:
        return count
    return f"--time-budget {format_duration(cfg.time_budget)}" + ("" if planned(cfg) else f", {count}")


@dataclass
class Run:
    id: str
    asked: str  # what the command asked for ("--trials 6", "--time-budget 30m")
    trials_before: float  # the study's trials' worth when the run began
    target: float | None = None  # ... and when its search is done (None: not planned yet)
    planned: bool = False  # its trials come from its time budget, re-planned in each session (`planned`)
    phase: str = "search"
    elapsed: float = 0.0  # seconds over all its sessions
    sessions: int = 1

    def trained(self, study: optuna.Study) -> float:
        """Trials' worth this run trained, over its sessions."""
        return max(0.0, study_training(study) - self.trials_before)

    def save(self, study: optuna.Study) -> None:
        update_study_attr(study, RUN_ATTR, dataclasses.asdict(self))

    def checkpoints(self, out: Path) -> Path:
        """The folder of this run's retrain checkpoints, beside the study's outputs."""
        return out / "checkpoints" / self.id

    def done(self, study: optuna.Study, out: Path) -> None:
        self.phase = "done"
        self.save(study)
        folder = self.checkpoints(out)  # its checkpoints go; a damaged one moved into broken/ stays
        for file in folder.glob("*.pt"):
            file.unlink()
        for empty in (folder, folder.parent):
            if empty.is_dir() and not any(empty.iterdir()):
                empty.rmdir()

    def progress(self, study: optuna.Study) -> str:
        """How far the run got: '4.00 of 6 trials' worth trained'."""
        if self.target is None:
            return f"{self.trained(study):.2f} trials' worth trained"
        return f"{self.trained(study):.2f} of {self.target - self.trials_before:.0f} trials' worth trained"


def read_run(study: optuna.Study) -> Run | None:
    stored = study.user_attrs.get(RUN_ATTR)
    if not isinstance(stored, dict):
        return None
    try:
        run = Run(**stored)
    except TypeError:
        return None  # a record of another version: treated as no record
    return run if run.phase in PHASES else None


def begin(study: optuna.Study, cfg: SearchConfig) -> tuple[Run, str]:
    """The run this command makes or finishes in `study`, and how: "new", "resumed" or "finished"
    (nothing left to do). Refuses, before anything is written, other settings on an unfinished run
    (unless `cfg.more`) and `--more` on a study that holds no run."""
    stored, rid = read_run(study), run_id(cfg)
    if cfg.more and stored is None:
        raise InputError(f"--more adds a run to study {study.study_name!r}, which holds none yet; drop --more")
    if stored is not None and not cfg.more:
        if stored.id == rid and stored.phase != "done":
            stored.sessions += 1
            return stored, "resumed"
        if stored.id == rid:
            return stored, "finished"
        if stored.phase != "done":
            raise InputError(f"study {study.study_name!r} holds an unfinished run of other settings ({stored.asked}, "
                             f"{stored.progress(study)}, {stored.phase} left); run that command again to finish it, "
                             "add --more to leave it and start this one, or give another --study-name")
    return Run(rid, asked(cfg), study_training(study), planned=planned(cfg)), "new"


def next_step(run: Run, study: optuna.Study, checkpoints: Path) -> str:
    """What the same command does when it is run again: the line an interrupted run ends with."""
    if run.phase == "search":
        if run.planned:
            what = f"searches on ({run.progress(study)}) in what is left of its time budget"
        elif run.target is None:
            what = "starts its search again"
        else:
            left = max(0.0, run.target - study_training(study))
            what = f"trains the {left:.2f} trials' worth left ({run.progress(study)})"
        return f"every finished trial is in the storage; the same command {what}, then retrains"
    if run.phase == "retrain":
        files = sorted((f for f in checkpoints.glob("trial-*.pt") if not f.stem.endswith("-align")),
                       key=lambda f: f.stat().st_mtime)
        state = Checkpoint(files[-1]).load() if files else None
        where = (f"at epoch {state['epoch'] + 2} of {state.get('epochs', '?')} (trial {files[-1].stem[6:]})"
                 if state else "from its start")
        return f"the search is done; the same command resumes the retrain {where}"
    return "the run is done; the same command has nothing left to do"


@dataclass
class Session:
    """What an interrupted session must store: its run, its study and where its outputs go."""

    run: Run | None = None
    study: optuna.Study | None = None
    out: Path | None = None

    def interrupted(self, elapsed: float) -> KeyboardInterrupt:
        """Store the run's progress (`elapsed` seconds in all) and say what the same command does next."""
        if self.run is None or self.study is None or self.out is None:
            return KeyboardInterrupt()
        self.run.elapsed = elapsed
        self.run.save(self.study)
        try:
            return Interrupted(next_step(self.run, self.study, self.run.checkpoints(self.out)))
        except InputError:
            return Interrupted("the same command resumes the run")


def session_text(run: Run) -> str:
    """The summary's word on a run that took more than one session."""
    return f"resumed: {run.sessions} sessions, {format_duration(run.elapsed)} in all" if run.sessions > 1 else ""
