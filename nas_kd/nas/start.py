"""Start points: students a search trains first, before its sampler proposes any.

A search that never tries the network a person would pick cannot show that it beat it, and with
the 10 trials a ten-minute search affords on 2 cores its random start-up phase rarely meets one as
good: under 50M MACs on Fashion-MNIST a ResNet-20 widened to fit was better than 27 of 30 random
students of the default space, and even a perfect trial score picked above it in only 66% of
simulated 10-trial searches (BENCHMARKS.md, "How far a search of n trials can get").

`--start-from hand-made` enqueues that network (`hand_made`: the deepest of ResNet-20, -14 and -8,
He et al. 2016, that fits the budget at 0.45 of its widths or more, every width scaled to fit) as a
trial of the study; `--start-from SPEC` enqueues any student. A start point in the search space is
enqueued with its Optuna params, so the sampler learns from it; one outside the space (the
hand-made network is outside `resnet-v1`; the default `resnet` space holds it) is enqueued by its spec alone, and the sampler
does not model it. Either way it is trained and scored like every trial and counts towards
`--trials`; then the retrain compares it on validation with the search's best trial whatever
its trial score (`picks.retrain_candidates`), because a brief trial underrates it: at 50M MACs
the widened ResNet-20 ranked 7th of 7, 5th of 7 and 2nd of 6 by trial score on three seeds and
was better after the full retrain on two. So a study shows on the user's own budget and data
whether the search found better than the network it started from, and never keeps worse on
validation. A start point the study already holds (a resumed study) is not enqueued again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, replace

import optuna

from nas_kd.core.errors import InputError
from nas_kd.core.units import format_count
from nas_kd.device.memory import peak_activations
from nas_kd.nas.budget import Budget
from nas_kd.nas.records import START_IN_SPACE_ATTR, START_SPEC_ATTR
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.cost import Cost, count
from nas_kd.nets.space import SearchSpace
from nas_kd.nets.zoo import teacher_spec

HAND_MADE = "hand-made"
HAND_MADE_BASES = ("resnet20", "resnet14", "resnet8")  # deepest first
WIDTH_STEPS = 300  # width factors 0.01, 0.02, ... 3.00
# `hand_made`, `depth_cap`: the least share of its widths a deeper ResNet may be scaled to. Set on two
# budgets, 3 seeds each, validation accuracy after the fixed 3-epoch retrain: at 5M MACs ResNet-14 at
# x0.46 beat ResNet-8 at x0.68 by 0.41 points (on every seed); at a latency of 0.245 ms (a table's)
# ResNet-14 at x0.56 beat ResNet-20 at x0.43 by 0.37 (on every seed). 0.5, the rule before, took
# ResNet-8 at 5M; 8 channels in every layer took ResNet-20 at x0.43. Measured nowhere else.
DEPTH_FACTOR = 0.45
# the hand-made family: the ResNets above and MobileNetV2 with CIFAR strides
# (Sandler et al. 2018), each with the width step it is scaled by; MobileNetV2's coarser step
# (0.05, up to 2.00) keeps the layers a latency table must hold for it at about 400
FAMILY_STEPS = {"resnet20": (0.01, WIDTH_STEPS), "resnet14": (0.01, WIDTH_STEPS), "resnet8": (0.01, WIDTH_STEPS),
                "mobilenetv2": (0.05, 40)}


def scaled(base: Spec, factor: float) -> Spec:
    """`base` with its stem and every stage's width times `factor`, rounded to a multiple of 4."""
    def width(w: int) -> int:
        return max(4, round(w * factor / 4) * 4)
    return Spec(width(base.stem), tuple(dataclasses.replace(s, width=width(s.width)) for s in base.stages), base.head)


def spec_cost(spec: Spec, input_shape: tuple[int, int, int], num_classes: int) -> Cost:
    return count(build(spec, input_shape, num_classes, channels_last=False), input_shape)


def checkable(budget: Budget, latency: Callable[[Spec], float] | None) -> Budget:
    """The bounds of `budget` a start point is checked against before any work: MACs, params and
    peak memory, and latency when `latency` prices a spec cheaply (a table); a measured latency
    bound is left to the trial."""
    return replace(budget, latency_ms=budget.latency_ms if latency is not None else None)


def scalable(bounds: Budget) -> bool:
    """Whether `bounds` (from `checkable`) has a bound the hand-made network can be scaled to."""
    return any(getattr(bounds, k) is not None for k in ("macs", "params", "memory", "latency_ms"))


def spec_facts(spec: Spec, bounds: Budget, input_shape: tuple[int, int, int], num_classes: int,
               latency: Callable[[Spec], float] | None = None) -> Cost:
    """`spec`'s MACs and params, and its peak memory and latency where `bounds` has those bounds
    (`latency` may raise InputError: a table that cannot price the spec)."""
    model = build(spec, input_shape, num_classes, channels_last=False)
    cost = count(model, input_shape)
    return replace(cost, memory=peak_activations(model, input_shape) if bounds.memory is not None else None,
                   latency_ms=latency(spec) if bounds.latency_ms is not None and latency is not None else None)


def fitting_factor(base: Spec, fits: Callable[[Spec], bool], step: float = 0.01, steps: int = WIDTH_STEPS,
                   exact: Callable[[Spec], bool] | None = None) -> float:
    """The largest width factor (step, 2 step, ... steps x step) at which `fits(scaled(base,
    factor))` and `exact(...)` hold (0: none does). Widths never shrink as the factor grows, nor do
    MACs, params and peak memory, so `fits` (of those) is bisected in about 9 checks. `exact` is a
    check that does not always fail from some width on (a table's latency: it priced ResNet-20 at
    x0.90, 16/28/56 channels, above x1.00, 16/32/64): it is tried from that factor down, once per
    distinct spec. A bisection on it once scaled ResNet-20 to x0.85 under a budget x1.00 met."""
    lo, hi = 0, steps  # steps: lo fits (0 = none), every step above hi does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(scaled(base, round(mid * step, 2))):
            lo = mid
        else:
            hi = mid - 1
    if exact is not None:
        tried: dict[Spec, bool] = {}
        while lo > 0:
            spec = scaled(base, round(lo * step, 2))
            if spec not in tried:
                tried[spec] = exact(spec)
            if tried[spec]:
                break
            lo -= 1
    return round(lo * step, 2)


def _checks(bounds: Budget, input_shape: tuple[int, int, int], num_classes: int,
            latency: Callable[[Spec], float] | None) -> tuple[Callable[[Spec], bool], Callable[[Spec], bool] | None]:
    """`fitting_factor`'s two checks of `bounds` (from `checkable`): the bounds that grow with width
    (MACs, params, peak memory), and the latency bound, priced by `latency`, if there is one."""
    grows = replace(bounds, latency_ms=None)

    def fits(spec: Spec) -> bool:
        return grows.fits(spec_facts(spec, grows, input_shape, num_classes))

    limit = bounds.latency_ms
    return fits, (None if limit is None or latency is None else lambda spec: latency(spec) <= limit)


def family_specs(name: str) -> list[Spec]:
    """Every width of the hand-made family member `name` its scaling can produce (the layers a
    latency table needs to price it: `nas_kd.device.latency.export_blocks(extra=...)`)."""
    step, steps = FAMILY_STEPS[name]
    return list(dict.fromkeys(scaled(teacher_spec(name), round(k * step, 2)) for k in range(1, steps + 1)))


def family(budget: Budget, input_shape: tuple[int, int, int], num_classes: int,
           latency: Callable[[Spec], float] | None = None) -> dict[str, tuple[Spec, float]]:
    """Each member of the hand-made family at the largest width that fits the budget, with its width
    factor; members of which no width fits are left out. Raises InputError when `latency` cannot
    price a member (a table without the family's layers)."""
    bounds = checkable(budget, latency)
    if not scalable(bounds):
        return {}

    fits, exact = _checks(bounds, input_shape, num_classes, latency)
    found = {}
    for name, (step, steps) in FAMILY_STEPS.items():
        factor = fitting_factor(teacher_spec(name), fits, step, steps, exact)
        if factor > 0:
            found[name] = (scaled(teacher_spec(name), factor), factor)
    return found


def depth_cap(budget: Budget, input_shape: tuple[int, int, int], num_classes: int,
              latency: Callable[[Spec], float] | None = None) -> int:
    """The most blocks a stage of a shape drawn at the budget's edge may have (`--edge-depth
    family`): the depth of the hand-made network (`hand_made`: 3, 2 or 1 blocks a stage for
    ResNet-20, -14 and -8); 0 (no cap) when it is ResNet-20, or when there is none (nothing to
    scale it to, or not even ResNet-8 fits). At 5M MACs on 28x28 images: 2 (ResNet-14 at x0.46,
    8-28 channels); at 2M: 1; at 50M: none."""
    found = hand_made(budget, input_shape, num_classes, latency)
    if found is None:
        return 0
    depth = found[0].stages[0].depth
    return 0 if depth == teacher_spec(HAND_MADE_BASES[0]).stages[0].depth else depth


def hand_made(budget: Budget, input_shape: tuple[int, int, int], num_classes: int,
              latency: Callable[[Spec], float] | None = None,
              measured: Callable[[Spec], float] | None = None) -> tuple[Spec, str] | None:
    """What a person would pick without a search, and its name: the deepest of ResNet-20, -14 and -8
    that fits the budget at DEPTH_FACTOR of its widths or more, at the largest width that fits;
    ResNet-8 narrower still if none does; None if not even that fits, or if the budget has no bound it can
    be scaled to (MACs, params, peak memory, or a latency `latency` prices). Raises InputError when
    `latency` cannot price it. `measured`: a latency measured here (seconds a spec), used when no
    table prices it: the widths are then bisected on it with the other bounds, about 9 timings a
    network, each only of a width that meets the other bounds."""
    if latency is None and measured is not None and budget.latency_ms is not None:
        fits, exact = _measured_checks(budget, input_shape, num_classes, measured)
    else:
        bounds = checkable(budget, latency)
        if not scalable(bounds):
            return None
        fits, exact = _checks(bounds, input_shape, num_classes, latency)
    for name in HAND_MADE_BASES:
        base = teacher_spec(name)
        factor = fitting_factor(base, fits, exact=exact)
        if factor >= DEPTH_FACTOR or (name == HAND_MADE_BASES[-1] and factor > 0):
            return scaled(base, factor), f"{name.replace('resnet', 'ResNet-')} at x{factor:.2f} widths"
    return None


def _measured_checks(budget: Budget, input_shape: tuple[int, int, int], num_classes: int,
                     measured: Callable[[Spec], float]) -> tuple[Callable[[Spec], bool], None]:
    """`fitting_factor`'s checks when the latency is measured here: one check of every bound, the
    latency timed only when the others hold (a timing is an export and seconds of runs)."""
    grows = replace(budget, latency_ms=None)
    limit = budget.latency_ms
    assert limit is not None

    def fits(spec: Spec) -> bool:
        return grows.fits(spec_facts(spec, grows, input_shape, num_classes)) and measured(spec) <= limit

    return fits, None


@dataclass(frozen=True)
class StartPoint:
    name: str  # HAND_MADE, or "given"
    spec: Spec
    params: dict[str, object] | None  # its Optuna params when it is in the space, else None
    text: str  # how the log names it


def space_params(space: SearchSpace, spec: Spec) -> dict[str, object] | None:
    """The Optuna params of `spec` when the space holds it (sampling them gives `spec` back: a
    pruned internal width `_m` is not a choice of any space), else None."""
    try:
        params = space.params_of(spec)
    except InputError:
        return None
    return params if space.sample(optuna.trial.FixedTrial(params)) == spec else None


def start_points(names: tuple[str, ...], space: SearchSpace, budget: Budget, input_shape: tuple[int, int, int],
                 num_classes: int, floor: float = 0.0, latency: Callable[[Spec], float] | None = None,
                 measured: Callable[[Spec], float] | None = None) -> tuple[list[StartPoint], list[str]]:
    """The start points `names` ask for (HAND_MADE or spec strings), one per spec, and a log line
    for each one left out. `latency`: a cheap latency of a spec (a table), or None when latencies
    are measured (then a given spec's latency bound is left to the trial, and the hand-made network
    is scaled by timing a few widths with `measured`). A given spec that does not parse,
    breaks a bound, is under the budget floor or cannot be priced is refused (InputError); the
    hand-made network is left out, with a line, when none of its widths fits or it cannot be priced."""
    bounds = checkable(budget, latency)
    points: list[StartPoint] = []
    skipped: list[str] = []
    for name in dict.fromkeys(names):
        if name == HAND_MADE:
            try:
                found = hand_made(budget, input_shape, num_classes, latency, measured)
            except InputError as e:
                skipped.append(f"start point {HAND_MADE}: {e}; left out")
                continue
            if found is None:
                skipped.append(f"start point {HAND_MADE}: " + (
                    f"no width of ResNet-8 fits {bounds}" if scalable(bounds) else
                    "the budget has no MACs, params or memory bound to scale it to (a measured latency bound is "
                    "checked by the trials alone)") + "; left out")
                continue
            spec, text = found
            cost = spec_cost(spec, input_shape, num_classes)
        else:
            try:
                spec = Spec.parse(name)
                cost = spec_facts(spec, bounds, input_shape, num_classes, latency)
            except InputError as e:
                raise InputError(f"--start-from {name}: {e}") from None
            if not bounds.fits(cost):
                raise InputError(f"--start-from {name}: {bounds.excess(cost)}, over the budget; give a student "
                                 "that fits")
            if floor and (use := budget.use(cost)) is not None and use < floor:
                raise InputError(f"--start-from {name}: uses {use:.0%} of the budget, under the budget floor "
                                 f"({floor:.0%}); give a larger student or lower --budget-floor")
            text = "given"
        if any(p.spec == spec for p in points):
            continue
        params = space_params(space, spec)
        where = "in the search space" if params is not None else "outside the search space"
        points.append(StartPoint(name if name == HAND_MADE else "given", spec, params,
                                 f"{text}, {format_count(cost.macs)} MACs, {format_count(cost.params)} params, {where}"))
    return points, skipped


def enqueued_widths(trial: optuna.Trial) -> bool:
    """Whether `trial` was enqueued with widths (`study.enqueue_trial(space.params_of(spec))`, as a
    benchmark's fixed students are): those are asked as widths at the edge too, so that they count."""
    # the running trials only: reading every trial of the study, per trial, grows with the study
    running = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    frozen = next(t for t in running if t.number == trial.number)
    return any(k == "stem" or k.endswith("_width") for k in frozen.system_attrs.get("fixed_params", {}))


def trial_spec(space: SearchSpace, trial: optuna.Trial, edge: bool = False) -> Spec:
    """The trial's spec: its start point's, when it is one outside the space; else sampled from
    the space (a start point in the space gets its own spec back from its enqueued params; at the
    budget's `edge` any other trial's widths are asked as proportions, `SearchSpace.sample`, unless
    it was enqueued with widths)."""
    a = trial.user_attrs
    if START_SPEC_ATTR in a and not a.get(START_IN_SPACE_ATTR):
        return Spec.parse(a[START_SPEC_ATTR])
    spec = space.sample(trial, shape=edge and START_SPEC_ATTR not in a and not enqueued_widths(trial))
    assert START_SPEC_ATTR not in a or str(spec) == a[START_SPEC_ATTR], (spec, a[START_SPEC_ATTR])
    return spec
