"""How well each trial score ranks students: `distill` vs `blockwise` against a longer retrain.

    python benchmarks/trial_scores.py [--specs 10] [--reference-images 20000] [--reference-epochs 3]

A search only needs its trial score to *rank* candidates the way their final accuracy would. This
draws `--specs` random students of the default search space that fit the default budget (50M
MACs), scores each exactly as a search trial would, with both `--trial-score distill` (the
default: 2 epochs of distillation on the 4000-image trial subset, val accuracy) and
`--trial-score blockwise` (DNA's mean per-stage R^2 against the most accurate teacher), and
then retrains each for `--reference-epochs` on `--reference-images` training images with the
default recipe. The reference is that retrain's accuracy on the whole validation split (the
test split is not read). It prints, per score: Spearman's rho and Kendall's tau with the
reference, whether the score's best spec is the reference's best, the reference accuracy lost by
taking the score's best (regret), and the seconds a score costs per spec.

Everything uses the search's defaults (its default teachers: shipped for Fashion-MNIST, else cached or trained,
recipe ce + kl + hint, T = 4, one-cycle SGD); only the reference's size is the benchmark's.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import optuna
import torch

from nas_kd.arch import build
from nas_kd.blockwise import BlockwiseScorer, most_accurate
from nas_kd.config import SearchConfig
from nas_kd.cost import Budget, count, format_count
from nas_kd.data import BatchIterator, Split, load_dataset, seeded_subset
from nas_kd.losses import recipe_features
from nas_kd.objective import TRIAL_SCORES, TrialContext
from nas_kd.retrain import retrain
from nas_kd.space import load_space
from nas_kd.teachers import CachedTargets, ensemble_from_config
from nas_kd.train import evaluate


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    return statistics.correlation(ranks(x), ranks(y))


def kendall(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b."""
    concordant = discordant = ties_x = ties_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            ties_x += 1
        elif dy == 0:
            ties_y += 1
        elif dx * dy > 0:
            concordant += 1
        else:
            discordant += 1
    n = concordant + discordant
    return (concordant - discordant) / ((n + ties_x) * (n + ties_y)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", type=int, default=10, help="random students that fit the budget")
    parser.add_argument("--reference-images", type=int, default=20000)
    parser.add_argument("--reference-epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="draws the specs")
    parser.add_argument("--cache-dir", default="studies/cache", help="where the teachers are cached (the search's)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()

    cfg = SearchConfig(flops_budget=50_000_000, cache_dir=args.cache_dir)
    dataset = load_dataset(cfg.dataset)
    space = load_space(cfg.search_space)
    budget = Budget(cfg.flops_budget, cfg.params_budget)
    ensemble = ensemble_from_config(cfg, dataset, progress=False, log=lambda m: print("  " + m))

    specs, costs, draw = [], [], 0
    while len(specs) < args.specs:
        for spec in space.random_specs(4 * args.specs, args.seed + draw):
            cost = count(build(spec, dataset.input_shape, dataset.num_classes), dataset.input_shape)
            if budget.fits(cost) and str(spec) not in map(str, specs) and len(specs) < args.specs:
                specs.append(spec)
                costs.append(cost)
        draw += 1

    # the search's trial context, as `search.search` builds it (no augmentation: one view)
    subset = seeded_subset(len(dataset.train), cfg.subset, cfg.seed)
    batches = BatchIterator(dataset.train, dataset, cfg.train.batch_size, cfg.seed, views=1,
                            augment=cfg.train.augment, indices=subset)
    features = recipe_features(cfg.distill.weights())
    trial_targets = CachedTargets(ensemble, batches, features, progress=False)
    teacher = most_accurate(ensemble.members)
    scorer = BlockwiseScorer(teacher, dataset, batches, cfg.train, cfg.trial_epochs, cfg.seed)
    ctx = TrialContext(space, dataset, ensemble, budget, batches, trial_targets, cfg.distill, cfg.train,
                       cfg.trial_epochs, False, cfg.seed, False)
    contexts = {"distill": ctx,
                "blockwise": dataclasses.replace(ctx, targets=None, trial_score="blockwise", scorer=scorer)}
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())

    keep = seeded_subset(len(dataset.train), args.reference_images, cfg.seed)
    reference_data = dataclasses.replace(dataset, train=Split(dataset.train.x[keep], dataset.train.y[keep]))
    reference_batches = BatchIterator(reference_data.train, reference_data, cfg.train.batch_size, cfg.seed, views=1,
                                      augment=cfg.train.augment)
    reference_targets = CachedTargets(ensemble, reference_batches, features, progress=False)
    print(f"{len(specs)} random specs of {space.name} under {budget} (seed {args.seed}); trial scores on "
          f"{cfg.subset} images x {cfg.trial_epochs} epochs; block-wise teacher {teacher.name}; reference: "
          f"{args.reference_epochs} epochs on {len(reference_data.train)} images, recipe {cfg.distill.describe()}")

    rows = []
    for n, (spec, cost) in enumerate(zip(specs, costs)):
        row = {"spec": str(spec), "macs": cost.macs, "params": cost.params}
        for name, context in contexts.items():
            trial = study.ask()
            start = time.perf_counter()
            row[name] = TRIAL_SCORES[name](context, trial, spec)
            row[f"{name}_seconds"] = time.perf_counter() - start
            study.tell(trial, row[name])
        model, seconds = retrain(spec, reference_data, ensemble, cfg, args.reference_epochs, False, reference_targets)
        row["reference"] = evaluate(model, dataset.val, dataset)
        row["reference_seconds"] = seconds
        rows.append(row)
        print(f"  {n + 1:2d} {format_count(cost.macs):>7s} MACs  distill {row['distill']:.4f} ({row['distill_seconds']:.0f} s)"
              f"  blockwise {row['blockwise']:.4f} ({row['blockwise_seconds']:.0f} s)"
              f"  reference {row['reference']:.4f} ({seconds:.0f} s)  {spec}", flush=True)

    reference = [r["reference"] for r in rows]
    best = max(reference)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; {len(rows)} specs; reference val acc {min(reference):.4f}-{best:.4f}; "
          f"total {(time.perf_counter() - started) / 60:.1f} min")
    print(f"{'score':10s} {'spearman':>9s} {'kendall':>8s} {'top-1 agrees':>13s} {'regret (pp)':>12s} {'s/spec':>7s}")
    summary = {}
    for name in contexts:
        values = [r[name] for r in rows]
        picked = reference[values.index(max(values))]
        summary[name] = {"spearman": spearman(values, reference), "kendall": kendall(values, reference),
                         "top1": picked == best, "regret_pp": (best - picked) * 100,
                         "seconds_per_spec": statistics.mean(r[f"{name}_seconds"] for r in rows)}
        s = summary[name]
        print(f"{name:10s} {s['spearman']:9.3f} {s['kendall']:8.3f} {'yes' if s['top1'] else 'no':>13s} "
              f"{s['regret_pp']:12.2f} {s['seconds_per_spec']:7.1f}")
    print(f"(block-wise: {scorer.trained} stages trained for {sum(len(s.stages) for s in specs)} stage slots; "
          f"reference retrain {statistics.mean(r['reference_seconds'] for r in rows):.0f} s/spec)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
