"""Budgets: upper bounds on what a student may cost (a run's is built once, by
`pipeline.phases.budget_of`), and the checks a search makes of a budget before any training (can
the space meet it, how far below it is the floor, does it admit students larger than the teachers)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nas_kd.core.errors import InputError
from nas_kd.core.units import format_count
from nas_kd.device.memory import peak_activations
from nas_kd.nets.arch import Spec
from nas_kd.nets.cost import Cost
from nas_kd.nets.space import SearchSpace
from nas_kd.nets.zoo import teacher_cost


@dataclass(frozen=True)
class Budget:
    """Upper bounds on MACs, parameters, latency (ms) and peak int8 activation memory (bytes);
    None = unbounded."""

    macs: int | None = None
    params: int | None = None
    latency_ms: float | None = None
    memory: int | None = None

    def violations(self, cost: Cost) -> dict[str, float]:
        """Relative excess per bound, Optuna's convention: <= 0 is feasible, 0.25 is 25% over."""
        out = {}
        for key in ("macs", "params", "latency_ms", "memory"):
            limit = getattr(self, key)
            if limit is not None:
                value = getattr(cost, key)
                # None: not measured, because another bound already rejects the spec
                out[key] = 0.0 if value is None else value / limit - 1.0
        return out

    def excess(self, cost: Cost) -> str:
        """The bounds `cost` breaks, e.g. 'macs 61.2M > 50M, latency_ms 2.31 > 2'."""
        def text(key: str, value: float) -> str:
            return f"{value:.4g}" if key == "latency_ms" else format_count(value)

        return ", ".join(f"{k} {text(k, getattr(cost, k))} > {text(k, getattr(self, k))}"
                         for k, v in self.violations(cost).items() if v > 0)

    def fits(self, cost: Cost) -> bool:
        return all(v <= 0 for v in self.violations(cost).values())

    def use(self, cost: Cost) -> float | None:
        """`cost`'s largest share of a bound (0.5: half of the one it comes closest to), over every
        bound whose figure is known (latency and memory may not be); None when there is none.
        What the budget floor reads: a student that nearly meets its latency bound uses its
        budget, however few MACs it has."""
        shares = [value / limit for key in ("macs", "params", "latency_ms", "memory")
                  if (limit := getattr(self, key)) is not None and (value := getattr(cost, key)) is not None]
        return max(shares) if shares else None

    def __str__(self) -> str:
        parts = []
        if self.macs is not None:
            parts.append(f"MACs <= {format_count(self.macs)}")
        if self.params is not None:
            parts.append(f"params <= {format_count(self.params)}")
        if self.latency_ms is not None:
            parts.append(f"latency <= {self.latency_ms:.4g} ms")
        if self.memory is not None:
            parts.append(f"peak int8 activations <= {format_count(self.memory)}B")
        return ", ".join(parts) or "unbounded"


def floor_shortfall(budget: Budget, cost: Cost, floor: float) -> float | None:
    """How far `cost` falls short of the budget floor, Optuna's convention: <= 0 meets it, 0.25
    is a quarter of the floor short; None when there is no floor, or no bound with a known figure."""
    use = budget.use(cost)
    return None if not floor or use is None else 1.0 - use / floor


LATENCY_PROBES = 8  # random specs timed before a search with a latency budget (besides the smallest ones)
TABLE_PROBES = 500  # random specs predicted from a latency table for the same check


def check_reachable(budget: Budget, space: SearchSpace, input_shape: tuple[int, int, int], num_classes: int,
                    latency: Callable[[Spec], float] | None = None, seed: int = 0, table: bool = False,
                    precision: str = "fp32") -> None:
    """Before any training, the one check that the space can meet `budget`: its smallest specs by
    MACs and by params must meet those bounds; a memory bound below the space's least peak
    (`SearchSpace.least_peak`, exact) is refused, as is a latency bound that none of the space's
    smallest specs and a seeded sample of others meets (by `latency`, measured or from a `table`),
    naming the best spec found. The specs are timed smallest first, and the check ends at the
    first that meets the budget (each measured spec costs an export and a timing, 2-3 s)."""
    (min_macs_spec, min_macs), (min_params_spec, min_params) = space.smallest(input_shape, num_classes)
    if (budget.macs is not None and min_macs.macs > budget.macs) or (
            budget.params is not None and min_params.params > budget.params):
        raise InputError(f"no student of search space {space.name!r} fits {budget}: the smallest reach "
                         f"{format_count(min_macs.macs)} MACs ({min_macs_spec}) and {format_count(min_params.params)} "
                         f"params at input {'x'.join(map(str, input_shape))}; raise the budget or use another space")
    if budget.memory is not None:
        spec, peak = space.least_peak(input_shape, num_classes, peak_activations)
        if peak > budget.memory:
            raise InputError(f"no student of search space {space.name!r} meets --memory-budget "
                             f"{format_count(budget.memory)}B: its lowest peak int8 activation memory is "
                             f"{format_count(peak)}B, by {spec}; raise the budget or use a smaller space")
    if budget.latency_ms is not None and latency is not None:
        probes = TABLE_PROBES if table else LATENCY_PROBES
        specs = list(dict.fromkeys([min_macs_spec, min_params_spec] + space.random_specs(probes, seed)))
        timed = []
        for spec in specs:
            timed.append((latency(spec), str(spec)))
            if timed[-1][0] <= budget.latency_ms:
                return
        best = min(timed)
        raise InputError(f"no student of search space {space.name!r} meets --latency-budget "
                         f"{budget.latency_ms:.4g} ms: the lowest {precision} latency of "
                         f"{len(specs)} specs tried (the smallest and {probes} random ones) is {best[0]:.4g} ms, "
                         f"by {best[1]}; raise the budget or use a smaller space")


def effective_floor(share: float, budget: Budget, space: SearchSpace, input_shape: tuple[int, int, int],
                    num_classes: int) -> tuple[float, str]:
    """The budget floor a search applies, and one line saying so ("" when `share` is 0). 0 without a MACs or params
    bound (nothing cheap tells how much of a latency bound the space reaches). `share` of the
    budget when the space's largest student (`SearchSpace.largest`) uses at least that much of its
    MACs or params bound; else `share` of what that student uses, so that a budget beyond the
    space still trains its larger students instead of rejecting every one."""
    if not share:
        return 0.0, ""
    if budget.macs is None and budget.params is None:
        return 0.0, "budget floor: none, as the budget has no MACs or params bound"
    _, cost = space.largest(input_shape, num_classes)
    reach = budget.use(Cost(cost.macs, cost.params))
    if reach >= share:
        return share, (f"budget floor: students using less than {share:.0%} of every bound of the budget are not "
                       "trained (--budget-floor)")
    floor = share * reach
    return floor, (f"budget floor: the space's largest student uses {reach:.0%} of the budget, so the floor is "
                   f"{share:.0%} of that, {floor:.1%} of the budget (--budget-floor)")


def budget_warning(budget: Budget, teachers: list[str], input_shape: tuple[int, int, int],
                   num_classes: int, others: dict[str, Cost] | None = None) -> str | None:
    """One line when the budget admits students larger than the largest teacher (then some
    students would not compress it), naming both costs; None when every student is smaller.
    `others`: the costs of teachers outside the zoo (files), by name."""
    costs = {name: teacher_cost(name, input_shape, num_classes) for name in teachers} | (others or {})
    if not costs:
        return None
    over = []
    for kind, limit in (("macs", budget.macs), ("params", budget.params)):
        name = max(costs, key=lambda n: getattr(costs[n], kind))
        if limit is not None and limit > getattr(costs[name], kind):
            unit = "MACs" if kind == "macs" else "params"
            over.append(f"{format_count(limit)} {unit} > teacher {name}'s {format_count(getattr(costs[name], kind))}")
    if not over:
        return None
    return ("warning: the budget admits students larger than the largest teacher (" + "; ".join(over) +
            "): those would not compress it; lower the budget or use larger --teachers")
