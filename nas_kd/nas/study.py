"""The Optuna study: its identity (the settings its trials depend on, its name), storage, sampler,
pruner, resume, and running until N trials are trained."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from nas_kd.core.config import SearchConfig
from nas_kd.core.errors import InputError
from nas_kd.nas.edge import MIN_WIDTH_RULE
from nas_kd.nas.records import (
    FAIL_ATTR,
    REPEAT_ATTR,
    training_done,
    was_trained,
)
from nas_kd.nets.space import SHIPPED, SearchSpace

STUDY_ATTR = "nas_kd"  # study user attribute: what the study was created with, teachers, compression teacher
WINNER_ATTR = "winner"  # study user attribute: the retrained winner's final numbers
AT_BUDGET_ATTR = "winners_at_budgets"  # study user attribute: budget tag -> a retrain at that budget (picks.budget_tag)
BASELINE_ATTR = "pruned_baseline"  # study user attribute: the pruned-teacher baselines' final numbers
ONLINE_ATTR = "online_ensemble"  # study user attribute: the online ensemble of students' final numbers
MAX_FAILURES_IN_A_ROW = 5  # failed trials in a row after which a search stops (`run`)
# in STUDY_ATTR: the teachers whose cost a student's compression is measured against, as text;
# studies made before it was named so stored it under OLD_COMPRESSION_TEACHER_KEY
COMPRESSION_TEACHER_KEY, OLD_COMPRESSION_TEACHER_KEY = "compression_teacher", "reference_name"

# What a study's trials depend on: resuming with any of these changed would mix incomparable trials.
GUARDED_KEYS = ("dataset", "flops_budget", "params_budget", "search_space", "teachers", "teacher_epochs",
                "teacher_ckpts", "subset", "trial_epochs", "objective", "distill", "train", "ensemble_views", "seed",
                "trial_score", "shipped_teachers", "bn_recalibration", "latency_budget_ms", "memory_budget",
                "latency_precision", "latency_threads", "latency_table", "pareto_cost", "budget_floor", "budget_edge",
                "edge_min_width", "edge_min_width_rule", "edge_depth", "space_fingerprint")
# keys added later: recorded only when not at their default, so older studies keep their names
LATE_GUARDED_KEYS = ("trial_score", "shipped_teachers", "latency_budget_ms", "memory_budget", "latency_precision",
                     "latency_threads", "latency_table", "pareto_cost")
# keys added later that change what a trial's score means, so they are always recorded (and new
# studies get new default names); a study recorded before such a key had this value
# (`budget_floor` is recorded only when not 0, its default, so studies made before it keep their names;
# `budget_edge` always, so a study of before it resumes only with --budget-edge off; `edge_depth`
# at the edge unless "free", so a study of the edge made before the family's cap resumes, under its
# name, only with --edge-depth free; `edge_min_width_rule`, edge.MIN_WIDTH_RULE, with a minimum width
# at the edge, so that a study made under an earlier rule, 1 or 2 (neither recorded), is refused
# rather than resumed under another, and the default name of such a run is new)
LEGACY_VALUES = {"bn_recalibration": 0, "budget_floor": 0.0, "budget_edge": "off", "edge_min_width": 0,
                 "edge_depth": "free", "edge_min_width_rule": "1 or 2"}
# a study made before spaces' choices were recorded names the shipped space it used as it was then:
# "resnet" then is "resnet-v1" now, so such a study resumes with --search-space resnet-v1 --budget-edge off
LEGACY_SPACES = {"resnet": "resnet-v1"}

_DEFAULTS = SearchConfig()


def space_id(space: SearchSpace) -> str:
    """A shipped space by name; any other by its absolute path."""
    path = Path(space.source).resolve()
    return space.name if path.parent == SHIPPED.resolve() else str(path)


def guarded(cfg: SearchConfig, space_source: str, fingerprint: str | None = None) -> dict[str, Any]:
    """The settings a study's trials depend on. Settings added after a study format was first
    released are included only when they differ from their default, so that older studies keep
    their names and still resume."""
    d = cfg.to_dict()
    d["search_space"] = space_source
    if cfg.train.bf16 == _DEFAULTS.train.bf16:  # added later, like LATE_GUARDED_KEYS
        del d["train"]["bf16"]
    d["distill"] = {"losses": [list(x) for x in cfg.distill.losses], "temperature": cfg.distill.temperature}
    for key in ("two_stage", "ensemble_weighting"):
        if getattr(cfg.distill, key) != getattr(_DEFAULTS.distill, key):
            d["distill"][key] = getattr(cfg.distill, key)
    for key in ("budget_floor", "edge_min_width"):
        if not d[key]:  # off: not recorded, so studies made before it keep their names
            del d[key]
    if cfg.edge_min_width and cfg.budget_edge == "on":  # off, no repair: the rule plays no part
        d["edge_min_width_rule"] = MIN_WIDTH_RULE
    if cfg.budget_edge == "off" or cfg.edge_depth == "free":  # as before the cap: studies keep their names
        del d["edge_depth"]
    if fingerprint is not None:  # what the space samples: a shipped space's choices change between versions
        d["space_fingerprint"] = fingerprint
    return {k: d[k] for k in GUARDED_KEYS if k in d and (k not in LATE_GUARDED_KEYS or d[k] != getattr(_DEFAULTS, k))}


def make_pruner(name: str, reports: int) -> optuna.pruners.BasePruner:
    """The pruner `--pruner NAME` names, for trials that report `reports` times (steps 1..reports).

    median: a trial is stopped at a report where its best accuracy so far is below the median of
    the finished trials' accuracies at that report, once 4 trials have finished, and from report
    2 on (the first is the noisiest). sha: asynchronous successive halving (Li et al., MLSys 2020) with rungs at reports
    1, 2, 4, ... and a reduction factor of 2, so about half of the trials reaching a rung go on.
    hyperband: Hyperband (Li et al., JMLR 2018) over SHA brackets from 1 to `reports` reports,
    reduction factor 2. none: every trial runs to its end. `run` counts a pruned trial as the
    share of its steps it trained.
    """
    if name not in PRUNERS:
        raise InputError(f"unknown pruner {name!r}; known: {', '.join(PRUNERS)}")
    return PRUNERS[name](max(1, reports))


PRUNERS: dict[str, Callable[[int], optuna.pruners.BasePruner]] = {
    "median": lambda reports: optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=2),
    "sha": lambda reports: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2),
    "hyperband": lambda reports: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=reports,
                                                                reduction_factor=2),
    "none": lambda reports: optuna.pruners.NopPruner(),
}


def default_study_name(guarded: dict[str, Any]) -> str:
    """'fashion-mnist-macs50M-<hash>': the same flags resume the same study, other flags start anew."""
    from nas_kd.core.units import format_count

    parts = [_NOT_IN_NAMES.sub("_", str(guarded["dataset"])).lstrip(".")]
    if guarded.get("flops_budget"):
        parts.append(f"macs{format_count(guarded['flops_budget'])}")
    if guarded.get("params_budget"):
        parts.append(f"params{format_count(guarded['params_budget'])}")
    digest = hashlib.sha1(json.dumps(guarded, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return "-".join(parts + [digest])


# characters a study name may not hold: path separators, and what some file systems refuse
_NOT_IN_NAMES = re.compile(r'[/\\<>:"|?*\x00-\x1f\x7f]')
MAX_NAME = 200  # bytes; with '.db' and a suffix it stays under the usual 255-byte file name limit


def check_study_name(name: str) -> str:
    """Refuse a study name that would escape --out-dir or cannot be a file name: the storage
    `OUT_DIR/<name>.db` and the folder `OUT_DIR/<name>/` are made from it, and `report` and
    `retrain` take names from storages that other users may share."""
    bad = _NOT_IN_NAMES.search(name)
    why = ("it is empty" if not name.strip() else
           f"it holds {bad.group()!r}" if bad else
           "it starts with '.'" if name.startswith(".") else
           f"it is longer than {MAX_NAME} bytes" if len(name.encode()) > MAX_NAME else None)
    if why:
        shown = name if len(name) <= 60 else name[:60] + "..."
        raise InputError(f"study name {shown!r} cannot name a file inside the output folder ({why}); use letters, "
                         "digits, '-', '_' and '.', not starting with '.', e.g. fashion-macs50M")
    return name


def storage_url(url: str | None, study_name: str, out_dir: Path) -> str:
    return url or f"sqlite:///{out_dir / (study_name + '.db')}"


def check_url(url: str) -> None:
    """Refuse a storage URL that is not SQLite or PostgreSQL, before anything is loaded or trained."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InputError(f"bad storage URL {url!r}; expected sqlite:///PATH.db or "
                         "postgresql://USER:PASSWORD@HOST:PORT/DB") from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise InputError(f"storage URL {url!r} uses {backend!r}; supported: sqlite:///PATH.db, postgresql://...")
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise InputError(f"storage URL {url!r} names no database file; expected sqlite:///PATH.db")

def open_storage(url: str, heartbeat: bool = True, interval: int = 15) -> RDBStorage:
    """An RDB storage (SQLite or PostgreSQL). With heartbeats (every `interval` s), a trial whose
    process died is marked failed once 3 x `interval` s pass without one, and re-queued once with
    the same spec: a killed search that is started again, or another worker of the study, retries
    the trial it was killed in."""
    grace = 3 * interval
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import IntegrityError, SQLAlchemyError

    check_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = {"heartbeat_interval": interval, "grace_period": grace,
                  "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=1)}
    try:
        for attempt in range(4):
            try:
                return RDBStorage(url, **kwargs)
            except IntegrityError:  # another worker is creating the same tables right now
                if attempt == 3:
                    raise
                time.sleep(0.5 * (attempt + 1))
    except (SQLAlchemyError, ImportError, ModuleNotFoundError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot open storage {url!r}: {first}") from None


def load_existing(url: str | None, name: str, out_dir: Path) -> optuna.Study:
    """A study that must already exist (for retrain and report), with a clear error if not."""
    check_study_name(name)
    url = storage_url(url, name, out_dir)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise InputError(f"no storage at {url}; pass --storage with the URL the search used")
    storage = open_storage(url, heartbeat=False)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        raise InputError(f"no study {name!r} in {url}; it holds: {', '.join(names) or 'none'}") from None


def directions(pareto: bool) -> list[str]:
    return ["maximize", "minimize"] if pareto else ["maximize"]


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """tpe: multivariate TPE, its first 8 trials random; random: every trial random (random search,
    the baseline a search must beat)."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=8,
                                          constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise InputError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")


SAMPLERS = ("tpe", "random")


def shares_its_study(cfg: SearchConfig) -> bool:
    """Whether other processes may run trials of the run's study at the same time: a worker, or a
    run that counts the whole study's training (`--study-trials`)."""
    return cfg.worker or cfg.study_trials is not None


def sampler_seed(seed: int, n_existing: int, shared: bool) -> int:
    """The sampler's seed for a run that finds `n_existing` trials in its study.

    Reseeded on resume (`seed + n_existing`), so the random start-up phase does not propose the
    first run's specs again. A run that shares the study with others running at the same time
    (`--worker`, `--study-trials`) draws its seed from the OS: workers started together all find
    the same number of trials, and with one seed their samplers proposed the same specs in the same
    order, so each spec of the start-up phase was trained once per worker. Such runs are not
    reproducible whatever their seed, since the trials they see depend on the others' timing."""
    if shared:
        return secrets.randbits(31)
    return seed + n_existing


def open_study(storage: RDBStorage, name: str, pareto: bool, seed: int, guarded: dict[str, Any],
               pruner: str = "median", reports: int = 1, sampler: str = "tpe", shared: bool = False) -> optuna.Study:
    """Create the study, or load it if it exists and was made with the same settings. Trials of
    a single-objective study are pruned by `make_pruner(pruner, reports)`; a Pareto study's are
    never pruned (Optuna cannot prune multi-objective studies).

    `shared`: other processes may run trials of the study at the same time (workers); the sampler
    then gets a seed of its own (see `sampler_seed`)."""
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    n_existing = existing[name].n_trials if name in existing else 0
    study = optuna.create_study(storage=storage, study_name=name, directions=directions(pareto),
                                sampler=make_sampler(sampler, sampler_seed(seed, n_existing, shared)),
                                pruner=make_pruner("none" if pareto else pruner, reports), load_if_exists=True)
    wanted = [optuna.study.StudyDirection.MAXIMIZE] + ([optuna.study.StudyDirection.MINIMIZE] if pareto else [])
    if study.directions != wanted:
        raise InputError(f"study {name!r} was created with {'pareto' if len(study.directions) == 2 else 'accuracy'} "
                         f"objective; pass the same --objective or another --study-name")
    recorded = study.user_attrs.get(STUDY_ATTR, {}).get("guarded")
    if recorded is None:
        study.set_user_attr(STUDY_ATTR, {"guarded": json.loads(json.dumps(guarded, default=str))})
    else:
        now = json.loads(json.dumps(guarded, default=str))
        if "space_fingerprint" not in recorded:  # made before spaces were recorded: the names of then
            recorded = {**recorded, "search_space": LEGACY_SPACES.get(recorded.get("search_space"),
                                                                      recorded.get("search_space")),
                        "space_fingerprint": now.get("space_fingerprint")}
        for key in GUARDED_KEYS:
            was, is_ = recorded.get(key, LEGACY_VALUES.get(key)), now.get(key, LEGACY_VALUES.get(key))
            if key == "space_fingerprint" and was != is_:
                raise InputError(f"study {name!r} was created with another {recorded.get('search_space')!r} space "
                                 f"(fingerprint {was}, this one {is_}): its trials would not match; use the space it "
                                 "was made with, or another --study-name")
            if key == "edge_min_width_rule" and was != is_:
                raise InputError(f"study {name!r} was made under version {was} of --edge-min-width's rule, this run "
                                 f"has version {is_}: its trials would not match; use another --study-name")
            if was != is_:
                raise InputError(f"study {name!r} was created with {key}={was!r}, this run has {key}={is_!r}; use "
                                 "the same settings to resume, or another --study-name")
    return study


def check_same_teachers(study: optuna.Study, teachers: list[dict[str, Any]]) -> None:
    """A study's trials must all distil from the same teacher weights: refuse to go on with others
    (say, a more accurate teacher trained into the cache since). `teachers` is
    `teachers.ensemble_summary`; studies recorded before weights were hashed are not checked."""
    before = {t["name"]: t for t in study.user_attrs.get(STUDY_ATTR, {}).get("teachers", [])}
    for t in teachers:
        old = before.get(t["name"], {})
        if old.get("weights_sha256") and old["weights_sha256"] != t["weights_sha256"]:
            raise InputError(f"study {study.study_name!r} distilled from other weights of teacher {t['name']} "
                             f"({old.get('path')}) than this run loaded ({t['path']}); pass that file with "
                             f"--teacher-ckpt {t['name']}=PATH, or start another --study-name")


def compression_teacher(study: optuna.Study) -> str:
    """Which teachers the study's compression ratios are measured against ("?" when not recorded)."""
    info = study.user_attrs.get(STUDY_ATTR, {})
    return str(info.get(COMPRESSION_TEACHER_KEY, info.get(OLD_COMPRESSION_TEACHER_KEY, "?")))


def update_study_attr(study: optuna.Study, key: str, values: dict[str, Any]) -> None:
    merged = dict(study.user_attrs.get(key, {}))
    merged.update(values)
    study.set_user_attr(key, merged)


def study_training(study: optuna.Study) -> float:
    """Trials' worth of training the study holds, from every worker and run (`training_done`)."""
    return sum(training_done(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                                                  TrialState.PRUNED)))


def run(study: optuna.Study, objective: Callable[[optuna.Trial], Any], trained: float, timeout: float | None,
        on_trial: Callable[[FrozenTrial], None] | None = None, max_rejections: int = 500,
        max_repeats: int = 50, max_failures: int = MAX_FAILURES_IN_A_ROW, study_target: float | None = None) -> int:
    """Run trials until `trained` trials' worth of training was done in this call (a trial that
    ran to its end counts 1, a pruned one the share of its steps it trained: so pruning buys
    more candidates for the same time), `timeout` seconds passed (counted only once the study
    holds a trained trial: a run with a timeout still hands over a student), `max_rejections` specs in a
    row were over budget, or `max_repeats` in a row were specs the study had already scored (the
    sampler has converged: more trials would train nothing new). Budget rejections and repeats
    count nothing. With `study_target`, `trained` is ignored: the run stops once the study holds
    that many trials' worth of training from all its workers (each worker finishes the trial it
    is in, so a study of N workers may end up to N - 1 trials over). A trial that failed (`objective.run_trial`) fails alone; after `max_failures`
    in a row the study stops and `TooManyFailures` names the last one's reason. Returns the
    number of trials that trained."""
    count = {"trials": 0, "work": 0.0, "rejected_in_a_row": 0, "repeats_in_a_row": 0, "failed_in_a_row": 0}
    last_failure: list[FrozenTrial] = []
    started = time.perf_counter()
    held = any(was_trained(t) for t in study.get_trials(deepcopy=False))

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.FAIL and FAIL_ATTR in trial.user_attrs:
            count["failed_in_a_row"] += 1  # rejections and repeats in between neither count nor reset it
            last_failure[:] = [trial]
        if was_trained(trial) and trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            count["trials"] += 1
            count["work"] += training_done(trial)
            count["rejected_in_a_row"] = count["repeats_in_a_row"] = count["failed_in_a_row"] = 0
        elif trial.state == TrialState.PRUNED:
            count["rejected_in_a_row"] += 1
        elif REPEAT_ATTR in trial.user_attrs:
            count["repeats_in_a_row"] += 1
        if on_trial is not None:
            on_trial(trial)
        done = count["work"] >= trained - 1e-9 if study_target is None else study_training(study) >= study_target - 1e-9
        late = timeout is not None and time.perf_counter() - started >= timeout and (held or count["trials"] > 0)
        if (done or late or count["rejected_in_a_row"] >= max_rejections
                or count["repeats_in_a_row"] >= max_repeats or count["failed_in_a_row"] >= max_failures):
            study.stop()

    if (trained > 0 if study_target is None else study_training(study) < study_target - 1e-9):
        study.optimize(objective, callbacks=[callback], gc_after_trial=False,
                       show_progress_bar=False)
    if count["failed_in_a_row"] >= max_failures:
        last = last_failure[0]
        raise TooManyFailures(f"stopped after {count['failed_in_a_row']} failed trials in a row (the last, trial "
                              f"{last.number}: {last.user_attrs[FAIL_ATTR]}); every finished trial is kept in the "
                              "storage")
    return count["trials"]


class TooManyFailures(InputError):
    """The study stopped because its trials kept failing: almost always a setting (the learning
    rate, a loss weight, the batch size on a small GPU), so it is reported like bad input."""
