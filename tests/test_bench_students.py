"""The trial-score benchmark's students at the budget's edge (`benchmarks.trial_scores --edge`): the
students the default search trains, so that its table speaks of them."""

from __future__ import annotations

from benchmarks.rules import counter, edge_specs
from nas_kd.nas.budget import Budget
from nas_kd.nas.edge import EDGE_SHARE
from nas_kd.nets.space import load_space


def test_students_at_the_edge_are_distinct_at_the_edge_and_the_same_every_time() -> None:
    space, budget = load_space("resnet"), Budget(macs=5_000_000)
    cost = counter((1, 28, 28), 10)
    drawn = edge_specs(space, budget, 4, seed=0, cost=cost)
    assert len({str(spec) for spec, _ in drawn}) == 4
    for spec, c in drawn:
        assert c == cost(spec) and budget.fits(c) and budget.use(c) >= EDGE_SHARE, (spec, c)
        space.params_of(spec)  # a student of the space
    assert [str(s) for s, _ in edge_specs(space, budget, 4, seed=0, cost=cost)] == [str(s) for s, _ in drawn]
    assert [str(s) for s, _ in edge_specs(space, budget, 4, seed=1, cost=cost)] != [str(s) for s, _ in drawn]


def test_students_at_the_edge_under_the_familys_cap_are_no_deeper_than_it() -> None:
    space, budget = load_space("resnet"), Budget(macs=5_000_000)
    cost = counter((1, 28, 28), 10)
    free = edge_specs(space, budget, 6, seed=0, cost=cost)
    capped = edge_specs(space, budget, 6, seed=0, cost=cost, cap=2)
    assert max(s.depth for spec, _ in free for s in spec.stages) > 2  # drawn free, some stage is deeper
    for spec, c in capped:
        assert max(s.depth for s in spec.stages) <= 2 and budget.use(c) >= EDGE_SHARE, spec
