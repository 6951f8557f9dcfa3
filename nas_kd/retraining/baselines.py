"""The pruned-teacher baseline: KD in place of fine-tuning after pruning.

After "Knowledge Distillation Based on Pruned Model" (2020): the largest teacher is filter-pruned
by L1 norm (Li et al., ICLR 2017; see prune.py) until it fits the search's budget, keeps its
surviving weights, and is then trained for the winner's epochs twice: distilled from the
ensemble with the search's recipe, and, for comparison, fine-tuned with cross-entropy alone.
Both are tested and exported beside the winner, so a study shows whether searching a structure
beat pruning one.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from nas_kd.core.config import DistillConfig, SearchConfig
from nas_kd.core.errors import InputError
from nas_kd.core.units import format_count
from nas_kd.data.datasets import Dataset
from nas_kd.device.export import ExportSettings, export, student_metrics
from nas_kd.distill.student import RetrainRecipe, retrain_student
from nas_kd.nas.budget import Budget
from nas_kd.nas.records import cost_facts
from nas_kd.nas.study import BASELINE_ATTR
from nas_kd.nets.arch import Network, Spec
from nas_kd.nets.zoo import teacher_cost, teacher_spec
from nas_kd.retraining.prune import min_pruned_cost, prune_to_budget
from nas_kd.teaching.ensemble import CachedTargets, Ensemble
from nas_kd.training.train import evaluate

FINE_TUNE = DistillConfig(losses=(("ce", 1.0),))


def largest_teacher_name(names: list[str], input_shape: tuple[int, int, int], num_classes: int) -> str:
    """The member of most MACs of the ensemble of zoo teachers `names`, from their specs alone (before
    any teacher is trained)."""
    macs = {n: teacher_cost(n, input_shape, num_classes).macs for n in names}
    return max(names, key=lambda n: macs[n])


def check_prunable(teachers: list[str], budget: Budget, input_shape: tuple[int, int, int], num_classes: int,
                   latency: Callable[[Spec], float] | None = None) -> None:
    """Refuse --pruned-baseline, before any training, when the largest of the zoo `teachers` cannot be
    pruned into `budget`: every bound of it, the latency one when `latency` can tell (`prune.priced`)."""
    name = largest_teacher_name(teachers, input_shape, num_classes)
    floor = min_pruned_cost(teacher_spec(name), input_shape, num_classes, budget, latency)
    if not budget.fits(floor):
        raise InputError(f"--pruned-baseline: the largest teacher {name} pruned to one filter per prunable layer "
                         f"still has {format_count(floor.macs)} MACs and {format_count(floor.params)} params "
                         f"({budget.excess(floor)}), over the budget {budget}; raise the budget or drop "
                         "--pruned-baseline")


def train_pruned(pruned: Network, dataset: Dataset, ensemble: Ensemble, recipe: RetrainRecipe,
                 epochs: int | None = None, progress: bool = True,
                 cached: CachedTargets | None = None) -> tuple[Network, float]:
    """A copy of `pruned`, trained for `epochs` (default: the recipe's) with `recipe` (its weights as
    the starting point)."""
    return retrain_student(lambda: copy.deepcopy(pruned).requires_grad_(True).train(), dataset, ensemble, recipe,
                           epochs, desc="pruned baseline", progress=progress, cached=cached)


def pruned_baseline(study: optuna.Study | None, dataset: Dataset, ensemble: Ensemble, cfg: SearchConfig,
                    budget: Budget, out_dir: Path, progress: bool = True, log: Callable[[str], None] = print,
                    cached: CachedTargets | None = None,
                    latency: Callable[[Spec], float] | None = None) -> dict[str, Any]:
    """Prune the largest teacher to `budget` (every bound of it; the latency one when `latency`
    can tell), then distil it and fine-tune it for cfg.final_epochs; test and export both under
    out_dir/pruned-kd and out_dir/pruned-finetune, and store the figures in the study (when given)
    for the report."""
    teacher = ensemble.largest_member()
    pruned, keep, cost = prune_to_budget(teacher.model, dataset.input_shape, budget, latency)
    before = evaluate(pruned, dataset.val, dataset)
    log(f"pruned teacher {teacher.name}: keep {keep:.3f} of each prunable layer -> {format_count(cost.macs)} MACs, "
        f"{format_count(cost.params)} params (val acc {before:.4f} before training); training it for "
        f"{cfg.final_epochs} epochs with KD and with fine-tuning")
    facts = cost_facts(cost, ensemble.compression_reference())
    methods = []
    for method, folder, recipe in (("pruned teacher + KD", "pruned-kd", cfg.distill),
                                   ("pruned teacher + fine-tuning", "pruned-finetune", FINE_TUNE)):
        start = time.perf_counter()
        model, seconds = train_pruned(pruned, dataset, ensemble, dataclasses.replace(RetrainRecipe.of(cfg), distill=recipe),
                                      progress=progress, cached=cached)
        row = {"method": method, "teacher": teacher.name, "spec": str(model.spec), "keep": round(keep, 4),
               **facts, "val_acc_before_training": before,
               **student_metrics(model, dataset),  # the teachers' figures are the winner's
               "final_epochs": cfg.final_epochs,
               "recipe": recipe.describe(), "train_seconds": round(seconds, 2),
               "retrain_seconds": round(time.perf_counter() - start, 2)}
        weights, metrics_path = export(model, dataset, ExportSettings.of(dataclasses.replace(cfg, distill=recipe)), row,
                                       out_dir / folder)
        row["weights"] = str(weights)
        methods.append(row)
        log(f"{method}: test acc {row['test_acc']:.4f} (val {row['val_acc']:.4f})")
    summary = {"teacher": teacher.name, "keep": round(keep, 4), "epochs": cfg.final_epochs, "methods": methods,
               "macs": cost.macs, "params": cost.params}
    if study is not None:
        study.set_user_attr(BASELINE_ATTR, summary)
    return summary
