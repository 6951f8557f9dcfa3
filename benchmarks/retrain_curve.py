"""How far the final retrain should go: the main command's winner retrained for several schedule
lengths, with and without augmentation, distilled or from scratch, and the hand-made ResNet-20 at
the same budget beside it.

    python -m benchmarks.retrain_curve --rows winner:kd:3 winner:kd:8 winner:kd-aug:8 --threads 1
    python -m benchmarks.retrain_curve --table-only

A row is `student:recipe:epochs` (seed 0 unless `--seeds` says more). Each row is its own
schedule: one-cycle SGD over all of its epochs (a 24-epoch run read at epoch 8 is not an 8-epoch
schedule), on every training image, with the default training settings (batch 128, peak lr 0.2)
and the shipped ensemble. The students:

- winner: the main command's winner at --flops-budget 50M (trial 2 of the bare command,
  37.1M MACs; BENCHMARKS.md, "The main command");
- resnet20: the hand-made network at the same budget, as `--start-from hand-made` builds it
  (ResNet-20 widened until 50M MACs would be passed; `nas_kd.nas.start.hand_made`).

The recipes (`RECIPES`): the search's distillation recipe (ce + kl + hint, T=4) on un-augmented
images with the teachers' outputs cached once (`kd`, what the main command's retrain does today);
the same with padding-crop and flips and the teachers run live on a fresh view every epoch
(`kd-aug`); the same augmentation with the teachers' outputs cached for 4 views, view 0
un-augmented (`kd-aug4`: epoch e shows view e mod 4); and cross-entropy alone, with and without
augmentation (`scratch`, `scratch-aug`). The table gives each row's validation accuracy (what
decides), test accuracy (printed once, never chosen on), the training seconds and the seconds
the teachers' targets took to cache.

Rows are kept in benchmarks/results/retrain_curve.json as they finish, and every epoch of a
running row is checkpointed in --work, so a killed run resumes at its last finished epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.results import RESULTS, ResultsFile, machine, settings_id
from benchmarks.rules import hand_made
from nas_kd.core.config import DistillConfig, SearchConfig
from nas_kd.data.batches import BatchIterator
from nas_kd.data.datasets import Dataset, Split, load_dataset
from nas_kd.device.export import student_metrics
from nas_kd.distill.losses import recipe_features
from nas_kd.distill.student import RetrainRecipe, distill, retrain_student, seeded_student
from nas_kd.nas.budget import Budget
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.cost import count
from nas_kd.teaching.ensemble import CachedTargets, ensemble_from_config
from nas_kd.training.train import Checkpoint, resolve_device

WINNER = "c24|basic_d1_w32_s1_k3_e1|bottleneck_d1_w64_s2_k3_e2|basic_d2_w64_s2_k5_e1"
BUDGET = Budget(macs=50_000_000)
SCRATCH = DistillConfig(losses=(("ce", 1.0),))


@dataclasses.dataclass(frozen=True)
class Recipe:
    distill: DistillConfig | None  # None: the search's default recipe
    augment: bool
    views: int | None = None  # teachers' outputs cached for this many views; None: live (or one view unaugmented)


RECIPES = {
    "kd": Recipe(None, False),
    "kd-aug": Recipe(None, True),
    "kd-aug4": Recipe(None, True, views=4),
    "scratch": Recipe(SCRATCH, False),
    "scratch-aug": Recipe(SCRATCH, True),
}


def student_spec(name: str, dataset: Dataset) -> Spec:
    if name == "winner":
        return Spec.parse(WINNER)
    if name == "resnet20":
        return hand_made(BUDGET, dataset)
    raise SystemExit(f"unknown student {name!r}; known: winner, resnet20")


def parse_row(text: str) -> tuple[str, str, int]:
    try:
        student, recipe, epochs = text.split(":")
        if recipe not in RECIPES or int(epochs) < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"a row is student:recipe:epochs with a recipe of {', '.join(RECIPES)}, "
                                         f"got {text!r}") from None
    return student, recipe, int(epochs)


class Runner:
    """Trains rows, loading the dataset and the teachers once; with `images`, on the first
    `images` training images only (a quick check of the script, kept under its own key)."""

    def __init__(self, base: SearchConfig, work: Path, images: int | None, device: torch.device):
        self.base, self.work = base, work
        dataset = load_dataset(base.dataset).to(device)
        self.ensemble = ensemble_from_config(base, dataset, progress=False, log=lambda m: print("  " + m))
        if images:
            dataset = dataclasses.replace(dataset, train=Split(dataset.train.x[:images], dataset.train.y[:images]))
        self.dataset = dataset

    def __call__(self, spec: Spec, recipe_name: str, epochs: int, seed: int, key: str) -> dict[str, Any]:
        recipe = RECIPES[recipe_name]
        # the recipe says it all: no automatic augmentation of long retrains, and live teachers
        # (ensemble_views 1) when augmenting without cached views
        cfg = dataclasses.replace(self.base, seed=seed, final_augment="on" if recipe.augment else "off",
                                  ensemble_views=1, train=dataclasses.replace(self.base.train, augment=recipe.augment))
        losses = recipe.distill or cfg.distill
        dataset, device = self.dataset, self.dataset.train.x.device
        make = lambda: build(spec, dataset.input_shape, dataset.num_classes).to(device)  # noqa: E731
        checkpoint = Checkpoint(self.work / f"{settings_id({'key': key})}.pt")
        started = time.perf_counter()
        ensemble, cache_seconds = self.ensemble, None
        if recipe.views is None:  # the retrain's own choice: live teachers when augmenting, else cached once
            retrain = dataclasses.replace(RetrainRecipe.of(cfg), distill=losses)
            model, seconds = retrain_student(make, dataset, ensemble, retrain, epochs, progress=False,
                                             epoch_lines=True, checkpoint=checkpoint)
        else:
            model, criterion = seeded_student(make, seed, losses, ensemble.feature_channels)
            batches = BatchIterator(dataset.train, dataset, cfg.train.batch_size, seed, views=recipe.views)
            cache_started = time.perf_counter()
            targets = CachedTargets(ensemble, batches, recipe_features(losses.weights()), progress=False)
            cache_seconds = time.perf_counter() - cache_started
            seconds = distill(model, batches, targets, criterion, cfg.train, epochs, progress=False,
                              two_stage=losses.two_stage, epoch_lines=True, checkpoint=checkpoint)
            model.eval()
        entry = {**student_metrics(model, dataset), "seconds": round(seconds, 1),
                 "cache_seconds": None if cache_seconds is None else round(cache_seconds, 1),
                 "wall_seconds": round(time.perf_counter() - started, 1), "recipe": losses.describe(),
                 "augment": recipe.augment, "macs": count(model, dataset.input_shape).macs,
                 "machine": machine(device)}
        checkpoint.remove()
        return entry


def show(results: ResultsFile, sid: str) -> None:
    rows = [e for k, e in sorted(results.data.get("rows", {}).items()) if k.endswith(f"|{sid}")]
    if not rows:
        return
    rows.sort(key=lambda e: (e["student"], e["recipe_name"], e["epochs"], e["seed"]))
    print("| student | MACs | recipe | epochs | seed | val acc | test acc | training s | s/epoch | targets cached s | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    def seconds(value: float | None) -> str:
        return "" if value is None else f"{value:.0f}"

    for e in rows:
        again = "".join(f" (again: {r['val_acc'] * 100:.2f}%)" for r in e.get("repeats", []))
        print(f"| {e['student']} | {e['macs'] / 1e6:.1f}M | {e['recipe_name']} | {e['epochs']} | {e['seed']} | "
              f"{e['val_acc'] * 100:.2f}%{again}{' *' if 'source' in e else ''} | {e['test_acc'] * 100:.2f}% | "
              f"{e['seconds']:.0f} | {e['seconds'] / e['epochs']:.0f} | {seconds(e['cache_seconds'])} | "
              f"{seconds(e['wall_seconds'])} |")
    if notes := sorted({e["source"] for e in rows if "source" in e}):
        print("\n* from " + "; ".join(notes))
    print("\nmachines: " + "; ".join(sorted({e["machine"] for e in rows})))
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for e in rows:
        groups.setdefault((e["student"], e["recipe_name"], e["epochs"]), []).append(e)
    if any(len(g) > 1 for g in groups.values()):
        print("\n| student | recipe | epochs | seeds | val acc, mean | test acc, mean |")
        print("|---|---|---|---|---|---|")
        for (student, recipe, epochs), g in groups.items():
            print(f"| {student} | {recipe} | {epochs} | {','.join(str(e['seed']) for e in g)} | "
                  f"{statistics.mean(e['val_acc'] for e in g) * 100:.2f}% | "
                  f"{statistics.mean(e['test_acc'] for e in g) * 100:.2f}% |")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=parse_row, nargs="*", default=[], help="student:recipe:epochs, in order")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--cache-dir", default="studies/cache", help="where the teachers are cached (the search's)")
    parser.add_argument("--work", type=Path, default=Path("studies/bench-retrain-curve"),
                        help="where a running row's checkpoints go")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where rows train; rows trained on a GPU are kept under their own keys")
    parser.add_argument("--results", type=Path, default=RESULTS / "retrain_curve.json")
    parser.add_argument("--train-images", type=int, help="train on the first N training images only (a quick check)")
    parser.add_argument("--table-only", action="store_true", help="train nothing: the table of the results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    results = ResultsFile(args.results)
    base = SearchConfig(cache_dir=args.cache_dir)
    settings = {"train": dataclasses.asdict(base.train), "distill": base.distill.describe(), "teachers": base.teachers,
                "dataset": base.dataset, "images": args.train_images, "v": 1}
    sid = settings_id({**settings, **({"device": "cuda"} if device.type == "cuda" else {})})
    runner: Runner | None = None
    for seed in [] if args.table_only else args.seeds:
        for student, recipe, epochs in args.rows:
            key = f"{student}|{recipe}|{epochs}|{seed}|{sid}"
            results.refresh()
            if results.get("rows", key) is not None:
                continue
            runner = runner or Runner(base, args.work, args.train_images, device)
            spec = student_spec(student, runner.dataset)
            print(f"{student} ({spec}) {recipe} {epochs} epochs seed {seed}", flush=True)
            entry = runner(spec, recipe, epochs, seed, key)
            results.put("rows", key, {"student": student, "spec": str(spec), "recipe_name": recipe, "epochs": epochs,
                                      "seed": seed, **entry})
            print(f"  val {entry['val_acc']:.4f}, test {entry['test_acc']:.4f}, {entry['seconds']:.0f} s", flush=True)
    results.refresh()
    for device_name in ("cpu", "cuda"):  # each device's rows in their own table
        show(results, settings_id({**settings, **({"device": "cuda"} if device_name == "cuda" else {})}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
