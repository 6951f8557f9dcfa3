"""Which trials of a study go on to the retrain: the winner, the finalists, the start points
(`nas_kd.start`), and the best trial within a new budget."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas_kd.errors import InputError
from nas_kd.records import SPEC_ATTR, START_ATTR, START_IN_SPACE_ATTR, START_SPEC_ATTR, is_feasible, was_trained
from nas_kd.start import StartPoint


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and was_trained(t)]


def pick_winner(study: optuna.Study, trial_number: int | None = None) -> FrozenTrial:
    """The feasible trial of best validation accuracy (ties: fewer MACs), or the one asked for."""
    if trial_number is not None:
        for t in study.get_trials(deepcopy=False):
            if t.number == trial_number:
                if not was_trained(t) or t.state != TrialState.COMPLETE:
                    raise InputError(f"trial {trial_number} of study {study.study_name!r} is {t.state.name.lower()}"
                                     f"{'' if was_trained(t) else ' and was never trained'}; pick a completed trial")
                return t
        raise InputError(f"study {study.study_name!r} has no trial {trial_number} (it has {len(study.trials)})")
    return finalists(study, 1)[0]


def finalists(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The `k` feasible completed trials of best trial score (a distill trial's: its validation
    accuracy; ties: fewer MACs), best first, one per spec: a spec the study trained twice is one
    finalist, at its better score. Fewer when the study has fewer distinct feasible students."""
    feasible = sorted((t for t in completed(study) if is_feasible(t)),
                      key=lambda t: (t.values[0], -t.user_attrs["macs"]), reverse=True)
    if not feasible:
        raise InputError(f"study {study.study_name!r} has no completed trial within the budget yet; "
                         "run more trials (--trials) first")
    best: dict[str, FrozenTrial] = {}
    for t in feasible:
        best.setdefault(t.user_attrs[SPEC_ATTR], t)
    return list(best.values())[:k]


START_POINTS_ATTR = "start_points"  # study attribute: every start point enqueued, spec -> name


def enqueue_start_points(study: optuna.Study, points: list[StartPoint]) -> list[str]:
    """Enqueue each start point the study does not hold yet, recording it in the study (so a
    trial of its spec counts as the start point whoever proposed it); one log line per point. A
    spec is held when a trial of it is waiting, running, or completed and scored; one that was
    only rejected, pruned before this version exempted start points, or failed is enqueued again.
    Workers that start at the same moment may each enqueue it: give --start-from to one of them."""
    held: set[str] = set()
    for t in study.get_trials(deepcopy=False):
        spec = t.user_attrs.get(SPEC_ATTR, t.user_attrs.get(START_SPEC_ATTR))
        if t.state in (TrialState.WAITING, TrialState.RUNNING) or (t.state == TrialState.COMPLETE and was_trained(t)):
            held.add(spec)
    recorded = dict(study.user_attrs.get(START_POINTS_ATTR, {}))
    lines = []
    for p in points:
        recorded.setdefault(str(p.spec), p.name)
        if str(p.spec) in held:
            lines.append(f"start point {p.name}: {p.spec} is already in the study")
            continue
        study.enqueue_trial(p.params or {}, user_attrs={START_ATTR: p.name, START_SPEC_ATTR: str(p.spec),
                                                        START_IN_SPACE_ATTR: p.params is not None})
        held.add(str(p.spec))
        lines.append(f"start point {p.name}: {p.spec} ({p.text}) is trained first")
    if recorded != study.user_attrs.get(START_POINTS_ATTR, {}):
        study.set_user_attr(START_POINTS_ATTR, recorded)
    return lines


def start_names(study: optuna.Study) -> dict[str, str]:
    """The study's start points: spec -> name (HAND_MADE or "given")."""
    names = {t.user_attrs[SPEC_ATTR]: t.user_attrs[START_ATTR] for t in study.get_trials(deepcopy=False)
             if START_ATTR in t.user_attrs and SPEC_ATTR in t.user_attrs}
    return {**names, **study.user_attrs.get(START_POINTS_ATTR, {})}


def start_trials(study: optuna.Study) -> list[FrozenTrial]:
    """For each start point of the study (`start_names`), its best completed, scored trial within
    the budget, whoever proposed it (the sampler may have trained the spec first); best first."""
    return _starts_among(study, finalists(study, len(study.trials)))


def _starts_among(study: optuna.Study, ranked: list[FrozenTrial]) -> list[FrozenTrial]:
    names = start_names(study)
    return [t for t in ranked if t.user_attrs[SPEC_ATTR] in names]


def retrain_candidates(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """What the retrain compares on validation: the `k` best trials by score (`finalists`), then
    every start point not among them. A start point is the search's baseline (what a person would
    pick, or a student the user gave): it is retrained whatever its brief trial scored, so the
    winner beats it after the full schedule or is it."""
    ranked = finalists(study, len(study.trials))  # one per spec, best first
    return ranked[:k] + _starts_among(study, ranked[k:])
