"""Candidates at the budget's edge: a sampled shape's widths scaled to the largest that fit every
bound of the budget, so that trials compare designs at equal cost.

A search whose proposals use 50-80% of the budget ranks students by size more than by design: a
brief trial scores a larger student higher, and the largest spec that fits beat the search under
every budget tried. TuNAS (Bender et al., CVPR 2020) and MCUNet's TinyNAS (Lin et al., NeurIPS
2020) keep candidates at the target cost instead. Here the sampler draws a shape (per stage the
block, depth, kernel, expansion, squeeze-excite, and the widths, whose proportions are what the
shape keeps), and `repair` scales every width by one factor (widths rounded to multiples of 4,
then to the greatest width the space allows at or under it: a range's grid, or a listed width) to
the largest that meets every bound
(MACs, params, peak int8 memory, latency measured or from a table), then raises single widths by
one step (4 channels on a grid, the next listed width), the width furthest behind the shape's
proportions first, while one fits and the student uses less than
`EDGE_SHARE` of its binding bound (few raises, so the shape's proportions stay). Optuna models the shape; the repaired spec is the trial's.

A shape that cannot reach the budget even at the space's greatest widths is trained there and
recorded as such (`Repair.at_largest`); one that does not fit even at the least widths is left
to the budget check, which rejects it.

Depth for width (`min_width`, `--edge-min-width`): under a small budget a deep shape scaled to the
edge comes out a few channels wide (at 5M MACs, stages of 4-8 channels with 3-5 blocks each:
most of the shapes drawn). With a minimum width, a student whose stem or any stage comes out
narrower gives up one block and the shape is repaired again: a narrow stage gives it if it can
(the deepest such stage; of equal ones, the first), else the deepest stage of all, since one
factor scales every width and a block given up anywhere widens them all. That ends when no width
is under the minimum or every stage is at the space's least depth: a narrow student is a shallow
one, as compound scaling (Tan & Le, EfficientNet, ICML 2019) keeps depth and width in step. A
width the space cannot reach (a minimum above the greatest the stem or a stage allows) counts as
met at that greatest width: no block given up would widen it further.
Optuna still models the shape drawn; the trial records the blocks given up (`Repair.depth_given`).

Depth drawn with the budget in view (`capped`, `--edge-depth family`): before the repair, each
stage's depth drawn is mapped onto the space's depths up to a cap, the k-th of the space's n
depths onto the (k * m // n)-th of the m at or under the cap, so that every depth under the cap
stays about as likely. The cap comes from the hand-made family (`nas_kd.nas.start.depth_cap`),
or is given (`--edge-depth N`: N blocks a stage).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from nas_kd.nas.budget import Budget
from nas_kd.nets.arch import Spec
from nas_kd.nets.cost import Cost
from nas_kd.nets.space import SearchSpace

EDGE_SHARE = 0.95  # a repaired student uses at least this share of its binding bound (DESIGN: the budget edge)
STEP = 0.01  # of the factor the widths are scaled by
WIDTH_GRID = 4  # widths are multiples of this
EDGE_DEPTHS = ("free", "family")  # --edge-depth: depths as the space allows, or capped by the hand-made family
# the version of `repair`'s depth for width, recorded with a study made with a minimum width (its
# trials would not match another's): 1, only a narrow stage gave up blocks, and not one already at
# its least depth, nor for a narrow stem; 2, the stem counted, and the deepest stage gave when no
# narrow one could; 3, a minimum above a width's greatest allowed met there
MIN_WIDTH_RULE = 3


@dataclasses.dataclass(frozen=True)
class Repair:
    spec: Spec  # the student trained
    cost: Cost  # its cost, every bounded figure priced
    factor: float  # the widths' scale against the shape drawn
    share: float | None  # budget.use(cost): its largest share of a bound
    at_largest: bool  # the shape reached the space's greatest widths before the budget
    depth_given: int = 0  # blocks the shape gave up for width (`min_width`)


def allowed(space: SearchSpace) -> tuple[tuple[int, ...], ...]:
    """The widths the space allows for the stem and each stage, ascending (a range's whole grid)."""
    return (tuple(sorted(space.stem)), *(tuple(sorted(st.width)) for st in space.stages))


def _snap(width: float, choices: tuple[int, ...]) -> int:
    """The greatest allowed width at or under `width` (the least when none is): a width of the
    space, so that a latency table of a space of listed widths prices every repaired student."""
    under = [c for c in choices if c <= width]
    return under[-1] if under else choices[0]


def scaled(shape: Spec, factor: float, widths: tuple[tuple[int, ...], ...]) -> Spec:
    """`shape` with the stem's and every stage's width times `factor`, each rounded to the nearest
    multiple of WIDTH_GRID and then to the greatest width of the space at or under it (`allowed`)."""
    def width(w: int, choices: tuple[int, ...]) -> int:
        return _snap(max(WIDTH_GRID, round(w * factor / WIDTH_GRID) * WIDTH_GRID), choices)
    return Spec(width(shape.stem, widths[0]),
                tuple(dataclasses.replace(s, width=width(s.width, c)) for s, c in zip(shape.stages, widths[1:])),
                shape.head)


def repair(shape: Spec, space: SearchSpace, budget: Budget, price: Callable[[Spec], Cost], fill: bool = True,
           min_width: int = 0) -> Repair:
    """`shape` scaled to the budget's edge (see the module's docstring). `price(spec)` gives every
    figure the budget bounds; it is called once per distinct spec. The same shape, budget and
    prices always give the same spec. `fill`: raise single widths after the common scaling (off
    where each price is a latency measured here, seconds each). `min_width`: a shape whose repaired
    stages are narrower gives up depth for width (0: never)."""
    prices: dict[Spec, Cost] = {}

    def cost(spec: Spec) -> Cost:
        if spec not in prices:
            prices[spec] = price(spec)
        return prices[spec]

    least = [min(st.depth) for st in space.stages]
    floors = [min(min_width, c[-1]) for c in allowed(space)]  # the minimum, where the space can reach it
    given = 0
    while True:
        fixed = _scale_to_edge(shape, space, budget, cost, fill)
        # the stages that can give up a block; a narrow one gives first (a shape too deep to fit even at
        # the least widths gives up depth too: its widths are the least)
        givers = [i for i, (s, d) in enumerate(zip(fixed.spec.stages, least)) if s.depth > d]
        if not givers or all(w >= f for w, f in zip(_widths(fixed.spec), floors)):
            return dataclasses.replace(fixed, depth_given=given)
        narrow = [i for i in givers if fixed.spec.stages[i].width < floors[i + 1]]
        i = max(narrow or givers, key=lambda k: (shape.stages[k].depth, -k))  # the deepest; of equal ones, the first
        shape = _with_stage(shape, i, depth=shape.stages[i].depth - 1)
        given += 1


def _scale_to_edge(shape: Spec, space: SearchSpace, budget: Budget, cost: Callable[[Spec], Cost],
                   fill: bool) -> Repair:
    """`repair` of one shape, its depths as drawn."""
    widths = allowed(space)

    def fits(k: int) -> bool:
        return budget.fits(cost(scaled(shape, k * STEP, widths)))

    widest = widest_factor(shape, widths)
    top = max(1, round(widest / STEP))
    # lo fits (0: nothing checked fits), hi does not (top + 1: everything up to top fits); from the
    # shape's own widths out, doubling, so that no network far over the budget is ever built
    start = min(round(1 / STEP), top)
    if fits(start):
        lo, hi = start, min(2 * start, top + 1)
        while hi <= top and fits(hi):
            lo, hi = hi, min(2 * hi, top + 1)
    else:
        lo, hi = start // 2, start
        while lo > 0 and not fits(lo):
            lo, hi = lo // 2, lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    if lo == 0:  # not even the least widths fit: the budget check rejects it as it is
        spec = scaled(shape, STEP, widths)
        return Repair(spec, cost(spec), STEP, budget.use(cost(spec)), False)
    spec = scaled(shape, lo * STEP, widths)
    drawn = _widths(shape)
    while fill and (budget.use(cost(spec)) or 0.0) < EDGE_SHARE:
        raised = [r for r in widened(spec, widths) if budget.fits(cost(r))]
        if not raised:
            break
        # the width furthest behind the shape's proportions first (its raised width over the drawn
        # one least), then the raise that uses most of the budget: a raise by the budget alone
        # widened the full-resolution stem or first stage again and again, past the stages after it
        spec = min(raised, key=lambda r: (_raised_scale(r, spec, drawn), -(budget.use(cost(r)) or 0.0), str(r)))
    share = budget.use(cost(spec))
    # every factor up to the widest fitted, and the student is still short of the edge
    at_largest = hi > top and (share or 0.0) < EDGE_SHARE
    return Repair(spec, cost(spec), round(lo * STEP, 2), share, at_largest)


def depth_setting(value: str) -> int | None:
    """`--edge-depth N`'s cap, N blocks a stage; None for "free" and "family" (the family's cap is
    priced at the budget). Raises ValueError for anything else, a number not given as a string too."""
    if value in EDGE_DEPTHS:
        return None
    if isinstance(value, str) and value.isdigit() and int(value) >= 1:
        return int(value)
    raise ValueError(f"edge_depth must be {', '.join(EDGE_DEPTHS)} or a whole number of blocks >= 1, got {value!r}")


def capped(shape: Spec, space: SearchSpace, cap: int) -> Spec:
    """`shape` with each stage's depth mapped onto the space's depths at or under `cap` (see the
    module's docstring); a stage whose depths are all over the cap keeps its least."""
    stages = []
    for s, st in zip(shape.stages, space.stages):
        depths = sorted(st.depth)
        under = [d for d in depths if d <= cap] or depths[:1]
        stages.append(dataclasses.replace(s, depth=under[depths.index(s.depth) * len(under) // len(depths)]))
    return Spec(shape.stem, tuple(stages), shape.head)


def _with_stage(spec: Spec, i: int, **changes: int) -> Spec:
    """`spec` with stage `i`'s fields changed."""
    return Spec(spec.stem, spec.stages[:i] + (dataclasses.replace(spec.stages[i], **changes),) + spec.stages[i + 1:],
                spec.head)


def _widths(spec: Spec) -> list[int]:
    return [spec.stem, *(s.width for s in spec.stages)]


def _raised_scale(raised: Spec, spec: Spec, drawn: list[int]) -> float:
    """The one width `raised` changed from `spec`, over that width in the shape drawn."""
    return next(w / d for w, was, d in zip(_widths(raised), _widths(spec), drawn) if w != was)


def widest_factor(shape: Spec, widths: tuple[tuple[int, ...], ...]) -> float:
    """The factor at which every width of `shape` has reached its greatest allowed width."""
    return max(c[-1] / w for w, c in zip(_widths(shape), widths))


def widened(spec: Spec, widths: tuple[tuple[int, ...], ...]) -> list[Spec]:
    """`spec` with one width (the stem's or a stage's) raised to the next allowed one."""
    def up(w: int, choices: tuple[int, ...]) -> int | None:
        return next((c for c in choices if c > w), None)

    out = [Spec(stem, spec.stages, spec.head)] if (stem := up(spec.stem, widths[0])) is not None else []
    for i, (s, c) in enumerate(zip(spec.stages, widths[1:])):
        if (w := up(s.width, c)) is not None:
            out.append(_with_stage(spec, i, width=w))
    return out
