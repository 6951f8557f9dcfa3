"""Which pruner picks the best student at equal training: a replay of measured trials.

    python -m benchmarks.pruners --budget 5M --specs 20
    python -m benchmarks.pruners --budget 50M --specs 30

It needs `benchmarks.trial_scores` to have run at the same budget and specs: it reads, per
spec, the validation accuracies a distill trial of the default schedule reported to the pruner
(`trial_reports` passes, BatchNorm recalibrated) and its reference (accuracy after the final
retrain). Then, for each pruner of `--pruner`, it replays `--orders` seeded random orders of the
specs through a real Optuna study with that pruner: each trial reports its measured values step
by step and stops where the pruner says. A trial costs the fraction of its steps it trained; each
order runs until `--trials` full trials' worth of training is spent (the default search's
`--trials`) or the specs run out. Validation passes are not counted: every pruner's trials,
`none`'s included, make the same passes up to where they stop, and those cost about half of a
default trial's time (`trial_scores.py --ceiling` counts them). The pick is the completed trial of best score, as the search's.
Printed per pruner: the pick's mean reference accuracy, its mean regret against the best spec of
the pool, how often it is one of the pool's best 3, and the mean number of trials started.

The replay stands in for a search whose sampler draws specs at random (TPE's first 8 trials are
random too); the pool is the benchmark's specs, so a pruner that saves time can run out of specs.
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

import optuna

from benchmarks.results import RESULTS, ResultsFile, settings_id
from benchmarks.retrains import Bench, distill_sid, reference_settings
from benchmarks.rules import draw_specs
from nas_kd.core.config import SearchConfig
from nas_kd.core.units import format_count, parse_count
from nas_kd.data.datasets import load_dataset
from nas_kd.nas.study import PRUNERS, make_pruner
from nas_kd.nets.space import load_space
from nas_kd.pipeline.phases import budget_of
from nas_kd.teaching.ensemble import ensemble_from_config


def replay(pruner: str, curves: list[list[list[float]]], order: list[int], budget: float,
           reports: int, name: str) -> tuple[int | None, int]:
    """(index of the picked spec, trials started) of one replay; `name` names the study, which
    makes Hyperband's assignment of trials to brackets (a hash of it) repeatable."""
    study = optuna.create_study(direction="maximize", pruner=make_pruner(pruner, reports), study_name=name)
    spent, started = 0.0, 0
    finished: dict[int, float] = {}
    for index in order:
        if spent >= budget - 1e-9:
            break
        trial = study.ask()
        started += 1
        points = curves[index]
        end = points[-1][0]
        for step, (epochs, value) in enumerate(points, 1):
            trial.report(value, step)
            if step < len(points) and trial.should_prune():
                spent += epochs / end
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            spent += 1.0
            finished[index] = points[-1][1]
            study.tell(trial, points[-1][1])
    if not finished:
        return None, started
    return max(finished, key=finished.get), started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=parse_count, default=50_000_000, help="MACs, as given to trial_scores.py")
    parser.add_argument("--specs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="drew the specs (as given to trial_scores.py)")
    parser.add_argument("--reference-images", type=int, default=20000)
    parser.add_argument("--schedule", default=None, help="EPOCHSxIMAGES of the replayed trials (default: the "
                                                         "search's default trial schedule)")
    parser.add_argument("--trials", type=float, default=None, help="full trials' worth of training per replay "
                                                                   "(default: the search's --trials)")
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument("--pruner", nargs="+", default=list(PRUNERS), choices=list(PRUNERS))
    parser.add_argument("--cache-dir", default="studies/cache")
    parser.add_argument("--results", type=Path, default=RESULTS / "trial_scores.json")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    cfg = SearchConfig(flops_budget=args.budget, cache_dir=args.cache_dir)
    epochs, images = (map(int, args.schedule.split("x")) if args.schedule else (cfg.trial_epochs, cfg.subset))
    dataset = load_dataset(cfg.dataset)
    budget = budget_of(cfg)
    ensemble = ensemble_from_config(cfg, dataset, progress=False, log=lambda m: None)
    bench = Bench(cfg, dataset, load_space(cfg.search_space), budget, ensemble, ResultsFile(args.results))
    drawn = draw_specs(bench.space, budget, args.specs, args.seed, dataset.input_shape, dataset.num_classes)
    rid = settings_id(reference_settings(bench, args.reference_images))
    sid = distill_sid(bench, epochs, images)
    # the specs trial_scores.py has finished (a reference and a trial of this schedule); nothing is trained here
    specs = [(s, c) for s, c in drawn if bench.results.get("references", f"{s}|{rid}") is not None
             and bench.results.get("scores", f"{s}|{sid}") is not None]
    if len(specs) < 4:
        raise SystemExit(f"trial_scores.py has finished only {len(specs)} of the {len(drawn)} specs at {epochs}x{images}")
    reference = [bench.results.get("references", f"{s}|{rid}")["val_acc"] for s, _ in specs]
    curves = [bench.results.get("scores", f"{s}|{sid}")["curve"] for s, _ in specs]
    trials = args.trials if args.trials is not None else cfg.trials
    best = max(reference)
    top3 = set(sorted(range(len(reference)), key=reference.__getitem__)[-3:])
    print(f"{len(specs)} of {len(drawn)} specs finished, under {budget}; trials of {epochs}x{images}, {cfg.trial_reports} reports; "
          f"{trials:g} full trials of training per replay; {args.orders} orders; best reference {best:.4f}")
    print(f"| pruner ({format_count(args.budget)} MACs) | pick's reference acc | regret (pp) | pick in the best 3 "
          "| trials started |")
    print("|---|---|---|---|---|")
    for pruner in args.pruner:
        picked, started = [], []
        for o in range(args.orders):
            order = list(range(len(specs)))
            random.Random(o).shuffle(order)
            index, n = replay(pruner, curves, order, trials, cfg.trial_reports, f"replay-{o}")
            picked.append(index)
            started.append(n)
        accs = [reference[i] for i in picked if i is not None]
        print(f"| {pruner} | {statistics.mean(accs) * 100:.2f}% | {(best - statistics.mean(accs)) * 100:.2f} | "
              f"{sum(i in top3 for i in picked) / len(picked):.2f} | {statistics.mean(started):.1f} |")


if __name__ == "__main__":
    main()
