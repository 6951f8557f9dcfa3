"""Ablation of nas_kd's distillation methods on one fixed student and one fixed teacher ensemble.

    python -m benchmarks.distill_methods [--train-images 20000] [--epochs 5] [--seeds 0,1,2]

Fashion-MNIST; the student `c8|basic_d1_w8_s1_k3_e1|basic_d1_w16_s2_k3_e1|basic_d1_w32_s2_k3_e1`
(2.36M MACs, 19.8K params); the ensemble of the search's default teachers (the shipped wrn16_2 +
resnet20 for Fashion-MNIST; cached or trained like the search's otherwise). Every method trains for the
same epochs with the same one-cycle SGD schedule on the same seeded training subset:

    scratch               cross-entropy only
    kl                    CE + KL on the ensemble's soft targets (T = 4)
    kl+hint               CE + KL + FitNets hint on the deepest stage
    crosslayer two-stage  stage one: cross-layer Gram matrices; stage two: CE + KL
    at                    CE + KL + attention transfer
    rtk                   CE + KL + representative teacher keys
    pruned+kd             the largest teacher that can be L1-pruned to the student's MACs (resnet20),
                          distilled (CE + KL)
    pruned+finetune       the same pruned network, cross-entropy only
    online ensemble x3    three copies of the student trained together, each from the students' ensemble

A method's free hyper-parameter (a feature loss's weight, the two-stage fraction) is chosen on the
validation split with seed 0 from a small grid; then every method runs with each seed. The table
prints mean and standard deviation of test accuracy, the val accuracy, and the difference to
scratch; the test set is read only for that table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from nas_kd.core.config import DistillConfig, SearchConfig, parse_distill
from nas_kd.core.errors import InputError
from nas_kd.core.units import format_count
from nas_kd.data.batches import BatchIterator, seeded_subset
from nas_kd.data.datasets import Split, load_dataset
from nas_kd.distill.student import RetrainRecipe
from nas_kd.nas.budget import Budget
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.cost import count
from nas_kd.retraining.baselines import FINE_TUNE, train_pruned
from nas_kd.retraining.online import train_online
from nas_kd.retraining.prune import prune_to_budget
from nas_kd.retraining.retrain import retrain
from nas_kd.teaching.ensemble import CachedTargets, ensemble_from_config
from nas_kd.training.train import evaluate

STUDENT = "c8|basic_d1_w8_s1_k3_e1|basic_d1_w16_s2_k3_e1|basic_d1_w32_s2_k3_e1"

# method -> candidate recipes (the first is used when --no-grid); the grid is searched on val, seed 0
METHODS: dict[str, list[DistillConfig]] = {
    "scratch": [DistillConfig(losses=parse_distill("ce"))],
    "kl": [DistillConfig(losses=parse_distill("ce,kl"))],
    "kl+hint": [DistillConfig(losses=parse_distill(f"ce,kl,hint={w}")) for w in (1, 0.1)],
    "crosslayer two-stage": [DistillConfig(losses=parse_distill("ce,kl,crosslayer"), two_stage=f) for f in (0.2, 0.4)],
    "at": [DistillConfig(losses=parse_distill(f"ce,kl,at={w}")) for w in (1, 0.1)],
    "rtk": [DistillConfig(losses=parse_distill(f"ce,kl,rtk={w}")) for w in (1, 0.1)],
    "pruned+kd": [DistillConfig(losses=parse_distill("ce,kl"))],
    "pruned+finetune": [FINE_TUNE],
    "online ensemble x3": [DistillConfig(losses=parse_distill("ce,kl"))],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--student", default=STUDENT, help=f"the student's spec (default {STUDENT})")
    parser.add_argument("--no-grid", action="store_true", help="take each method's first recipe, no val search")
    parser.add_argument("--cache-dir", default="studies/cache", help="where the teachers are cached (the search's)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    torch.set_num_threads(torch.get_num_threads())
    started = time.perf_counter()

    full = load_dataset("fashion-mnist")
    base = SearchConfig(cache_dir=args.cache_dir, target_cache_gb=8.0)
    ensemble = ensemble_from_config(base, full, progress=False, log=lambda m: print("  " + m))
    keep = seeded_subset(len(full.train), args.train_images, 0)
    dataset = dataclasses.replace(full, train=Split(full.train.x[keep], full.train.y[keep]))
    spec = Spec.parse(args.student)
    cost = count(build(spec, dataset.input_shape, dataset.num_classes), dataset.input_shape)
    whole = BatchIterator(dataset.train, dataset, base.train.batch_size, 0, views=1, augment=False)
    cached = CachedTargets(ensemble, whole, "all", progress=False)  # every method reads from it
    # the largest member that can be pruned to the student's MACs (wrn16_2's kept stage widths
    # alone cost 2.70M MACs, more than the student's 2.365M; resnet20 prunes to it)
    largest, pruned = None, None
    for member in sorted(ensemble.members, key=lambda t: -t.cost.macs):
        try:
            pruned, keep_ratio, pruned_cost = prune_to_budget(member.model, dataset.input_shape,
                                                              Budget(cost.macs, None))
        except InputError as e:
            print(f"  {member.name}: {e}")
            continue
        largest = member
        break
    if pruned is None:
        raise SystemExit("no teacher of the ensemble can be pruned to the student's MACs")
    print(f"student {spec}: {format_count(cost.macs)} MACs, {format_count(cost.params)} params; "
          f"{len(dataset.train)} training images, {args.epochs} epochs, seeds {seeds}")
    print(f"pruned {largest.name} (keep {keep_ratio:.3f}): {pruned.spec}, "
          f"{format_count(pruned_cost.macs)} MACs, {format_count(pruned_cost.params)} params")
    print(f"ensemble val acc {ensemble.accuracy(dataset.val, dataset):.4f}; target cache {cached.nbytes() / 1e6:.0f} MB")

    def run(method: str, recipe: DistillConfig, seed: int) -> tuple[float, float, float]:
        """(val acc, test acc, seconds) of one training."""
        cfg = dataclasses.replace(base, distill=recipe, seed=seed)
        start = time.perf_counter()
        if method.startswith("pruned"):
            torch.manual_seed(seed)
            models = [train_pruned(pruned, dataset, ensemble, RetrainRecipe.of(cfg), args.epochs, False, cached)[0]]
        elif method.startswith("online"):
            models, _ = train_online([spec] * 3, dataset, ensemble, RetrainRecipe.of(cfg), args.epochs, False, False)
        else:
            models = [retrain(spec, dataset, ensemble, RetrainRecipe.of(cfg), args.epochs, False, cached)[0]]
        seconds = time.perf_counter() - start
        # online: each student is a deliverable; their mean accuracy is the method's figure
        val = statistics.mean(evaluate(m, dataset.val, dataset) for m in models)
        test = statistics.mean(evaluate(m, dataset.test, dataset) for m in models)
        return val, test, seconds

    chosen: dict[str, DistillConfig] = {}
    grid_rows = []
    for method in methods:
        candidates = METHODS[method][:1] if args.no_grid else METHODS[method]
        if len(candidates) == 1:
            chosen[method] = candidates[0]
            continue
        scores = []
        for recipe in candidates:
            val, _, seconds = run(method, recipe, seeds[0])
            scores.append(val)
            grid_rows.append((method, recipe.describe(), val, seconds))
            print(f"  grid {method:22s} {recipe.describe():40s} val {val:.4f} ({seconds:.0f} s)")
        chosen[method] = candidates[scores.index(max(scores))]

    results = {}
    for method in methods:
        rows = []
        for seed in seeds:
            val, test, seconds = run(method, chosen[method], seed)
            rows.append((val, test, seconds))
            print(f"  {method:22s} seed {seed}: val {val:.4f} test {test:.4f} ({seconds:.0f} s)")
        results[method] = rows

    scratch = statistics.mean(t for _, t, _ in results["scratch"]) if "scratch" in results else None
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; {len(dataset.train)} train images, {args.epochs} epochs, seeds {seeds}; "
          f"total {(time.perf_counter() - started) / 60:.1f} min")
    print(f"{'method':22s} {'recipe':44s} {'test acc mean ± std':>20s} {'val acc':>8s} {'vs scratch':>10s} {'s/run':>6s}")
    out = []
    for method, rows in results.items():
        tests = [t for _, t, _ in rows]
        mean, std = statistics.mean(tests), statistics.stdev(tests) if len(tests) > 1 else 0.0
        delta = f"{(mean - scratch) * 100:+.2f} pp" if scratch is not None else ""
        recipe = chosen[method].describe() if method != "pruned+finetune" else "ce (fine-tuning)"
        print(f"{method:22s} {recipe:44s} {mean * 100:11.2f} ± {std * 100:4.2f} % "
              f"{statistics.mean(v for v, _, _ in rows) * 100:7.2f}% {delta:>10s} "
              f"{statistics.mean(s for _, _, s in rows):6.0f}")
        out.append({"method": method, "recipe": recipe, "test": tests, "val": [v for v, _, _ in rows],
                    "seconds": [s for _, _, s in rows]})
    if args.json:
        Path(args.json).write_text(json.dumps({"results": out, "grid": grid_rows}, indent=2))


if __name__ == "__main__":
    main()
