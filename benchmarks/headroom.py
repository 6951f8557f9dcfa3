"""The headroom: how much better than the hand-made network can any student of the budget be?

    python -m benchmarks.headroom --budget 50M [--threads 1]
    python -m benchmarks.headroom --budget latency-full [--threads 1]
    python -m benchmarks.headroom --table-only

Before a search can beat the simple rules, the students it could find must: this benchmark
retrains a fixed list of students that use at least 95% of the budget, of shapes the default
`resnet` space does not hold (deeper stages, ResNet-32/44/56-like depths, width ratios between
stages other than 2, kernels of 5, squeeze-excite, bottlenecks), with the fixed recipe of
`benchmarks.search_vs_baselines` (3 epochs, every training image, the shipped ensemble, seed 0),
and compares each on validation with the hand-made network of the same budget.

Budgets:

- `50M`: 50e6 MACs. A shape is widened to the edge: every width scaled by the largest factor
  (step 0.005, widths multiples of 4) that fits, then widths raised by 4 one at a time, the
  raise that adds most MACs first, while the student fits. The hand-made network's retrain is
  retrained here, on this machine, under the settings id of `benchmarks.search_vs_baselines`.
- `latency-full`: the fp32 latency of ResNet-20 at x1.00 widths by the committed table of
  `benchmarks.device_budgets`. The table prices only the layers it holds, so shapes here are
  ResNets of width ratio 2 (stem = first stage) of other depths: each scaled by the largest
  factor (step 0.01) the table prices within the budget. The hand-made ResNet-20 is retrained
  here too, on this machine, with the CPU settings of `device_budgets`.

Students and retrains go to `benchmarks/results/headroom.json` as they finish, so a killed run
resumes where it stopped; the order of the list is the order of what matters most.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch

from benchmarks import device_budgets, search_vs_baselines
from benchmarks.results import RESULTS, ResultsFile, machine, search_settings_id, settings_id
from benchmarks.retrains import Retrains
from benchmarks.rules import counter, hand_made
from nas_kd.core.config import SearchConfig
from nas_kd.core.errors import InputError
from nas_kd.core.units import format_count
from nas_kd.data.datasets import load_dataset
from nas_kd.nas import start
from nas_kd.nas.budget import Budget
from nas_kd.nets.arch import Spec, StageSpec
from nas_kd.nets.space import load_space
from nas_kd.nets.zoo import teacher_spec

BUDGETS = ("50M", "latency-full")
EDGE = 0.95  # a student must use at least this share of the budget


@dataclasses.dataclass(frozen=True)
class Shape:
    """A student apart from its size: per stage (block, depth, width ratio to the first stage,
    kernel, expansion, squeeze-excite); the stem is as wide as the first stage."""

    name: str
    stages: tuple[tuple[str, int, float, int, int, bool], ...]

    def at(self, width: float) -> Spec:
        """The student with a first stage `width` channels wide (every width a multiple of 4)."""
        def w(x: float) -> int:
            return max(4, round(x / 4) * 4)
        stages = tuple(StageSpec(block, depth, w(width * ratio), 1 if i == 0 else 2, kernel, expand, se)
                       for i, (block, depth, ratio, kernel, expand, se) in enumerate(self.stages))
        return Spec(w(width), stages)


def resnet(depths: tuple[int, int, int], ratio: float = 2.0, kernel: int = 3, se: bool = False,
           block: str = "basic", expand: int = 1) -> tuple[tuple[str, int, float, int, int, bool], ...]:
    """Three stages of `block`s at widths 1 : ratio : ratio^2, the first at kernel 3 and no SE."""
    return tuple((block, d, ratio ** i, 3 if i == 0 else kernel, expand, se and i > 0) for i, d in enumerate(depths))


SHAPES_MACS = [
    Shape("ResNet-32 (5,5,5)", resnet((5, 5, 5))),
    Shape("ResNet-26 (4,4,4)", resnet((4, 4, 4))),
    Shape("ResNet-20, ratio 1.5", resnet((3, 3, 3), 1.5)),
    Shape("(2,4,6), ratio 2", resnet((2, 4, 6))),
    Shape("(6,4,2), ratio 2", resnet((6, 4, 2))),
    Shape("ResNet-20, k5 in stages 2-3", resnet((3, 3, 3), kernel=5)),
    Shape("ResNet-44 (7,7,7)", resnet((7, 7, 7))),
    Shape("ResNet-32, ratio 1.5", resnet((5, 5, 5), 1.5)),
    Shape("ResNet-20, SE in stages 2-3", resnet((3, 3, 3), se=True)),
    Shape("(1,3,5), ratio 2", resnet((1, 3, 5))),
    Shape("ResNet-20, ratio 2.5", resnet((3, 3, 3), 2.5)),
    Shape("bottleneck e2 (3,3,3)", resnet((3, 3, 3), block="bottleneck", expand=2)),
    Shape("ResNet-14 (2,2,2)", resnet((2, 2, 2))),
    Shape("ResNet-56 (9,9,9)", resnet((9, 9, 9))),
    Shape("ResNet-20, ratio 1 (one width)", resnet((3, 3, 3), 1.0)),
    Shape("(3,5,3), ratio 1.75", resnet((3, 5, 3), 1.75)),
    Shape("bottleneck e4 (4,4,4)", resnet((4, 4, 4), block="bottleneck", expand=4)),
    Shape("(4,6,2), ratio 1.5, k5", resnet((4, 6, 2), 1.5, kernel=5)),
]
# the table prices the hand-made ResNets' layers: width ratio 2, kernel 3, basic blocks; depth is free
SHAPES_LATENCY = [Shape(f"ResNet {d}", resnet(d)) for d in [
    (3, 3, 3), (5, 5, 5), (4, 4, 4), (2, 2, 2), (6, 4, 2), (2, 4, 6), (7, 7, 7), (1, 3, 5), (5, 3, 1), (3, 5, 7),
    (4, 3, 2), (2, 3, 4), (3, 3, 6), (6, 3, 3), (9, 9, 9), (1, 1, 1), (4, 4, 2), (2, 6, 2)]]


def widen_macs(shape: Shape, fits: Callable[[Spec], bool], macs: Callable[[Spec], int]) -> Spec:
    """`shape` at the largest first-stage width that fits (step 0.5 channels), then each width raised
    by 4 while the student fits, the raise that adds most MACs first."""
    lo, hi = 0, 8  # half-channels: lo fits (0 = none), hi does not; doubled first, so no huge network is built
    while fits(shape.at(hi / 2)):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(shape.at(mid / 2)) else (lo, mid)
    if lo == 0:
        raise SystemExit(f"no width of {shape.name} fits")
    spec = shape.at(lo / 2)
    while True:
        raised = [Spec(spec.stem + 4, spec.stages)] + [
            Spec(spec.stem, spec.stages[:i] + (dataclasses.replace(s, width=s.width + 4),) + spec.stages[i + 1:])
            for i, s in enumerate(spec.stages)]
        fitting = [r for r in raised if fits(r)]
        if not fitting:
            return spec
        spec = max(fitting, key=lambda r: (macs(r), str(r)))


def widen_table(shape: Shape, latency: Callable[[Spec], float], limit: float) -> Spec:
    """`shape` built on ResNet-20's widths (16 : 32 : 64) scaled by the largest factor (step 0.01)
    whose every layer the table prices within `limit` ms."""
    base = teacher_spec("resnet20")
    deep = Spec(base.stem, tuple(dataclasses.replace(s, depth=d[1]) for s, d in zip(base.stages, shape.stages)))
    for k in range(start.WIDTH_STEPS, 0, -1):
        spec = start.scaled(deep, k / 100)
        try:
            if latency(spec) <= limit:
                return spec
        except InputError:
            continue
    raise SystemExit(f"no width of {shape.name} is priced within {limit} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=BUDGETS, default="50M")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="retrain only the first N students (0: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--results", type=Path, default=RESULTS / "headroom.json")
    parser.add_argument("--table-only", action="store_true", help="retrain nothing: the tables of the results")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = ResultsFile(args.results)
    for name in [] if args.table_only else [args.budget]:
        run(name, args.seed, args.limit, results)
    for name in BUDGETS:
        print_table(name, args.seed, results)
    return 0


def run(name: str, seed: int, limit: int, results: ResultsFile) -> None:
    dataset = load_dataset(SearchConfig().dataset)
    cost = counter(dataset.input_shape, dataset.num_classes)
    if name == "50M":
        budget = Budget(macs=50_000_000)
        base = SearchConfig(flops_budget=budget.macs, cache_dir=search_vs_baselines.CACHE_DIR)
        # the settings id of search_vs_baselines, whose hand-made retrain is the reference
        sid = settings_id({"dataset": dataset.fingerprint(), "config": search_vs_baselines.config_json(base),
                           "methods": "v1"})
        reference = hand_made(budget, dataset)
        students = [(s.name, widen_macs(s, lambda spec: budget.fits(cost(spec)), lambda spec: cost(spec).macs))
                    for s in SHAPES_MACS]

        def share(spec: Spec) -> float:
            return cost(spec).macs / budget.macs
        reference_results = ResultsFile(RESULTS / "search_vs_baselines.json")
    else:
        table = device_budgets.make_table(ResultsFile(RESULTS / "device_budgets.json"), load_space(device_budgets.SPACE),
                                          Path("studies/bench-device-budgets/table"))
        budget = device_budgets.budget_of(name, table)
        base = SearchConfig(cache_dir="studies/cache")
        sid = search_settings_id(base, "cpu")
        reference = device_budgets.hand_made(budget, table)["hand-made resnet20"]
        students = [(s.name, widen_table(s, table.predict, budget.latency_ms)) for s in SHAPES_LATENCY]

        def share(spec: Spec) -> float:
            return table.predict(spec) / budget.latency_ms
        reference_results = results
    results.put("students", name, {"budget": str(budget), "reference": str(reference), "sid": sid,
                                   "students": [{"shape": n, "spec": str(s), "macs": cost(s).macs,
                                                 "params": cost(s).params, "share": round(share(s), 4)}
                                                for n, s in students]})
    print(f"{name}: {budget}; hand-made {reference}; {machine()}", flush=True)
    for n, s in students:
        print(f"  {n}: {s} {format_count(cost(s).macs)} MACs, {share(s):.1%} of the budget", flush=True)
    # the reference first (recorded elsewhere at 50M), then the students in the list's order
    retrained = Retrains(results, base, sid, with_cost=True)
    if Retrains(reference_results, base, sid).get(reference, seed) is None:
        retrained(reference, seed, dataset, f"{name} hand-made")
    for n, s in students[:limit or None]:
        if share(s) < EDGE:
            print(f"  {n}: {s} uses {share(s):.1%} of the budget, under {EDGE:.0%}: not retrained", flush=True)
            continue
        r = retrained(s, seed, dataset, f"{name} {n}")
        print(f"  {name} {n}: val {r['val_acc']:.4f} test {r['test_acc']:.4f}", flush=True)


def print_table(name: str, seed: int, results: ResultsFile) -> None:
    entry = results.get("students", name)
    if entry is None:
        return
    sid, reference = entry["sid"], entry["reference"]
    ref = results.get("retrains", f"{reference}|{seed}|{sid}") or ResultsFile(
        RESULTS / "search_vs_baselines.json").get("retrains", f"{reference}|{seed}|{sid}")
    rows: list[tuple[str, str, float, dict[str, Any]]] = []
    for s in entry["students"]:
        r = results.get("retrains", f"{s['spec']}|{seed}|{sid}")
        if r is not None and s["spec"] != reference:  # the hand-made network itself is the reference
            rows.append((s["shape"], s["spec"], s["share"], r))
    print(f"\n{name} ({entry['budget']}), seed {seed}: hand-made {reference}: "
          + (f"val {ref['val_acc'] * 100:.2f}, test {ref['test_acc'] * 100:.2f}" if ref else "not retrained yet"))
    print("| shape | spec | share of budget | val acc | val - hand-made | test acc |")
    print("|---|---|---|---|---|---|")
    for shape, spec, share, r in sorted(rows, key=lambda row: -row[3]["val_acc"]):
        gain = f"{(r['val_acc'] - ref['val_acc']) * 100:+.2f}" if ref else "-"
        print(f"| {shape} | `{spec}` | {share:.1%} | {r['val_acc'] * 100:.2f} | {gain} | {r['test_acc'] * 100:.2f} |")
    if ref and rows:
        gains = [(r["val_acc"] - ref["val_acc"]) * 100 for *_, r in rows]
        print(f"{sum(g > 0 for g in gains)} of {len(gains)} students above the hand-made network on validation; "
              f"best {max(gains):+.2f}, median {statistics.median(gains):+.2f} points")


if __name__ == "__main__":
    raise SystemExit(main())
