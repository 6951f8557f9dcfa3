"""Search where it should pay: device budgets against scaled hand-made networks (issue 24).

    python -m benchmarks.device_budgets --seeds 0 1 2 [--threads 1]
    python -m benchmarks.device_budgets --table-only

MACs are the wrong currency on a device: per MAC, the widened ResNet-20 ran 1.6x slower than a
searched student (BENCHMARKS.md, *Start points*). This benchmark asks whether the default search
beats the simple rules a user would otherwise apply when the budget is the device's own: latency
and peak memory.

Budgets (Fashion-MNIST, 1x28x28, 10 classes), all fixed from one latency table before any pick:

- `latency-half`: fp32 latency (ONNX Runtime, batch 1, one thread) of ResNet-20 at x0.50 widths,
  as the table predicts it: the hand-made ResNets fit at about half their widths;
- `latency-full`: the same of ResNet-20 at x1.00: they fit at about full width;
- `mcu-48KB`: a Cortex-M class microcontroller, as MCUNet (Lin et al., NeurIPS 2020) frames it:
  48,000 bytes of SRAM for the peak int8 activations (`nas_kd.device.memory.peak_activations`) and
  250K parameters (int8 weights in 256KB of flash). Without the flash bound, peak memory alone
  admits students of 137M MACs, which no such device runs.

The table is made here once (`nas_kd.device.latency.export_blocks` with the hand-made family's layers
added, timed with `time_blocks.time_folder`, one thread) and kept in the results file, so every
method and every later run is judged by the same numbers.

Methods, each picking one student of the default space (`resnet`) per budget and seed:

- search: `nas_kd.search` with that budget and the table (`--latency-budget B --latency-table T`
  or `--memory-budget B`), `--final-epochs 0`, its winner;
- random: the same with `--sampler random` (same trials, same trial score);
- largest: of 200 seeded specs of the space that meet the budget, the one with the most MACs;
- hand-made: the hand-made family (`nas_kd.nas.start.family`: ResNet-20, -14, -8 and MobileNetV2,
  each at the largest width that meets the budget) narrowed as `nas_kd.nas.start.hand_made` does for
  the ResNets (the deepest at 0.45 of its widths or more; before 2026-12-08, at half or more: the
  same picks on these three budgets, ResNet-14 at x0.56 at latency-half), every member retrained
  and the best on validation kept: `hand-made resnet` and `hand-made mobilenetv2` are its two rows.

Every pick is retrained like `benchmarks.search_vs_baselines` (3 epochs, every training image,
the shipped ensemble, seed S) and tested once. Each pick's latency is measured here too (fp32,
one thread, the fastest of 3 medians of 100 runs) beside the table's prediction, and its peak
int8 memory counted: a pick over a latency budget by more than the table's median absolute error on its
calibration networks is flagged `over`. Picks and retrains go to
`benchmarks/results/device_budgets.json` as they finish, so a killed run resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import optuna
import torch

from benchmarks.results import RESULTS, ResultsFile, machine, search_settings_id
from benchmarks.retrains import Retrains
from benchmarks.rules import largest, search_pick
from benchmarks.stats import mean_sd
from nas_kd.core.config import SearchConfig
from nas_kd.core.units import format_bytes, format_count
from nas_kd.data.datasets import Dataset, load_dataset
from nas_kd.device.latency import LatencyTable, measure_latency
from nas_kd.device.layers import export_blocks
from nas_kd.device.time_blocks import time_folder
from nas_kd.nas import start
from nas_kd.nas.budget import Budget
from nas_kd.nets.arch import Spec
from nas_kd.nets.cost import Cost
from nas_kd.nets.space import SearchSpace, load_space
from nas_kd.nets.zoo import teacher_spec
from nas_kd.training.train import resolve_device

INPUT, CLASSES = (1, 28, 28), 10
# a budget with every bound, so that start.spec_facts counts every cost a pick is judged by
EVERY_BOUND = Budget(latency_ms=float("inf"), memory=2**62)
SPACE = "resnet-v1"  # the space the table and every recorded pick were made for (named resnet then)
BUDGETS = ("latency-half", "latency-full", "mcu-48KB")
# a Cortex-M class microcontroller: SRAM for the peak int8 activations, flash for the int8 weights
MEMORY_BYTES, FLASH_PARAMS = 48_000, 250_000
METHODS = ("search", "random", "largest", "hand-made")
SEARCHES = ("search", "random")
LARGEST_OF = 200
TABLE_KEY = "table-v1"  # the one table every run is judged by


def make_table(results: ResultsFile, space: SearchSpace, folder: Path) -> LatencyTable:
    """The latency table of the space and the hand-made family, timed here once and kept."""
    if (entry := results.get("table", TABLE_KEY)) is None:
        started = time.perf_counter()
        if not (folder / "manifest.json").is_file():
            extra = [spec for name in start.FAMILY_STEPS for spec in start.family_specs(name)]
            export_blocks(space, INPUT, CLASSES, folder, extra=extra, progress=lambda m: print(f"  table: {m}", flush=True))
        exported = time.perf_counter() - started
        table = time_folder(folder, 1, log=lambda m: print(f"  table: {m}", flush=True))
        entry = {"table": table, "export_seconds": round(exported, 1),
                 "time_seconds": round(time.perf_counter() - started - exported, 1), "machine": machine()}
        results.put("table", TABLE_KEY, entry)
    return LatencyTable.from_data(entry["table"], str(table_path()), space, INPUT, CLASSES, "fp32")


def table_path() -> Path:
    return RESULTS / "device_budgets_table.json"


def budget_of(name: str, table: LatencyTable) -> Budget:
    """The named budget, fixed by the table (latency) or by MEMORY_BYTES."""
    if name == "mcu-48KB":
        return Budget(params=FLASH_PARAMS, memory=MEMORY_BYTES)
    factor = {"latency-half": 0.5, "latency-full": 1.0}[name]
    ms = table.predict(start.scaled(teacher_spec("resnet20"), factor))
    return Budget(latency_ms=round(ms, 3))


def config_for(budget: Budget, seed: int, cache_dir: str, device: str = "cpu") -> SearchConfig:
    """The search's config at `budget`. Its trials' latency is the table's or not measured
    (`onnx` off): this script measures every pick itself, here, and the search exports nothing."""
    return SearchConfig(onnx=False, params_budget=budget.params, latency_budget_ms=budget.latency_ms, memory_budget=budget.memory,
                        seed=seed, device=device,
                        latency_table=str(table_path()) if budget.latency_ms is not None else None,
                        search_space=SPACE, cache_dir=cache_dir)


def facts(spec: Spec, table: LatencyTable) -> dict[str, Any]:
    """What a pick costs: MACs, params, predicted latency, peak int8 memory (bytes)."""
    cost = start.spec_facts(spec, EVERY_BOUND, INPUT, CLASSES, table.predict)
    return {"macs": cost.macs, "params": cost.params, "predicted_ms": round(cost.latency_ms, 4), "peak_int8": cost.memory}


def cost_of(spec: Spec, table: LatencyTable) -> Cost:
    """A spec's cost as the budgets read it: MACs, params, predicted latency, peak int8 memory."""
    f = facts(spec, table)
    return Cost(f["macs"], f["params"], f["predicted_ms"], f["peak_int8"])


def hand_made(budget: Budget, table: LatencyTable) -> dict[str, Spec]:
    """The hand-made family's rows: the ResNet `nas_kd.nas.start.hand_made` picks (the deepest at
    0.45 of its widths or more, ResNet-8 narrower if none), and MobileNetV2, each at the largest
    width that meets the budget by the table."""
    members = start.family(budget, INPUT, CLASSES, table.predict if budget.latency_ms is not None else None)
    resnets = [name for name in start.HAND_MADE_BASES if name in members]
    deep = next((n for n in resnets if members[n][1] >= start.DEPTH_FACTOR), resnets[-1] if resnets else None)
    rows = {f"hand-made {name}": members[name][0] for name in (deep, "mobilenetv2") if name in members}
    if not rows:
        raise SystemExit(f"no member of the hand-made family meets {budget}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=BUDGETS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--cache-dir", default="studies/cache", help="where the teachers are cached (the search's)")
    parser.add_argument("--work", type=Path, default=Path("studies/bench-device-budgets"),
                        help="where the searches' studies and the table's layers go")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the searches and retrains train (their rows are kept apart by device); a "
                             "pick's latency is measured only on the CPU this is run on, never beside a GPU run")
    parser.add_argument("--measure-only", action="store_true",
                        help="pick and retrain nothing: measure here the latency of every pick not measured yet")
    parser.add_argument("--results", type=Path, default=RESULTS / "device_budgets.json")
    parser.add_argument("--table-only", action="store_true", help="pick and retrain nothing: the tables of the results")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = ResultsFile(args.results)
    space = load_space(SPACE)
    table = make_table(results, space, args.work / "table")
    text = json.dumps(results.get("table", TABLE_KEY)["table"], indent=1) + "\n"
    if not table_path().is_file() or table_path().read_text() != text:  # unchanged: not rewritten under other runs
        table_path().write_text(text)
    # a pick is over a latency budget in fact when measured above it by more than the table's
    # error: its median absolute error on its own calibration networks (the largest is one noisy
    # network's, -65% in the table timed while other work shared the cores)
    tolerance = statistics.median(abs(table.predict(Spec.parse(k)) / ms - 1) for k, ms in table.networks.items())
    budgets = {name: budget_of(name, table) for name in args.budgets}
    print(f"{machine()}; table: {table.calibration_line()}; budgets: "
          + ", ".join(f"{n} = {b}" for n, b in budgets.items()), flush=True)
    base = SearchConfig(cache_dir=args.cache_dir, device=args.device)
    sids = {device: search_settings_id(base, device) for device in ("cpu", "cuda")}
    sid = sids[args.device]
    dataset: Dataset | None = None
    retrained = Retrains(results, base, sid)

    def measured(spec: Spec) -> dict[str, Any] | None:
        if results.get("measured", str(spec)) is None and args.device == "cpu":
            results.put("measured", str(spec), {"measured_ms": round(measure_latency(spec, INPUT, CLASSES), 4),
                                                "machine": machine()})
        return results.get("measured", str(spec))

    if args.measure_only:
        args.device = "cpu"
        for spec in sorted({row["spec"] for pick in results.data.get("picks", {}).values() for row in pick["rows"].values()}):
            print(f"  {spec}: {measured(Spec.parse(spec))['measured_ms']:.3f} ms", flush=True)
    for seed in [] if args.table_only or args.measure_only else args.seeds:
        for name, budget in budgets.items():
            for method in args.methods:
                key = f"{name}|{budget}|{method}|{seed}|{sid}"
                if results.get("picks", key) is None:
                    if dataset is None:
                        dataset = load_dataset(base.dataset).to(resolve_device(args.device))
                    started = time.perf_counter()
                    if method in SEARCHES:
                        spec, extra = search_pick(method, config_for(budget, seed, args.cache_dir, args.device),
                                                  args.work / name / method)
                        picks = {method: spec}
                    elif method == "largest":
                        picks = {method: largest(space, budget, seed, lambda s: cost_of(s, table), LARGEST_OF,
                                                 max_draws=50)}
                        extra = {}
                    else:
                        picks, extra = hand_made(budget, table), {}
                    seconds = time.perf_counter() - started
                    rows = {row: {"spec": str(spec), **facts(spec, table)} for row, spec in picks.items()}
                    results.put("picks", key, {"budget": str(budget), "method": method, "seed": seed, "rows": rows,
                                               "pick_seconds": round(seconds, 1), **extra,
                                               "machine": machine(resolve_device(args.device))})
                    print(f"  {name} seed {seed} {method}: picked {', '.join(picks)} in {seconds:.0f} s", flush=True)
                for row, entry in results.get("picks", key)["rows"].items():
                    if dataset is None:
                        dataset = load_dataset(base.dataset).to(resolve_device(args.device))
                    r = retrained(Spec.parse(entry["spec"]), seed, dataset)
                    m = measured(Spec.parse(entry["spec"]))
                    print(f"  {name} seed {seed} {row}: {entry['spec']} {format_count(entry['macs'])} MACs, "
                          f"{entry['predicted_ms']:.3f} ms predicted / "
                          f"{'not measured (GPU run)' if m is None else format(m['measured_ms'], '.3f') + ' measured'}, "
                          f"{format_bytes(entry['peak_int8'])} peak; val {r['val_acc']:.4f} test {r['test_acc']:.4f}",
                          flush=True)
    for device, device_sid in sids.items():  # each device's retrains in their own tables
        print_tables(results, Retrains(results, base, device_sid), budgets, args.seeds, device_sid, tolerance, device)
    return 0


def print_tables(results: ResultsFile, retrains: Retrains, budgets: dict[str, Budget], seeds: list[int], sid: str,
                 tolerance: float, device: str = "cpu") -> None:
    """Per budget: each row's mean ± sd over seeds of test and validation accuracy, its cost, and
    the hand-made method (its best row on validation per seed)."""
    for name, budget in budgets.items():
        rows: dict[str, list[dict[str, Any]]] = {}
        for seed in seeds:
            best = None
            for method in METHODS:
                pick = results.get("picks", f"{name}|{budget}|{method}|{seed}|{sid}")
                for row, entry in (pick or {}).get("rows", {}).items():
                    r = retrains.get(entry["spec"], seed)
                    m = results.get("measured", entry["spec"])
                    if r is None or m is None:
                        continue
                    line = {**entry, **r, **m, "pick_seconds": pick["pick_seconds"]}
                    rows.setdefault(row, []).append(line)
                    if method == "hand-made" and (best is None or line["val_acc"] > best["val_acc"]):
                        best = line
            if best is not None:
                rows.setdefault("hand-made (best on val)", []).append(best)
        if not rows:
            continue
        print(f"\n{name}: {budget} (trained on {device})\n")
        print("| method | seeds | test acc | val acc | MACs | predicted ms | measured ms | peak int8 | over | pick time |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for row, lines in rows.items():
            over = sum(budget.latency_ms is not None and x["measured_ms"] > budget.latency_ms * (1 + tolerance)
                       for x in lines) + sum(budget.memory is not None and x["peak_int8"] > budget.memory for x in lines)
            print(f"| {row} | {len(lines)} | {mean_sd([x['test_acc'] for x in lines])} | {mean_sd([x['val_acc'] for x in lines])} "
                  f"| {format_count(statistics.mean(x['macs'] for x in lines))} "
                  f"| {statistics.mean(x['predicted_ms'] for x in lines):.3f} "
                  f"| {statistics.mean(x['measured_ms'] for x in lines):.3f} "
                  f"| {format_bytes(statistics.mean(x['peak_int8'] for x in lines))} | {over} "
                  f"| {statistics.mean(x['pick_seconds'] for x in lines) / 60:.1f} min |")


if __name__ == "__main__":
    raise SystemExit(main())
