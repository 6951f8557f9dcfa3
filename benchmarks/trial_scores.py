"""How well each trial score ranks students against what the search is trying to predict.

    python -m benchmarks.trial_scores --budget 50M --specs 30
    python -m benchmarks.trial_scores --budget 5M --specs 20
    python -m benchmarks.trial_scores --budget 5M --specs 16 --edge --reference-images 0

It draws `--specs` seeded random students of the default search space (or `--search-space`) under
`--budget` MACs (with `--edge`, random shapes repaired to the budget's edge, as the default search's
trials are: students of equal cost; their depths drawn free, or with `--edge-depth family` capped
as the search's default caps them) and,
for each, its **reference**: validation accuracy after the search's final retrain (the default
`--final-epochs` and recipe, from the default teachers) on `--reference-images` training images
(the whole training split with 0). Then it computes every trial score of the search on the same
specs, each exactly as a trial would (`objective.TRIAL_SCORES`, the search's trial subset and
teachers), and prints one table: per score, Spearman's rho with a bootstrap 90% interval,
Kendall's tau, precision of its top 3 (how many of the reference's best 3 it ranks in its own
top 3), regret of its pick in points of reference accuracy, and seconds per spec.

Two more rows come from the default score's trainings, with nothing more trained: its curve of
validation accuracies extrapolated to the reference's steps, and (`--capacity-prior W ...`) the
score plus W x log2(params). `--baselines` also computes the reference of the hand-made network
and of the largest of 200 random specs (`benchmarks.search_vs_baselines`' untrained picks) and prints
how many of the random specs reach above them. `--half-cost` adds the distill score at 2 x 2000
images, half the default's training. With `--table-only`, `--ceiling N ...` simulates searches of
N trials drawn from the students, picking by the default score, by the half-cost score (2N
trials: the same training; and as many as take the same wall time), by params, by macs and by
the reference itself (a perfect score), against the baselines' references: what bounds a search
of N trials. `--choices` (with `--table-only`) regresses the reference on the students' cost and
each design choice in turn: what squeeze-excite, kernel 5, bottleneck blocks, depth and the stem
are worth at equal MACs and params (design-space refinement, Radosavovic et al. 2020).

References and scores are kept in `benchmarks/results/trial_scores.json`, keyed by spec and a
digest of the settings that determine them, so a killed run goes on where it stopped and a
re-run with a new score retrains nothing. The test split is never read.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import optuna
import torch

from benchmarks.results import RESULTS, ResultsFile, machine, settings_id
from benchmarks.retrains import Bench, distill_sid, reference_settings
from benchmarks.rules import draw_specs
from benchmarks.trial_score_analysis import ceiling_lines, choice_lines, floor_lines, half_cost_time, size_line
from benchmarks.trial_score_runs import (
    HALF_COST,
    SCHEDULES,
    baseline_references,
    references,
    score_rows,
    table,
    trial_scores,
)
from nas_kd.core.config import SearchConfig
from nas_kd.core.units import parse_count
from nas_kd.data.datasets import load_dataset
from nas_kd.nas import start
from nas_kd.nas.edge import EDGE_DEPTHS
from nas_kd.nets.space import load_space
from nas_kd.pipeline.phases import budget_of
from nas_kd.teaching.ensemble import ensemble_from_config


def print_table(results: list[dict[str, Any]]) -> None:
    print("| score | Spearman ρ [90% bootstrap] | Kendall τ | top-3 precision | regret (pp) | s / spec |")
    print("|---|---|---|---|---|---|")
    for r in results:
        lo, hi = r["interval"]
        print(f"| {r['score']} | {r['spearman']:.2f} [{lo:.2f}, {hi:.2f}] | {r['kendall']:.2f} | {r['top3']:.2f} | "
              f"{r['regret_pp']:.2f} | {r['seconds']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=parse_count, default=50_000_000, help="MACs, e.g. 50M or 5M")
    parser.add_argument("--specs", type=int, default=30, help="random students that fit the budget")
    parser.add_argument("--seed", type=int, default=0, help="draws the specs")
    parser.add_argument("--reference-images", type=int, default=20000, help="0 = the whole training split")
    parser.add_argument("--references-only", action="store_true", help="compute the references and stop")
    parser.add_argument("--reverse", action="store_true", help="compute missing references last spec first (a "
                                                                "second process shares the work)")
    parser.add_argument("--scores-only", action="store_true", help="compute the scores (not the references) and stop")
    parser.add_argument("--no-blockwise", action="store_true", help="leave the block-wise scores out")
    parser.add_argument("--table-only", action="store_true", help="compute nothing: the table over the specs that "
                                                                  "have a reference so far")
    parser.add_argument("--baselines", action="store_true", help="also the references of the hand-made network "
                        "and the largest of 200 random specs (search_vs_baselines.py's untrained picks)")
    parser.add_argument("--capacity-prior", type=float, nargs="+", default=[], metavar="W",
                        help="rows of the default score + W x log2(params), one a weight")
    parser.add_argument("--half-cost", action="store_true",
                        help=f"also the distill score at {HALF_COST[0]}x{HALF_COST[1]}: half the default's training")
    parser.add_argument("--ceiling", type=int, nargs="+", default=[], metavar="N",
                        help="with --table-only: what searches of N trials drawn from these students pick, by "
                             "the scores and by the reference itself, against the baselines' references")
    parser.add_argument("--budget-floor", type=float, default=0.5,
                        help="the search's --budget-floor whose effect on these students is printed")
    parser.add_argument("--choices", action="store_true", help="with --table-only: what each design choice (squeeze-"
                        "excite, kernel 5, bottleneck blocks, depth, stem) is worth at equal MACs and params")
    parser.add_argument("--edge", action="store_true", help="students at the budget's edge: random shapes repaired "
                        "to the budget as the search's trials are (default: random specs that fit)")
    parser.add_argument("--edge-depth", choices=list(EDGE_DEPTHS), default="free",
                        help="with --edge: depths drawn as the space allows (free, the default here: the students "
                             "of the recorded tables) or capped as the search's default does (family)")
    parser.add_argument("--search-space", default=SearchConfig().search_space, metavar="NAME|YAML",
                        help="the space the students are drawn from (default: the search's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cache-dir", default="studies/cache", help="where the teachers are cached (the search's)")
    parser.add_argument("--results", type=Path, default=RESULTS / "trial_scores.json")
    args = parser.parse_args()
    if args.baselines and args.scores_only:
        parser.error("--baselines computes references, --scores-only none: pass one of them")
    if args.edge_depth == "family" and not args.edge:
        parser.error("--edge-depth caps the depths of students at the edge: add --edge")
    if args.ceiling and not args.table_only:
        parser.error("--ceiling simulates searches from what the results file holds: add --table-only")
    if args.half_cost and args.table_only:
        parser.error("--half-cost computes the 2 x 2000 scores, --table-only nothing: drop one (the table shows "
                     "them whenever every student has one)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(message, flush=True)

    cfg = SearchConfig(flops_budget=args.budget, cache_dir=args.cache_dir, search_space=args.search_space)
    dataset = load_dataset(cfg.dataset)
    space = load_space(cfg.search_space)
    budget = budget_of(cfg)
    ensemble = ensemble_from_config(cfg, dataset, progress=False, log=lambda m: log("  " + m))
    bench = Bench(cfg, dataset, space, budget, ensemble, ResultsFile(args.results))
    cap = start.depth_cap(budget, dataset.input_shape, dataset.num_classes) if args.edge_depth == "family" else 0
    specs = draw_specs(space, budget, args.specs, args.seed, dataset.input_shape, dataset.num_classes, args.edge, cap)
    drawn = ("students at the edge" + (f", at most {cap} blocks a stage" if cap else "")) if args.edge else "random specs"
    log(f"{len(specs)} {drawn} of {space.name} under {budget} (seed {args.seed}); reference: "
        f"{cfg.final_epochs} epochs on {args.reference_images or len(dataset.train)} images, recipe "
        f"{cfg.distill.describe()}; {machine()}")
    priors = tuple(args.capacity_prior)
    if args.table_only:
        sid = settings_id(reference_settings(bench, args.reference_images))
        epochs, images = SCHEDULES[0]
        first = distill_sid(bench, epochs, images)
        have = [(s, c) for s, c in specs if bench.results.get("references", f"{s}|{sid}") is not None
                and bench.results.get("scores", f"{s}|{first}") is not None]
        rows = score_rows(bench, have, args.reference_images, priors)
        log(f"table only: {len(have)} of {len(specs)} specs have a reference and a {epochs}x{images} score; rows "
            f"missing a score of any of them are left out")
        if len(have) < 3:
            raise SystemExit(f"nothing to tabulate: {len(have)} specs of space {space.name} have a reference and a "
                             "score (the results were made for another space? --search-space resnet-v1)")
        reference = [bench.results.get("references", f"{s}|{sid}")["val_acc"] for s, _ in have]
        print_table(table(rows, reference))
        log(size_line(bench, rows, reference))
        for line in floor_lines(bench, have, rows, reference, args.budget_floor):
            log(line)
        if args.choices:
            for line in choice_lines(have, reference):
                log(line)
        baselines = {}
        if args.baselines or args.ceiling:
            baselines = baseline_references(bench, specs, args.reference_images, args.seed, log, compute=False)
        half_time = half_cost_time(bench, have)
        if args.ceiling and half_time:
            log(f"a {HALF_COST[0]}x{HALF_COST[1]} trial takes {half_time:.2f} of a default trial's wall time (its "
                "validation passes cost the same)")
        for line in ceiling_lines(bench, rows, reference, baselines, tuple(args.ceiling), half_time):
            log(line)
        return
    if args.scores_only:
        trial_scores(bench, specs, log, blockwise=not args.no_blockwise, half_cost=args.half_cost)
        return
    reference = references(bench, specs, args.reference_images, log, args.reverse)
    log(f"references: val acc {min(reference):.4f}-{max(reference):.4f} "
        f"({(time.perf_counter() - started) / 60:.1f} min so far)")
    if args.baselines:
        baseline_references(bench, specs, args.reference_images, args.seed, log, compute=True)
    if args.references_only:
        return
    trial_scores(bench, specs, log, blockwise=not args.no_blockwise, half_cost=args.half_cost)
    log(f"\n{len(specs)} specs under {budget}; reference val acc {min(reference):.4f}-{max(reference):.4f}; "
        f"s / spec of naswot and synflow is the time of both, with macs and params (known before any score) 0; "
        f"{machine()}; {(time.perf_counter() - started) / 60:.1f} min")
    rows = score_rows(bench, specs, args.reference_images, priors)
    print_table(table(rows, reference))
    log(size_line(bench, rows, reference))
    for line in floor_lines(bench, specs, rows, reference, args.budget_floor):
        log(line)


if __name__ == "__main__":
    main()
