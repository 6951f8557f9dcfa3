"""The proof of the budget's edge: does the search at the edge pick better students than the simple rules?

    python -m benchmarks.budget_edge --cells 50M --seeds 0 [--methods edge random-edge] [--threads 1]
    python -m benchmarks.budget_edge --table-only

Cells (Fashion-MNIST, 1x28x28, 10 classes): `5M` and `50M` MACs, and `mcu-48KB` (48,000 bytes of
peak int8 activations and 250K parameters, as in `benchmarks.device_budgets`). The two latency
cells of `device_budgets` are judged by its committed table, which prices only the layers of the
`resnet-v1` space and the hand-made family: the ranged `resnet` space (widths on a grid of 4)
holds layers no table can list in full, so those cells are not run here (see BENCHMARKS.md).

Methods, each picking one student per cell and seed:

- edge: `nas_kd.search` at its defaults (the `resnet` space, `--budget-edge on`) as they were before
  the family's depth cap (`--edge-depth free`: every method here but edge-family and random-family), its winner;
- random-edge: the same with `--sampler random` (random shapes at the edge: same trials, same score);
- off: today's search before the edge, `--budget-edge off --search-space resnet-v1`, its winner;
- largest: of 200 seeded random specs of `resnet-v1` that fit, the one with the most MACs (the
  rule as `search_vs_baselines` measured it);
- hand-made: `nas_kd.nas.start.hand_made` (the deepest ResNet at 0.45 of its widths or more, scaled
  to fit; the 5M picks of before 2026-12-08, ResNet-8 at x0.68 by the deepest at half width or
  more, are kept under `picks-superseded`);
- edge-min16: the edge search with `--edge-min-width 16` as it first was (a stage narrower than 16
  channels gave up blocks for width, but not a stage already one block deep, nor for a narrow
  stem), its winner; its picks are kept, the rule that made them is gone;
- edge-width16: the edge search with `--edge-min-width 16` as it is (no width, the stem's included,
  under 16 channels while any stage can give up a block; a narrow stage gives first, else the
  deepest stage), its winner;
- edge-width16-finalists: the 3 best students by trial score of edge-width16's study (run first,
  in the same `--work`), each retrained with the fixed recipe, the one of best validation accuracy
  kept: `--finalists 3`, retrain for retrain what hand-made-best spends;
- edge-family / random-family: the edge search, and random shapes at the edge, with `--edge-depth
  family` (depths drawn no deeper than the hand-made ResNet's: 2 blocks a stage at 5M, by the rule
  of then, the deepest with 8 channels or more, and by today's), their winners;
- edge-depth3: the edge search with `--edge-depth 3` (at most 3 blocks a stage, the depth of
  ResNet-20, the hand-made pick at 50M, where the family sets no cap), its winner;
- hand-made-best: the hand-made family's best on validation: ResNet-20, -14 and -8 each scaled to
  the largest width that fits (`nas_kd.nas.start.family`, at any width), each retrained with the fixed recipe, the
  one of best validation accuracy kept (a person who trains all three);
- edge-v1: the edge search in the `resnet-v1` space (`--search-space resnet-v1`; widths 16-128 from
  three listed values a stage, depths of at most 2, 3 and 3), its winner: the edge without the ranged
  space's narrow and deep shapes;
- edge-shallow: the edge search in `benchmarks/spaces/resnet-shallow.yaml` (the ranged space's
  widths, resnet-v1's depths), its winner: which of the two the ranged space loses by;
- edge-params: the edge search with `--trial-score params` and PARAMS_TRIALS trials (no training:
  at equal MACs the parameter count ranked 16 students at the edge of 5M better than any trial
  score, Spearman 0.83 against 0.08 for the default; BENCHMARKS.md), its winner;
- edge-raw: the edge search with `--bn-recalibration 0` (its trials scored with BatchNorm's running
  statistics as trained, which ranked 16 students at the edge of 5M at Spearman 0.56 against the
  recalibrated default's 0.08), its winner.

Every pick is retrained with the fixed recipe of `benchmarks.search_vs_baselines` (3 epochs, every
training image, the shipped ensemble, seed S) and tested once; the table reads validation first,
and nothing is chosen on the test set. Picks and retrains go to
`benchmarks/results/budget_edge.json` as they finish, so a killed run resumes; retrains of the
same spec, seed and settings recorded by `search_vs_baselines`, `device_budgets` or `headroom`
are adopted instead of run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import optuna
import torch

from benchmarks import search_vs_baselines
from benchmarks.results import RESULTS, ResultsFile, machine, search_settings_id, settings_id
from benchmarks.retrains import Retrains
from benchmarks.rules import counter, hand_made, largest, search_pick
from benchmarks.stats import mean_sd
from nas_kd.core.config import SearchConfig
from nas_kd.core.units import format_count
from nas_kd.data.datasets import Dataset, load_dataset
from nas_kd.device.memory import peak_activations
from nas_kd.nas import start
from nas_kd.nas.budget import Budget
from nas_kd.nas.picks import finalists
from nas_kd.nas.records import SPEC_ATTR
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.cost import Cost
from nas_kd.nets.space import load_space

CELLS = {"5M": Budget(macs=5_000_000), "50M": Budget(macs=50_000_000), "mcu-48KB": Budget(params=250_000, memory=48_000)}
METHODS = ("edge", "random-edge", "off", "largest", "hand-made", "hand-made-best", "edge-min16", "edge-v1",
           "edge-shallow", "edge-params", "edge-raw", "edge-width16", "edge-width16-finalists", "edge-family", "random-family",
           "edge-depth3")
# how a search at the edge draws a shape's widths and fills them to the budget: "proportions-lag"
# (each stage's width against the one before, SearchSpace.sample(shape=True); single raises of the
# width furthest behind them). The first cell's pick (widths drawn apart, raises by the budget
# alone) is kept under a key without this suffix
SHAPES = "proportions-lag"
EDGE_METHODS = ("edge", "random-edge", "edge-min16", "edge-v1", "edge-shallow", "edge-params", "edge-raw",
                "edge-width16", "edge-width16-finalists", "edge-family", "random-family", "edge-depth3")
FINALISTS = 3  # the -finalists methods: as many retrains as hand-made-best's family
PARAMS_TRIALS = 100  # a params trial trains nothing: about a second each at 5M
SHALLOW = Path(__file__).resolve().parent / "spaces" / "resnet-shallow.yaml"
ADOPT_FROM = ("search_vs_baselines.json", "device_budgets.json", "headroom.json")


def cell_config(budget: Budget, seed: int) -> SearchConfig:
    """The cell's search settings; depths drawn free (`--edge-depth free`, the default before the
    family's cap) for every method but edge-family and random-family, as their picks were made."""
    return SearchConfig(flops_budget=budget.macs, params_budget=budget.params, memory_budget=budget.memory, seed=seed,
                        cache_dir=search_vs_baselines.CACHE_DIR, onnx=False, edge_depth="free")


def retrain_sid(name: str, dataset: Dataset) -> str:
    """The settings id of the cell's retrains: search_vs_baselines' for a MACs budget, device_budgets'
    (CPU) for the others, so that the retrains they recorded are the same ones."""
    if CELLS[name].macs is not None:
        base = SearchConfig(flops_budget=CELLS[name].macs, cache_dir=search_vs_baselines.CACHE_DIR)
        return settings_id({"dataset": dataset.fingerprint(), "config": search_vs_baselines.config_json(base),
                            "methods": "v1"})
    return search_settings_id(SearchConfig(cache_dir=search_vs_baselines.CACHE_DIR), "cpu")


def adopt(results: ResultsFile, sid: str) -> None:
    """Copy into `results` the retrains of settings `sid` that the other benchmarks recorded."""
    for name in ADOPT_FROM:
        other = ResultsFile(RESULTS / name)
        for key, entry in other.data.get("retrains", {}).items():
            if key.endswith(f"|{sid}") and results.get("retrains", key) is None:
                results.put("retrains", key, entry)


def pick_key(name: str, method: str, seed: int, sid: str) -> str:
    """A pick's key in the results; the searches at the edge are keyed by how their shapes' widths
    are drawn (SHAPES), so that a pick made before a change is kept beside, not read as, the new one."""
    return f"{name}|{method}|{seed}|{sid}" + (f"|{SHAPES}" if method in EDGE_METHODS else "")


def cost_of(spec: Spec, dataset: Dataset) -> Cost:
    model = build(spec, dataset.input_shape, dataset.num_classes, channels_last=False)
    cost = counter(dataset.input_shape, dataset.num_classes)(spec)
    return dataclasses.replace(cost, memory=peak_activations(model, dataset.input_shape))


def pick(method: str, name: str, seed: int, dataset: Dataset, work: Path,
         retrained: Retrains) -> tuple[Spec, dict[str, Any]]:
    budget, cfg = CELLS[name], cell_config(CELLS[name], seed)
    if method.endswith("-finalists"):
        searched = method.removesuffix("-finalists")
        db = work / name / searched / f"search-seed{seed}.db"
        if not db.exists():
            raise SystemExit(f"{method}: no study of {searched} for seed {seed} in {db.parent}; run {searched} first")
        study = optuna.load_study(study_name=f"search-seed{seed}", storage=f"sqlite:///{db}")
        specs = [Spec.parse(t.user_attrs[SPEC_ATTR]) for t in finalists(study, FINALISTS)]
        val = {str(spec): retrained(spec, seed, dataset, f"{name} seed {seed} {method}")["val_acc"] for spec in specs}
        best = max(specs, key=lambda spec: val[str(spec)])  # ties: the better trial score (finalists' order)
        return best, {"finalists_val_acc": val}
    if method == "hand-made-best":
        members = {member: found for member, found in start.family(budget, dataset.input_shape,
                                                                   dataset.num_classes).items()
                   if member in start.HAND_MADE_BASES}
        val = {member: retrained(spec, seed, dataset, f"{name} seed {seed} {member}")["val_acc"]
               for member, (spec, _) in members.items()}
        best = max(val, key=lambda member: (val[member], member))
        return members[best][0], {"member": best, "members_val_acc": val}
    if method == "largest":
        return largest(load_space("resnet-v1"), budget, seed, lambda s: cost_of(s, dataset)), {}
    if method == "hand-made":
        return hand_made(budget, dataset), {}
    if method == "off":
        cfg = dataclasses.replace(cfg, budget_edge="off", search_space="resnet-v1")
    if method in ("edge-min16", "edge-width16"):
        cfg = dataclasses.replace(cfg, edge_min_width=16)
    if method in ("edge-family", "random-family"):
        cfg = dataclasses.replace(cfg, edge_depth="family")
    if method == "edge-depth3":
        cfg = dataclasses.replace(cfg, edge_depth="3")
    if method == "edge-v1":
        cfg = dataclasses.replace(cfg, search_space="resnet-v1")
    if method == "edge-shallow":
        cfg = dataclasses.replace(cfg, search_space=str(SHALLOW))
    if method == "edge-raw":
        cfg = dataclasses.replace(cfg, bn_recalibration=0)
    if method == "edge-params":
        return search_pick("params", dataclasses.replace(cfg, trials=PARAMS_TRIALS), work / name / method)
    return search_pick("random" if method in ("random-edge", "random-family") else "search", cfg, work / name / method)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--work", type=Path, default=Path("studies/bench-budget-edge"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--results", type=Path, default=RESULTS / "budget_edge.json")
    parser.add_argument("--table-only", action="store_true", help="pick and retrain nothing: the tables")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = ResultsFile(args.results)
    dataset = load_dataset(SearchConfig().dataset)
    print(machine(), flush=True)
    for name in args.cells:
        sid = retrain_sid(name, dataset)
        adopt(results, sid)
        retrained = Retrains(results, dataclasses.replace(cell_config(CELLS[name], 0), onnx=True), sid, with_cost=True)
        for seed in [] if args.table_only else args.seeds:
            for method in args.methods:
                key = pick_key(name, method, seed, sid)
                if results.get("picks", key) is None:
                    started = time.perf_counter()
                    spec, extra = pick(method, name, seed, dataset, args.work, retrained)
                    results.put("picks", key, {"cell": name, "method": method, "seed": seed, "spec": str(spec),
                                               "pick_seconds": round(time.perf_counter() - started, 1), **extra,
                                               "machine": machine()})
                spec = Spec.parse(results.get("picks", key)["spec"])
                r = retrained(spec, seed, dataset, f"{name} seed {seed} {method}")
                print(f"  {name} seed {seed} {method}: {spec} val {r['val_acc']:.4f} test {r['test_acc']:.4f}",
                      flush=True)
        print_table(name, args.seeds, args.methods, results, sid, dataset)
    return 0


def print_table(name: str, seeds: list[int], methods: list[str], results: ResultsFile, sid: str,
                dataset: Dataset) -> None:
    budget = CELLS[name]
    print(f"\n| method ({name}: {budget}) | seeds | val acc | test acc | MACs | share of the binding bound |")
    print("|---|---|---|---|---|---|")
    for method in methods:
        rows = []
        for seed in seeds:
            p = results.get("picks", pick_key(name, method, seed, sid))
            r = p and results.get("retrains", f"{p['spec']}|{seed}|{sid}")
            if r:
                rows.append((r["val_acc"], r["test_acc"], budget.use(cost_of(Spec.parse(p["spec"]), dataset)),
                             r.get("macs", 0)))
        if rows:
            print(f"| {method} | {len(rows)} | {mean_sd([r[0] for r in rows])} | {mean_sd([r[1] for r in rows])} | "
                  f"{format_count(statistics.mean(r[3] for r in rows))} | "
                  f"{statistics.mean(r[2] for r in rows):.1%} |", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
