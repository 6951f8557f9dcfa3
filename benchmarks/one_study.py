"""One study, many budgets (issue 24): one Pareto search retrained at three budgets, against three
single-budget searches of a third of its trials each.

    python -m benchmarks.one_study --seeds 0 1 [--trials 30] [--device cuda]
    python -m benchmarks.one_study --table-only

A user with several targets can search once (`--objective pareto` at the largest budget) and pick
per target afterwards (`python -m nas_kd.retrain --study-name S --flops-budget X`, which is
`nas_kd.nas.picks.pick_at_budget`), or search once per target. Per seed S:

- pareto: one search of N trials, `--objective pareto --flops-budget` the largest budget; at each
  budget, the best trained trial that meets it;
- single: one search of N/3 trials per budget (`--flops-budget` that budget, the default
  objective and pruner), its winner.

Budgets are MACs (default 10M, 25M and 50M: three points along the front the 50M search spans).
Every pick is retrained like `benchmarks.search_vs_baselines` (3 epochs, every training image, the
shipped ensemble, seed S) and tested once; validation accuracy decides, test accuracy is printed.
Each method's total time is its searches' wall time plus its picks' retrains. Searches and
retrains go to `benchmarks/results/one_study.json` as they finish, so a killed run resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path
from typing import Any

import optuna
import torch

from benchmarks.results import RESULTS, ResultsFile, machine, search_settings_id
from benchmarks.retrains import Retrains
from benchmarks.rules import fresh_search
from benchmarks.stats import mean_sd
from nas_kd.core.config import SearchConfig
from nas_kd.core.errors import InputError
from nas_kd.core.units import format_count, parse_count
from nas_kd.data.datasets import Dataset, load_dataset
from nas_kd.nas.budget import Budget
from nas_kd.nas.picks import pick_at_budget, pick_winner
from nas_kd.nas.records import SPEC_ATTR, was_trained
from nas_kd.nets.arch import Spec
from nas_kd.training.train import resolve_device

METHODS = ("pareto", "single")
BUDGETS = ("10M", "25M", "50M")


def pick_entry(trial: optuna.trial.FrozenTrial, fitting: int | None = None) -> dict[str, Any]:
    return {"spec": trial.user_attrs[SPEC_ATTR], "macs": trial.user_attrs["macs"], "trial": trial.number,
            "trial_score": trial.values[0], **({"fitting": fitting} if fitting is not None else {})}


def picks_of(method: str, base: SearchConfig, budgets: list[str], trials: int, seed: int,
             work: Path) -> dict[str, Any]:
    """The method's pick at every budget, its searches' seconds and trial counts."""
    # trials' latency judges nothing under MACs budgets, and the search exports nothing: not measured
    cfg = dataclasses.replace(base, seed=seed, onnx=False)
    if method == "pareto":
        largest = max(budgets, key=parse_count)
        study, seconds = fresh_search(dataclasses.replace(cfg, objective="pareto", flops_budget=parse_count(largest),
                                                          trials=trials), work, f"pareto-s{seed}")
        picks: dict[str, Any] = {}
        for b in budgets:
            try:
                trial, _, fitting = pick_at_budget(study, Budget(macs=parse_count(b)))
                picks[b] = pick_entry(trial, fitting)
            except InputError as e:  # no trained trial meets it: a loss of the method, kept as such
                picks[b] = {"refused": str(e)}
        return {"seconds": round(seconds, 1), "picks": picks, "trials": len(study.trials),
                "trained": sum(was_trained(t) for t in study.trials)}
    picks, total, count, trained = {}, 0.0, 0, 0
    for b in budgets:
        study, seconds = fresh_search(dataclasses.replace(cfg, flops_budget=parse_count(b),
                                                          trials=max(1, trials // len(budgets))), work, f"single-{b}-s{seed}")
        try:
            picks[b] = pick_entry(pick_winner(study)) | {"seconds": round(seconds, 1)}
        except InputError as e:  # nothing trained within the budget: a loss of the method, as for pareto
            picks[b] = {"refused": str(e), "seconds": round(seconds, 1)}
        total, count, trained = total + seconds, count + len(study.trials), trained + sum(was_trained(t) for t in study.trials)
    return {"seconds": round(total, 1), "picks": picks, "trials": count, "trained": trained}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), help="MACs budgets, for example 10M 25M 50M")
    parser.add_argument("--trials", type=int, default=30, help="the Pareto search's trials (each single search: a third)")
    parser.add_argument("--cache-dir", default="studies/cache", help="where the teachers are cached (the search's)")
    parser.add_argument("--work", type=Path, default=Path("studies/bench-one-study"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--results", type=Path, default=RESULTS / "one_study.json")
    parser.add_argument("--table-only", action="store_true", help="search and retrain nothing: the table of the results")
    args = parser.parse_args()
    for b in args.budgets:
        parse_count(b)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = ResultsFile(args.results)
    base = SearchConfig(cache_dir=args.cache_dir, device=args.device)
    sids = {d: search_settings_id(base, d) for d in ("cpu", "cuda")}
    sid = sids[args.device]
    retrained = Retrains(results, base, sid)
    dataset: Dataset | None = None
    for seed in [] if args.table_only else args.seeds:
        for method in args.methods:
            key = f"{method}|{seed}|{args.trials}|{'-'.join(args.budgets)}|{sid}"
            if results.get("searches", key) is None:
                entry = picks_of(method, base, args.budgets, args.trials, seed, args.work / method)
                results.put("searches", key, {**entry, "method": method, "seed": seed, "machine": machine(
                    resolve_device(args.device))})
                print(f"  seed {seed} {method}: {entry['trials']} trials in {entry['seconds']:.0f} s", flush=True)
            for b, pick in results.get("searches", key)["picks"].items():
                if "spec" not in pick:
                    print(f"  seed {seed} {method} {b}: {pick['refused']}", flush=True)
                    continue
                if dataset is None:
                    dataset = load_dataset(base.dataset).to(resolve_device(args.device))
                r = retrained(Spec.parse(pick["spec"]), seed, dataset)
                print(f"  seed {seed} {method} {b}: trial {pick['trial']} {pick['spec']} "
                      f"{format_count(pick['macs'])} MACs; val {r['val_acc']:.4f} test {r['test_acc']:.4f}", flush=True)
    for device, device_sid in sids.items():
        show(results, Retrains(results, base, device_sid), args.seeds, args.trials, args.budgets, device_sid, device)
    return 0


def show(results: ResultsFile, retrains: Retrains, seeds: list[int], trials: int, budgets: list[str], sid: str,
         device: str) -> None:
    """Per budget and method: mean ± sd over seeds of the retrained validation and test accuracy, the
    pick's MACs; per method: its searches' and retrains' time."""
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    times: dict[str, list[float]] = {}
    for method in METHODS:
        for seed in seeds:
            entry = results.get("searches", f"{method}|{seed}|{trials}|{'-'.join(budgets)}|{sid}")
            if entry is None:
                continue
            retrained: dict[str, float] = {}  # a spec picked at several budgets is retrained once
            for b, pick in entry["picks"].items():
                r = retrains.get(pick["spec"], seed) if "spec" in pick else None
                rows.setdefault((b, method), []).append({**pick, **(r or {})})
                if r:
                    retrained[pick["spec"]] = r["seconds"]
            times.setdefault(method, []).append(entry["seconds"] + sum(retrained.values()))
    if not rows:
        return
    print(f"\nOne study, many budgets: {trials} Pareto trials against {len(budgets)} searches of "
          f"{max(1, trials // len(budgets))}, trained on {device}\n")
    print("| budget | method | seeds | val acc | test acc | MACs | refused |")
    print("|---|---|---|---|---|---|---|")
    for (b, method), lines in sorted(rows.items(), key=lambda kv: (parse_count(kv[0][0]), kv[0][1])):
        done = [x for x in lines if "val_acc" in x]
        val, test = (mean_sd([x[k] for x in done]) if done else "-" for k in ("val_acc", "test_acc"))
        print(f"| {b} | {method} | {len(done)} | {val} | {test} | "
              f"{format_count(statistics.mean(x['macs'] for x in done)) if done else '-'} | {len(lines) - len(done)} |")
    print("\n| method | seeds | searches + retrains (each distinct pick once) |")
    print("|---|---|---|")
    for method, values in times.items():
        print(f"| {method} | {len(values)} | {statistics.mean(values) / 60:.1f} min |")


if __name__ == "__main__":
    raise SystemExit(main())
