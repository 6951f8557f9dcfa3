"""The proof: does the default search pick a better student than simple rules do?

    python -m benchmarks.search_vs_baselines --budget 5M --seeds 0 1 2
    python -m benchmarks.search_vs_baselines --budget 50M --seeds 0 1 2

At each budget and seed, five methods each pick one student of the default search space:

- search: nas_kd's default search (`python -m nas_kd.search --flops-budget B --seed S
  --final-epochs 0`), its winner; with `--budget-floor 0.5` the searches (search, random,
  params) train only students that use half the budget (their picks are kept under keys of their
  own); with `--start-from hand-made` the searches train the hand-made network below first
  (`nas_kd.nas.start`), and their picks and studies are kept apart too (`|start-hand-made`): the
  search's pick is then its best trial by score, as before;
- random: the same search with `--sampler random` (the same number of trained trials, the same
  score), its winner;
- largest: no training: of 200 seeded random specs that fit the budget, the one with the most MACs;
- hand-made: `nas_kd.nas.start.hand_made`, the deepest of ResNet-20, -14 and -8 (He et al. 2016)
  that fits at 0.45 of its widths or more, every width scaled by the largest factor (step 0.01,
  widths rounded to multiples of 4) that fits; the picks recorded before 2026-12-08 took the
  deepest at half its widths or more (at 5M: ResNet-8 at x0.68, where ResNet-14 at x0.46 now;
  those are kept under `picks-superseded`);
- params: the default search scoring by parameter count (`--trial-score params`: nothing
  trained, the same number of trials), what a user would run after reading that the count ranks
  students under a wide budget better than a brief training does;
- finalists: the default search with `--finalists K` (default 3): its K best trials by trial score
  and its start points (`nas_kd.nas.study.retrain_candidates`) are each retrained as below, and the
  one of best validation accuracy is the pick; with `--start-from hand-made --finalists 1`, the
  better on validation of the search's best trial and the hand-made network, which is what
  `python -m nas_kd.search --start-from hand-made` itself keeps. It reads the search method's study (run first when missing) and reuses the
  retrains already in the results file; its pick time is the search's plus its finalists'
  retrains. Like every retrain here, each finalist's is tested too, for the results file; the
  pick reads only the validation accuracies.

Every pick is then retrained with the search's final schedule and recipe (default
`--final-epochs`, the whole training split, the default teachers, seed S) and tested once on the
test split. The table gives, per method, the mean and standard deviation over seeds of the test
(and validation) accuracy, and the wall time of the pick. Picks and retrains are kept in
`benchmarks/results/search_vs_baselines.json` as they finish, so a killed run resumes where it
stopped; an unfinished search is started again.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch

from benchmarks.results import RESULTS, ResultsFile, machine, settings_id
from benchmarks.retrains import Retrains
from benchmarks.rules import counter, hand_made, largest, search_pick
from benchmarks.stats import mean_sd
from nas_kd.core.config import SearchConfig
from nas_kd.core.units import format_count, parse_count
from nas_kd.data.datasets import Dataset, load_dataset
from nas_kd.nas.picks import retrain_candidates
from nas_kd.nas.records import SPEC_ATTR
from nas_kd.nas.study import study_training
from nas_kd.nets.arch import Spec
from nas_kd.nets.space import load_space
from nas_kd.pipeline.phases import budget_of

METHODS = ("search", "random", "largest", "hand-made", "params", "finalists")


# SearchConfig keys added after the first results were recorded: left out of the settings while at
# their defaults, so the recorded picks and retrains stay valid
LATER_KEYS = ("more", "latency_budget_ms", "memory_budget", "latency_precision", "latency_threads", "latency_table",
              "pareto_cost", "onnx",
              # issue 11: at their defaults they change nothing on Fashion-MNIST (min_steps raises no
              # epoch there, tests/test_small_data.py checks it; the others are checks and logistics)
              "study_trials", "worker", "heartbeat", "min_steps", "teacher_min_gain",
              "finalists",  # issue 9: what the retrain stage does, not the retrain itself
              "start_from",  # issue 9: a pick setting (PICK_KEYS)
              "time_budget", "time_fixed",  # issue 26: off, the counts decide
              "final_augment",  # issue 26: auto, which leaves their 3-epoch retrains unaugmented
              "int8_target",  # issue 33: what the export quantizes for, not what is trained
              "budget_edge", "edge_min_width", "edge_depth",  # issue 32: what a search proposes, not how a pick is retrained
              "teacher_files", "teacher_input")  # issue 35: none at their defaults, the zoo's teachers alone
# keys that change only what a search picks, not a retrain or an untrained pick: in the pick's key
# of the three searching methods instead, and only when not 0 (the value before the key existed)
PICK_KEYS = ("budget_floor", "trials", "subset", "start_from", "search_space")
SEARCHES = ("search", "random", "params", "finalists")
# keys `pick` sets for its searches' run, or that leave their trials alone
RUN_KEYS = ("final_epochs", "out_dir", "study_name", "finalists")


CACHE_DIR = "studies/cache"  # the default --cache-dir, and the one every settings id records
# the space every pick was drawn from before picks recorded theirs: the shipped resnet space
RECORDED_SPACE = "782e21e08f15"  # its SearchSpace.fingerprint()


def space_setting(cfg: SearchConfig) -> str:
    """The key suffix of every pick that depends on the search space (all but hand-made):
    "|space-<fingerprint>" (what the space samples, not its name or file), or "" for the recorded
    space (the keys of before spaces were recorded)."""
    digest = load_space(cfg.search_space).fingerprint()
    return "" if digest == RECORDED_SPACE else f"|space-{digest}"


def config_json(cfg: SearchConfig) -> str:
    """The settings of the retrains and untrained picks: the PICK_KEYS at their defaults (the budget
    floor left out, as before it existed), and the teacher cache at this script's default: where
    teachers are looked up is not what they are (the shipped ones are used from any folder, and
    the search refuses a study whose teachers' weights changed)."""
    d, defaults = cfg.to_dict(), SearchConfig().to_dict()
    d.update({k: defaults[k] for k in PICK_KEYS})
    d["cache_dir"] = CACHE_DIR
    return json.dumps({k: v for k, v in d.items() if k != "budget_floor" and (k not in LATER_KEYS or v != defaults[k])},
                      sort_keys=True)


def pick_settings(cfg: SearchConfig) -> str:
    """The PICK_KEYS that differ from their defaults, as a key suffix ("" at the defaults: the keys of
    before they existed): "|floor0.5" for a budget floor, then "|trials20", "|subset2000", then
    "|start-hand-made" for each start point (none before they existed)."""
    defaults = SearchConfig()
    return ((f"|floor{cfg.budget_floor:g}" if cfg.budget_floor else "")
            + "".join(f"|{k}{getattr(cfg, k)}" for k in ("trials", "subset") if getattr(cfg, k) != getattr(defaults, k))
            + "".join(f"|start-{name}" for name in cfg.start_from))


def pick_key(budget: int, method: str, seed: int, sid: str, searching: str = "", finalists: int = 3,
             space: str = "") -> str:
    """The results key of a pick: the searches' with their `pick_settings`, every pick drawn from the
    space with its `space_setting`, the finalists' with their number."""
    return (f"{budget}|{method}|{seed}|{sid}" + (searching if method in SEARCHES else "")
            + (space if method != "hand-made" else "") + (f"|k{finalists}" if method == "finalists" else ""))


def pick(method: str, cfg: SearchConfig, dataset: Dataset, work: Path) -> tuple[Spec, dict[str, Any]]:
    budget = budget_of(cfg)
    assert method != "finalists", "picked by pick_finalists"
    if method == "largest":
        cost = counter(dataset.input_shape, dataset.num_classes)
        return largest(load_space(cfg.search_space), budget, cfg.seed, cost), {}
    if method == "hand-made":
        return hand_made(budget, dataset), {}
    return search_pick(method, cfg, work)


def search_study(cfg: SearchConfig, dataset: Dataset, work: Path) -> tuple[optuna.Study, float]:
    """The search method's study for cfg.seed (run here when its file is missing), and the seconds
    its search took (0 when it was found)."""
    path = work / "search" / f"search-seed{cfg.seed}.db"
    if path.exists():  # made by this script's search method with these settings, and finished
        study = optuna.load_study(study_name=path.stem, storage=f"sqlite:///{path}")
        stored, now = study.user_attrs.get("nas_kd", {}).get("config", {}), json.loads(cfg.to_json())  # tuples as lists
        if all(stored.get(k) == v for k, v in now.items() if k not in RUN_KEYS) and study_training(study) >= cfg.trials:
            return study, 0.0
    start = time.perf_counter()
    pick("search", cfg, dataset, work / "search")
    return optuna.load_study(study_name=path.stem, storage=f"sqlite:///{path}"), time.perf_counter() - start


def pick_finalists(study: optuna.Study, k: int, retrained: Callable[[Spec], dict[str, Any]]) -> tuple[Spec, dict[str, Any]]:
    """As `--finalists k` picks: the best k trials of the study by trial score and its start points
    (`nas_kd.nas.study.retrain_candidates`), each retrained; the one of best validation accuracy (ties:
    the earlier). `retrained(spec)` is the results entry of the spec's retrain."""
    rows = []
    for trial in retrain_candidates(study, k):
        r = retrained(Spec.parse(trial.user_attrs[SPEC_ATTR]))
        rows.append({"trial": trial.number, "spec": r["spec"], "trial_score": trial.value, "val_acc": r["val_acc"],
                     "retrain_seconds": r["seconds"]})
    best = max(rows, key=lambda row: row["val_acc"])  # max keeps the first of equal ones: the better score
    return Spec.parse(best["spec"]), {"trial": best["trial"], "finalists": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=parse_count, default=5_000_000, help="MACs, e.g. 5M or 50M")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--cache-dir", default=CACHE_DIR, help="where the teachers are cached (the search's)")
    parser.add_argument("--work", type=Path, default=Path("studies/bench-search-vs-baselines"),
                        help="where the searches' studies go")
    parser.add_argument("--budget-floor", type=float, default=SearchConfig().budget_floor,
                        help="the searches' --budget-floor (default: the search's, 0 = none)")
    parser.add_argument("--trials", type=int, default=SearchConfig().trials,
                        help="the searches' --trials (default: the search's); their studies go in a folder of their own")
    parser.add_argument("--subset", type=int, default=SearchConfig().subset,
                        help="the searches' --subset, training images a trial (default: the search's)")
    parser.add_argument("--start-from", nargs="*", default=list(SearchConfig().start_from), metavar="hand-made|SPEC",
                        help="the searches' --start-from (default: the search's); their studies go in a folder of "
                             "their own")
    parser.add_argument("--search-space", default=SearchConfig().search_space, metavar="NAME|YAML",
                        help="the space the searches and the largest spec draw from (default: the search's); "
                             "picks from another space than the recorded one are kept apart (|space-<fingerprint>)")
    parser.add_argument("--finalists", type=int, default=3, metavar="K",
                        help="how many of the search's best trials the finalists method retrains (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--results", type=Path, default=RESULTS / "search_vs_baselines.json")
    parser.add_argument("--table-only", action="store_true",
                        help="pick and retrain nothing: the table of what the results file holds")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = ResultsFile(args.results)
    base = SearchConfig(flops_budget=args.budget, cache_dir=args.cache_dir, budget_floor=args.budget_floor,
                        trials=args.trials, subset=args.subset, start_from=tuple(args.start_from),
                        search_space=args.search_space)
    searching, space = pick_settings(base), space_setting(base)
    dataset = load_dataset(base.dataset)
    settings = {"dataset": dataset.fingerprint(), "config": config_json(base), "methods": "v1"}
    sid = settings_id(settings)
    retrained = Retrains(results, base, sid, with_cost=True)
    # searches with other pick settings keep their studies apart: an unfinished one is deleted
    work = args.work / format_count(args.budget) / (searching + space).replace("|", "-").strip("-")
    print(f"budget {format_count(args.budget)} MACs; searches' budget floor {args.budget_floor:g}, trials "
          f"{args.trials}, subset {args.subset}, start from {args.start_from or 'nothing'}; space "
          f"{load_space(base.search_space).name}{space or ' (the recorded one)'}; seeds {args.seeds}; "
          f"{machine()}", flush=True)

    for seed in [] if args.table_only else args.seeds:
        cfg = dataclasses.replace(base, seed=seed)
        for method in args.methods:
            key = pick_key(args.budget, method, seed, sid, searching, args.finalists, space)
            if results.get("picks", key) is None:
                start = time.perf_counter()
                if method == "finalists":
                    study, search_seconds = search_study(cfg, dataset, work)
                    spec, extra = pick_finalists(study, args.finalists, functools.partial(
                        retrained, seed=seed, dataset=dataset, label=f"seed {seed} {method}"))
                    # the pick's time: its search (as recorded when it ran) and its finalists' retrains
                    searched = results.get("picks", pick_key(args.budget, "search", seed, sid, searching, space=space))
                    seconds = (search_seconds or (searched or {}).get("pick_seconds", float("nan"))) + sum(
                        f["retrain_seconds"] for f in extra["finalists"])
                else:
                    spec, extra = pick(method, cfg, dataset, work / method)
                    seconds = time.perf_counter() - start
                results.put("picks", key, {"budget": args.budget, "method": method, "seed": seed, "spec": str(spec),
                                           "pick_seconds": round(seconds, 1), **extra, "machine": machine()})
                print(f"  seed {seed} {method}: picked {spec} in {seconds:.0f} s", flush=True)
            spec = Spec.parse(results.get("picks", key)["spec"])
            r = retrained(spec, seed, dataset, f"seed {seed} {method}")
            print(f"  seed {seed} {method}: test {r['test_acc']:.4f}, val {r['val_acc']:.4f}", flush=True)

    print(f"\n| method ({format_count(args.budget)} MACs) | seeds | test acc | val acc | MACs | wall time of the pick |")
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        rows = []
        for seed in args.seeds:
            p = results.get("picks", pick_key(args.budget, method, seed, sid, searching, args.finalists, space))
            r = p and retrained.get(p["spec"], seed)
            if r:
                rows.append((r["test_acc"], r["val_acc"], r["macs"], p["pick_seconds"]))
        if not rows:
            continue
        print(f"| {method} | {len(rows)} | {mean_sd([r[0] for r in rows])} | {mean_sd([r[1] for r in rows])} | "
              f"{format_count(statistics.mean(r[2] for r in rows))} | {statistics.mean(r[3] for r in rows) / 60:.1f} min |")


if __name__ == "__main__":
    main()
