"""Retrain the winner with the full schedule, test it once beside the teachers, export it.

    python -m nas_kd.retrain --study-name NAME [--trial N | --finalists K] [--final-epochs E]

Without augmentation the teachers' outputs are computed once for the whole training split (or
taken from the search's cache); with it, the teachers run live on a fresh view every epoch
(`distill.student.retrain_targets`). The winner is exported by `nas_kd.device.export`: safetensors weights that
describe themselves, an ONNX model and an int8 ONNX model, both checked with ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from nas_kd.core.config import SearchConfig, from_dict
from nas_kd.core.errors import InputError
from nas_kd.core.progress import log
from nas_kd.data.datasets import Dataset
from nas_kd.device.export import ExportSettings, export, student_metrics, teachers_test_metrics
from nas_kd.distill.student import RetrainRecipe, criterion_for, retrain_student, retrain_targets
from nas_kd.nas.budget import Budget
from nas_kd.nas.picks import (
    budget_tag,
    cost_text,
    finalists,
    pick_at_budget,
    pick_winner,
    retrain_candidates,
    start_names,
    stored_cost,
)
from nas_kd.nas.records import LATENCY_ATTR, SPEC_ATTR, cost_facts
from nas_kd.nas.study import AT_BUDGET_ATTR, STUDY_ATTR, WINNER_ATTR
from nas_kd.nets.arch import Network, Spec, build
from nas_kd.nets.cost import Cost, count
from nas_kd.reporting.html import write_report
from nas_kd.teaching.ensemble import CachedTargets, Ensemble
from nas_kd.training.train import Checkpoint, Deadline, evaluate


def retrain(spec: Spec, dataset: Dataset, ensemble: Ensemble, recipe: RetrainRecipe, epochs: int | None = None,
            progress: bool = True, cached: CachedTargets | None = None,
            deadline: Deadline | None = None, checkpoint: Checkpoint | None = None) -> tuple[Network, float]:
    """Distil a fresh `spec` network for `epochs` (default: the recipe's) with `recipe` (re-planned to end by
    `deadline` when given; saved to `checkpoint` after every epoch and resumed from it when given);
    returns it and the seconds."""
    device = dataset.train.x.device
    return retrain_student(lambda: build(spec, dataset.input_shape, dataset.num_classes).to(device), dataset,
                           ensemble, recipe, epochs, progress=progress, cached=cached, epoch_lines=True, replan=deadline,
                           checkpoint=checkpoint)


def retrain_checkpoint(folder: Path | None, trial: int, log: Callable[[str], None]) -> Checkpoint | None:
    """Where the retrain of `trial` saves every epoch, in `folder` (None: nowhere); a damaged file
    there is moved aside with one warning line and the retrain starts anew."""
    return None if folder is None else Checkpoint(folder / f"trial-{trial}.pt", on_damage=log)


def test_metrics(model: Network, dataset: Dataset, ensemble: Ensemble) -> dict[str, Any]:
    """The one look at the test set: the student, each teacher and the ensemble."""
    return {**student_metrics(model, dataset), **teachers_test_metrics(dataset, ensemble)}


def retrain_winner(study: optuna.Study, dataset: Dataset, ensemble: Ensemble, cfg: SearchConfig,
                   out_dir: Path, progress: bool = True, log=print, cached: CachedTargets | None = None,
                   record: bool = True, end: float | None = None, checkpoints: Path | None = None) -> dict[str, Any]:
    """Pick the winner (or cfg.retrain_trial), retrain, test, export, and store the figures in the study.

    With cfg.finalists K > 1 the K best trials are each retrained and the one of best validation
    accuracy is the winner (ties: the better trial score); only it is tested and exported. The
    study's start points (`study.retrain_candidates`) are retrained beside them, whatever their
    trial scores, and win only on validation too.

    With `end` (a `time.perf_counter` time: a time budget's), each retrain re-plans its epochs
    after every one to end by its share of what is left (`train.Deadline`), and the figures give
    the epochs it trained. With `checkpoints`, each retrain saves every epoch there and resumes
    from what it finds (`retrain_checkpoint`): a run stopped mid-retrain goes on where it stopped."""
    recipe = RetrainRecipe.of(cfg)
    if cfg.retrain_trial is None:
        best = finalists(study, cfg.finalists)
        if cfg.finalists > 1 and len(best) < cfg.finalists:
            log(f"--finalists {cfg.finalists}: the study has {len(best)} distinct feasible students; "
                f"retraining {len(best)}")
        candidates = retrain_candidates(study, cfg.finalists)
        names = start_names(study)
        if starts := [t for t in candidates if t.user_attrs[SPEC_ATTR] in names]:
            log("start points, retrained whatever their trial score and kept only if best on validation: " + ", ".join(
                f"trial {t.number} ({names[t.user_attrs[SPEC_ATTR]]}, trial score {t.values[0]:.4g})" for t in starts))
    else:
        candidates, names = [pick_winner(study, cfg.retrain_trial)], {}
    many = len(candidates) > 1
    start = time.perf_counter()
    if many:
        # the teachers' outputs over the training split once for every finalist: the search's cache
        # when it covers the split, else computed here (each retrain would compute its own); when
        # they run live (augmentation, or too big to cache) each retrain runs them
        first = build(Spec.parse(candidates[0].user_attrs[SPEC_ATTR]), dataset.input_shape, dataset.num_classes)
        _, shared = retrain_targets(ensemble, dataset, recipe, criterion_for(first, recipe.distill, ensemble.feature_channels),
                                    cached, progress)
        cached = shared if isinstance(shared, CachedTargets) else cached
    rows: list[dict[str, Any]] = []
    best: tuple[float, optuna.trial.FrozenTrial, Spec, Network, float, int] | None = None
    for rank, trial in enumerate(candidates, 1):
        now = time.perf_counter()
        # two-stage training keeps its planned length (distill.distill)
        deadline = (None if end is None or recipe.distill.two_stage
                    else Deadline(now + (end - now) / (len(candidates) - rank + 1)))
        spec = Spec.parse(trial.user_attrs[SPEC_ATTR])
        start_point = names.get(str(spec))
        label = f" ({start_point} start point)" if start_point else ""
        which = f"finalist {rank} of {len(candidates)}{label}: " if many else ""
        planned = f"~{recipe.epochs} epochs, re-planned after each" if deadline else f"{recipe.epochs} epochs"
        log(f"retraining {which}trial {trial.number} ({spec}) for {planned}: {recipe.describe()}")
        model, seconds = retrain(spec, dataset, ensemble, recipe, progress=progress, cached=cached, deadline=deadline,
                                 checkpoint=retrain_checkpoint(checkpoints, trial.number, log))
        epochs = recipe.epochs if deadline is None or deadline.epochs is None else deadline.epochs
        val = evaluate(model, dataset.val, dataset) if many else 0.0
        if many:
            rows.append({"trial": trial.number, "spec": str(spec), "search_val_acc": trial.values[0], "val_acc": val,
                         "train_seconds": round(seconds, 2), "epochs": epochs,
                         **({"start_point": start_point} if start_point else {})})
            log(f"finalist {rank}: trial {trial.number} val acc {val:.4f} after the retrain "
                f"(trial score {trial.values[0]:.4g})")
        if best is None or val > best[0]:  # only the best model is kept in memory
            best = (val, trial, spec, model, seconds, epochs)
        del model  # before the next finalist trains
    assert best is not None
    _, trial, spec, model, seconds, epochs = best
    if many:
        log(f"finalists: trial {trial.number} has the best validation accuracy ({best[0]:.4f}); testing it")
    metrics = test_metrics(model, dataset, ensemble)
    metrics = {"trial": trial.number, "spec": str(spec),
               **cost_facts(count(model, dataset.input_shape), ensemble.compression_reference()),
               "latency_ms": trial.user_attrs.get(LATENCY_ATTR),
               "search_val_acc": trial.values[0], "final_epochs": epochs, **metrics,
               "train_seconds": round(seconds, 2), "retrain_seconds": round(time.perf_counter() - start, 2),
               "recipe": recipe.distill.describe(), "temperature": recipe.distill.temperature,
               "augmented": recipe.augments(),  # decided before it trained
               **({"finalists": rows} if many else {})}
    weights, metrics_path = export(model, dataset, ExportSettings.of(cfg), metrics, out_dir)
    metrics["weights"], metrics["metrics_file"] = str(weights), str(metrics_path)
    if record:
        study.set_user_attr(WINNER_ATTR, metrics)
    return metrics


def finish_retrain(study: optuna.Study, dataset: Dataset, ensemble: Ensemble, cfg: SearchConfig,
                   progress: bool = True, log=log, cached: CachedTargets | None = None,
                   end: float | None = None, checkpoints: Path | None = None) -> dict[str, Any]:
    """Retrain the winner into OUT_DIR/<study>/winner/ (by `end`, from and to `checkpoints`, see
    `retrain_winner`) and rewrite the study's report."""
    out = Path(cfg.out_dir) / study.study_name
    metrics = retrain_winner(study, dataset, ensemble, cfg, out / "winner", progress, log, cached, end=end,
                             checkpoints=checkpoints)
    html_path, _ = write_report(study, out)
    log(f"winner: trial {metrics['trial']} test acc {metrics['test_acc']:.4f} "
        f"(ensemble {metrics['ensemble_test_acc']:.4f}); report {html_path}")
    return metrics


def retrain_at_budget(study: optuna.Study, dataset: Dataset, ensemble: Ensemble, cfg: SearchConfig, budget: Budget,
                      price: Callable[[FrozenTrial], Cost] = stored_cost, progress: bool = True, log=log,
                      cached: CachedTargets | None = None) -> dict[str, Any]:
    """One study, many budgets: retrain the best trained trial that meets `budget` (`picks.pick_at_budget`)
    into OUT_DIR/<study>/winner-<budget tag>/, apart from the winner; its metrics are kept in the
    study under AT_BUDGET_ATTR[tag], and the winner's record is left alone."""
    trial, cost, fitting = pick_at_budget(study, budget, price)
    tag = budget_tag(budget)
    log(f"{budget}: trial {trial.number} ({trial.user_attrs[SPEC_ATTR]}; {cost_text(cost)}; trial score "
        f"{trial.values[0]:.4f}), the best of {fitting} trained trials that meet it")
    out = Path(cfg.out_dir) / study.study_name / f"winner-{tag}"
    one = dataclasses.replace(cfg, retrain_trial=trial.number, finalists=1)
    metrics = {"budget": str(budget), **retrain_winner(study, dataset, ensemble, one, out, progress, log, cached,
                                                       record=False)}
    study.set_user_attr(AT_BUDGET_ATTR, {**study.user_attrs.get(AT_BUDGET_ATTR, {}), tag: metrics})
    log(f"{budget}: trial {trial.number} test acc {metrics['test_acc']:.4f}; {out}")
    return metrics


def config_of(study: optuna.Study) -> SearchConfig:
    """The SearchConfig the study's search ran with (stored in the study by the command line)."""
    stored = study.user_attrs.get(STUDY_ATTR, {}).get("config")
    if stored is None:
        raise InputError(f"study {study.study_name!r} was not made by nas_kd.search (no stored config)")
    return from_dict(SearchConfig, stored)
