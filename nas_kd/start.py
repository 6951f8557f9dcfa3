"""Start points: students a search trains first, before its sampler proposes any.

A search that never tries the network a person would pick cannot show that it beat it, and with
the 10 trials a ten-minute search affords on 2 cores its random start-up phase rarely meets one as
good: under 50M MACs on Fashion-MNIST a ResNet-20 widened to fit was better than 27 of 30 random
students of the default space, and even a perfect trial score picked above it in only 66% of
simulated 10-trial searches (BENCHMARKS.md, "How far a search of n trials can get").

`--start-from hand-made` enqueues that network (`hand_made`: the deepest of ResNet-20, -14 and -8,
He et al. 2016, that fits the budget at half its widths or more, every width scaled to fit) as a
trial of the study; `--start-from SPEC` enqueues any student. A start point in the search space is
enqueued with its Optuna params, so the sampler learns from it; one outside the space (the
hand-made network is outside the shipped spaces) is enqueued by its spec alone, and the sampler
does not model it. Either way it is trained and scored like every trial and counts towards
`--trials`; then the retrain compares it on validation with the search's best trial whatever
its trial score (`study.retrain_candidates`), because a brief trial underrates it: at 50M MACs
the widened ResNet-20 ranked 7th of 7, 5th of 7 and 2nd of 6 by trial score on three seeds and
was better after the full retrain on two. So a study shows on the user's own budget and data
whether the search found better than the network it started from, and never keeps worse on
validation. A start point the study already holds (a resumed study) is not enqueued again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import optuna

from nas_kd.arch import Spec, build
from nas_kd.cost import Budget, Cost, count, format_count
from nas_kd.errors import InputError
from nas_kd.space import SearchSpace
from nas_kd.teachers import teacher_spec

HAND_MADE = "hand-made"
HAND_MADE_BASES = ("resnet20", "resnet14", "resnet8")  # deepest first
WIDTH_STEPS = 300  # width factors 0.01, 0.02, ... 3.00

START_ATTR = "start_point"  # of an enqueued start trial: "hand-made", or "given" (a spec passed in)
START_SPEC_ATTR = "start_spec"  # its spec, as text
START_IN_SPACE_ATTR = "start_in_space"  # whether its spec is in the search space (then it has params)


def scaled(base: Spec, factor: float) -> Spec:
    """`base` with its stem and every stage's width times `factor`, rounded to a multiple of 4."""
    def width(w: int) -> int:
        return max(4, round(w * factor / 4) * 4)
    return Spec(width(base.stem), tuple(dataclasses.replace(s, width=width(s.width)) for s in base.stages), base.head)


def spec_cost(spec: Spec, input_shape: tuple[int, int, int], num_classes: int) -> Cost:
    return count(build(spec, input_shape, num_classes, channels_last=False), input_shape)


def fitting_factor(base: Spec, budget: Budget, input_shape: tuple[int, int, int], num_classes: int) -> float:
    """The largest width factor (0.01 to 3, step 0.01) at which `base` fits the MACs and params
    bounds of `budget` (0: none does). Widths never shrink as the factor grows, so neither does the
    cost: a bisection finds it in about 9 counts."""
    bounds = Budget(budget.macs, budget.params)
    lo, hi = 0, WIDTH_STEPS  # steps: lo fits (0 = none), every step above hi does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if bounds.fits(spec_cost(scaled(base, mid / 100), input_shape, num_classes)):
            lo = mid
        else:
            hi = mid - 1
    return lo / 100


def hand_made(budget: Budget, input_shape: tuple[int, int, int], num_classes: int) -> tuple[Spec, str] | None:
    """What a person would pick without a search, and its name: the deepest of ResNet-20, -14 and -8
    that fits the budget's MACs and params bounds at half its widths or more, at the largest width
    that fits; ResNet-8 narrower still if none does; None if not even that fits."""
    for name in HAND_MADE_BASES:
        base = teacher_spec(name)
        factor = fitting_factor(base, budget, input_shape, num_classes)
        if factor >= 0.5 or (name == HAND_MADE_BASES[-1] and factor > 0):
            return scaled(base, factor), f"{name.replace('resnet', 'ResNet-')} at x{factor:.2f} widths"
    return None


@dataclass(frozen=True)
class StartPoint:
    name: str  # HAND_MADE, or "given"
    spec: Spec
    params: dict[str, object] | None  # its Optuna params when it is in the space, else None
    text: str  # how the log names it


def start_points(names: tuple[str, ...], space: SearchSpace, budget: Budget, input_shape: tuple[int, int, int],
                 num_classes: int) -> tuple[list[StartPoint], list[str]]:
    """The start points `names` ask for (HAND_MADE or spec strings), and a log line for each one
    left out. A given spec that does not parse, or is over the budget's MACs or params bound, is
    refused (InputError); the hand-made network is left out, with a line, when no width of ResNet-8
    fits. Latency and memory bounds are checked by the trial itself, as for every student."""
    bounds = Budget(budget.macs, budget.params)
    points: list[StartPoint] = []
    skipped: list[str] = []
    for name in dict.fromkeys(names):
        if name == HAND_MADE:
            found = hand_made(budget, input_shape, num_classes)
            if found is None:
                skipped.append(f"start point {HAND_MADE}: no width of ResNet-8 fits {bounds}; left out")
                continue
            spec, text = found
            kind = HAND_MADE
        else:
            try:
                spec = Spec.parse(name)
            except InputError as e:
                raise InputError(f"--start-from: {e}; or pass {HAND_MADE!r}") from None
            text, kind = "given", "given"
        cost = spec_cost(spec, input_shape, num_classes)
        if not bounds.fits(cost):
            if kind == HAND_MADE:  # cannot happen: fitting_factor checked it
                raise AssertionError(f"hand-made network {spec} over {bounds}")
            raise InputError(f"--start-from {name}: {bounds.excess(cost)}, over the budget; give a student "
                             "that fits")
        try:
            params = space.params_of(spec)
        except InputError:
            params = None
        where = "in the search space" if params is not None else "outside the search space"
        points.append(StartPoint(kind, spec, params, f"{text}, {format_count(cost.macs)} MACs, "
                                                     f"{format_count(cost.params)} params, {where}"))
    return points, skipped


def enqueue(study: optuna.Study, points: list[StartPoint]) -> list[str]:
    """Enqueue every start point the study does not hold yet (as a trial of any state, or already
    enqueued); one log line per point."""
    held = {t.user_attrs.get("spec") for t in study.get_trials(deepcopy=False)}
    held |= {t.user_attrs.get(START_SPEC_ATTR) for t in study.get_trials(deepcopy=False)}
    lines = []
    for p in points:
        if str(p.spec) in held:
            lines.append(f"start point {p.name}: {p.spec} is already in the study")
            continue
        study.enqueue_trial(p.params or {}, user_attrs={START_ATTR: p.name, START_SPEC_ATTR: str(p.spec),
                                                        START_IN_SPACE_ATTR: p.params is not None})
        lines.append(f"start point {p.name}: {p.spec} ({p.text}) is trained first")
    return lines


def trial_spec(space: SearchSpace, trial: optuna.Trial) -> Spec:
    """The trial's spec: its start point's, when it is one outside the space; else sampled from
    the space (a start point in the space gets its own spec back from its enqueued params)."""
    a = trial.user_attrs
    if START_SPEC_ATTR in a and not a.get(START_IN_SPACE_ATTR):
        return Spec.parse(a[START_SPEC_ATTR])
    spec = space.sample(trial)
    assert START_SPEC_ATTR not in a or str(spec) == a[START_SPEC_ATTR], (spec, a[START_SPEC_ATTR])
    return spec

