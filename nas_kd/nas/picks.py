"""Which trials of a study go on to the retrain: the winner, the finalists, the start points
(`nas_kd.nas.start`), and the best trial within a new budget."""

from __future__ import annotations

from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas_kd.core.errors import InputError
from nas_kd.core.units import format_bytes, format_count
from nas_kd.nas.budget import Budget
from nas_kd.nas.records import (
    LATENCY_ATTR,
    PEAK_INT8_ATTR,
    SPEC_ATTR,
    START_ATTR,
    START_IN_SPACE_ATTR,
    START_SPEC_ATTR,
    is_feasible,
    was_trained,
)
from nas_kd.nas.start import HAND_MADE, StartPoint
from nas_kd.nets.cost import Cost


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
    A study holds one hand-made network: one resumed after its pick changed (a latency timed again,
    or the rule of an earlier version) keeps the one it has. Workers that start at the same moment
    may each enqueue it: give --start-from to one of them."""
    held: set[str] = set()
    for t in study.get_trials(deepcopy=False):
        spec = t.user_attrs.get(SPEC_ATTR, t.user_attrs.get(START_SPEC_ATTR))
        if t.state in (TrialState.WAITING, TrialState.RUNNING) or (t.state == TrialState.COMPLETE and was_trained(t)):
            held.add(spec)
    recorded = dict(study.user_attrs.get(START_POINTS_ATTR, {}))
    lines = []
    for p in points:
        made = [spec for spec, name in recorded.items() if name == HAND_MADE and spec != str(p.spec)]
        if p.name == HAND_MADE and made:
            lines.append(f"start point {p.name}: the study has {made[0]} already (picked when it was made); "
                         f"{p.spec} is not added")
            continue
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


# ---------------------------------------------------------------- one study, many budgets


def budget_tag(budget: Budget) -> str:
    """A folder-safe name of a budget's bounds: 'macs20M', 'params200K-mem48KB', 'lat1.5ms'."""
    parts = [f"macs{format_count(budget.macs)}" if budget.macs is not None else "",
             f"params{format_count(budget.params)}" if budget.params is not None else "",
             f"lat{budget.latency_ms:g}ms" if budget.latency_ms is not None else "",
             f"mem{format_bytes(budget.memory)}" if budget.memory is not None else ""]
    return "-".join(p for p in parts if p).replace("/", "_")


def stored_cost(trial: FrozenTrial) -> Cost:
    """What the trial recorded of its cost: MACs and params always; latency when it was measured or
    predicted, peak int8 memory when the search had memory figures (else None)."""
    a = trial.user_attrs
    return Cost(a["macs"], a["params"], a.get(LATENCY_ATTR), a.get(PEAK_INT8_ATTR))


def cost_text(cost: Cost) -> str:
    return ", ".join([f"{format_count(cost.macs)} MACs", f"{format_count(cost.params)} params"]
                     + ([f"{cost.latency_ms:.3g} ms"] if cost.latency_ms is not None else [])
                     + ([f"{format_bytes(cost.memory)} peak int8"] if cost.memory is not None else []))


def pick_at_budget(study: optuna.Study, budget: Budget,
                   price: Callable[[FrozenTrial], Cost] = stored_cost) -> tuple[FrozenTrial, Cost, int]:
    """The best trained trial of the study (by trial score, ties: fewer MACs, as `finalists`
    ranks) whose cost `price(trial)` fits `budget`, its cost, and how many trials fit. A budget no
    trial meets is refused in one line naming the cheapest trial."""
    trained = [t for t in completed(study) if is_feasible(t)]
    if not trained:
        raise InputError(f"study {study.study_name!r} has no completed trial to pick from; run the search first")
    costs = {t.number: price(t) for t in trained}
    fitting = [t for t in trained if budget.fits(costs[t.number])]
    if not fitting:
        cheapest = min(trained, key=lambda t: (budget.use(costs[t.number]) or 0.0, t.user_attrs["macs"]))
        raise InputError(f"no trained trial of study {study.study_name!r} meets {budget}: the cheapest is trial "
                         f"{cheapest.number} ({cheapest.user_attrs[SPEC_ATTR]}, {cost_text(costs[cheapest.number])}); "
                         "raise the budget")
    best = max(fitting, key=lambda t: (t.values[0], -t.user_attrs["macs"]))
    return best, costs[best.number], len(fitting)
