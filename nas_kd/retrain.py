"""Retrain the winner with the full schedule, test it once beside the teachers, export it.

    python -m nas_kd.retrain --study-name NAME [--trial N] [--final-epochs E]

The retrain runs the teachers live on every batch (any augmentation, a fresh view every epoch)
rather than caching their outputs for the whole training set. The export is a safetensors file
whose metadata carries the spec, the input shape and normalisation, the config and the library
versions, so `load_student(path)` rebuilds the network from the file alone.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import torch
from safetensors import safe_open

from nas_kd import versions
from nas_kd.arch import Network, Spec, build
from nas_kd.cli import fail, log, quiet_libraries, study_parser
from nas_kd.config import SearchConfig, from_dict
from nas_kd.cost import count
from nas_kd.data import BatchIterator, Dataset, load_dataset
from nas_kd.distill import criterion_for, distill
from nas_kd.errors import InputError
from nas_kd.losses import Criterion
from nas_kd.objective import cost_facts
from nas_kd.report import write_report
from nas_kd.study import STUDY_ATTR, WINNER_ATTR, check_same_teachers, load_existing, pick_winner
from nas_kd.teachers import (
    CachedTargets,
    Ensemble,
    LiveTargets,
    TargetSource,
    ensemble_from_config,
    ensemble_summary,
    load_state,
    save_model,
    soft_targets,
)
from nas_kd.train import accuracy, evaluate, predict, resolve_device

STUDENT_FORMAT = "nas_kd.student"


def retrain_targets(ensemble: Ensemble, dataset: Dataset, cfg: SearchConfig, criterion: Criterion,
                    cached: CachedTargets | None = None, progress: bool = True) -> tuple[BatchIterator, TargetSource | None]:
    """Batches over the whole training split and where their targets come from.

    Without augmentation every epoch shows the same pixels, so the teachers' outputs are computed
    once (or taken from the search's cache) and reused by every epoch; with augmentation, or when
    the cache would not fit in `cfg.target_cache_gb`, the teachers run live on fresh views.
    """
    def iterator(views: int | None) -> BatchIterator:
        return BatchIterator(dataset.train, dataset, cfg.train.batch_size, cfg.seed, views=views,
                             augment=cfg.train.augment)

    if not criterion.uses_teachers:
        return iterator(None), None
    if cfg.train.augment:
        return iterator(None), LiveTargets(ensemble, criterion.features)
    batches = iterator(1)
    if cached is not None and cached.covers(batches.indices) and cached.serves(criterion.features):
        return batches, cached
    if not CachedTargets.fits(ensemble, dataset.input_shape, len(dataset.train), 1, criterion.features,
                              cfg.target_cache_gb):
        return iterator(None), LiveTargets(ensemble, criterion.features)
    return batches, CachedTargets(ensemble, batches, criterion.features, progress=progress)


def retrain(spec: Spec, dataset: Dataset, ensemble: Ensemble, cfg: SearchConfig, epochs: int,
            progress: bool = True, cached: CachedTargets | None = None) -> tuple[Network, float]:
    """Distil a fresh `spec` network for `epochs` with the study's recipe; returns it and the seconds."""
    torch.manual_seed(cfg.seed)
    device = dataset.train.x.device
    model = build(spec, dataset.input_shape, dataset.num_classes).to(device)
    criterion = criterion_for(model, cfg.distill, ensemble.feature_channels)
    batches, targets = retrain_targets(ensemble, dataset, cfg, criterion, cached, progress)
    seconds = distill(model, batches, targets, criterion, cfg.train, epochs, desc="retrain", progress=progress,
                      two_stage=cfg.distill.two_stage)
    return model.eval(), seconds


def student_metrics(model: Network, dataset: Dataset) -> dict[str, float]:
    """A final student's test and validation accuracy."""
    return {"test_acc": evaluate(model, dataset.test, dataset), "val_acc": evaluate(model, dataset.val, dataset)}


def teachers_test_metrics(dataset: Dataset, ensemble: Ensemble) -> dict[str, Any]:
    """Each teacher's and the ensemble's test accuracy (the same for every student of a run)."""
    teacher_logits = torch.stack([predict(t.model, dataset.test, dataset) for t in ensemble.members])
    return {
        "teachers_test_acc": {t.name: accuracy(logits, dataset.test.y)
                              for t, logits in zip(ensemble.members, teacher_logits)},
        "ensemble_test_acc": accuracy(soft_targets(teacher_logits, 1.0, ensemble.weights), dataset.test.y),
    }


def test_metrics(model: Network, dataset: Dataset, ensemble: Ensemble) -> dict[str, Any]:
    """The one look at the test set: the student, each teacher and the ensemble."""
    return {**student_metrics(model, dataset), **teachers_test_metrics(dataset, ensemble)}


def export(model: Network, dataset: Dataset, cfg: SearchConfig, metrics: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """`model.safetensors` (weights + self-describing metadata) and `metrics.json` in out_dir."""
    meta = {"format": STUDENT_FORMAT, "spec": str(model.spec), "spec_json": model.spec.to_json(),
            "input_shape": json.dumps(list(dataset.input_shape)), "num_classes": str(dataset.num_classes),
            "classes": json.dumps(list(dataset.classes)), "mean": json.dumps(dataset.mean),
            "std": json.dumps(dataset.std), "config": cfg.to_json(), "versions": json.dumps(versions()),
            "metrics": json.dumps(metrics)}
    weights = out_dir / "model.safetensors"
    save_model(model, weights, meta)
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return weights, metrics_path


def load_student(path: str | Path) -> tuple[Network, dict[str, Any]]:
    """Rebuild an exported student from its file alone; returns (model in eval mode, metadata).

    Inputs are normalised as `(pixels / 255 - mean) / std` per channel with the stored mean/std.
    """
    path = Path(path)
    state = load_state(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:
        meta = {}
    if meta.get("format") != STUDENT_FORMAT:
        raise InputError(f"{path} is not a nas_kd student export (metadata format {meta.get('format')!r}, "
                         f"expected {STUDENT_FORMAT!r})")
    spec = Spec.from_json(meta["spec_json"])
    shape = tuple(json.loads(meta["input_shape"]))
    model = build(spec, shape, int(meta["num_classes"]), channels_last=False)
    model.load_state_dict(state)
    decoded = {k: (json.loads(v) if k in ("input_shape", "classes", "mean", "std", "config", "versions", "metrics")
                   else v) for k, v in meta.items()}
    return model.eval(), decoded


def retrain_winner(study: optuna.Study, dataset: Dataset, ensemble: Ensemble, cfg: SearchConfig,
                   out_dir: Path, progress: bool = True, log=print, cached: CachedTargets | None = None) -> dict[str, Any]:
    """Pick the winner (or cfg.retrain_trial), retrain, test, export, and store the figures in the study."""
    trial = pick_winner(study, cfg.retrain_trial)
    spec = Spec.parse(trial.user_attrs["spec"])
    log(f"retraining trial {trial.number} ({spec}) for {cfg.final_epochs} epochs")
    start = time.perf_counter()
    model, seconds = retrain(spec, dataset, ensemble, cfg, cfg.final_epochs, progress, cached)
    metrics = test_metrics(model, dataset, ensemble)
    metrics = {"trial": trial.number, "spec": str(spec),
               **cost_facts(count(model, dataset.input_shape), ensemble.largest()),
               "search_val_acc": trial.values[0], "final_epochs": cfg.final_epochs, **metrics,
               "train_seconds": round(seconds, 2), "retrain_seconds": round(time.perf_counter() - start, 2),
               "recipe": cfg.distill.describe(), "temperature": cfg.distill.temperature}
    weights, metrics_path = export(model, dataset, cfg, metrics, out_dir)
    metrics["weights"], metrics["metrics_file"] = str(weights), str(metrics_path)
    study.set_user_attr(WINNER_ATTR, metrics)
    return metrics


def finish_retrain(study: optuna.Study, dataset: Dataset, ensemble: Ensemble, cfg: SearchConfig,
                   progress: bool = True, log=log, cached: CachedTargets | None = None) -> dict[str, Any]:
    """Retrain the winner into OUT_DIR/<study>/winner/ and rewrite the study's report."""
    out = Path(cfg.out_dir) / study.study_name
    metrics = retrain_winner(study, dataset, ensemble, cfg, out / "winner", progress, log, cached)
    html_path, _ = write_report(study, out)
    log(f"winner: trial {metrics['trial']} test acc {metrics['test_acc']:.4f} "
        f"(ensemble {metrics['ensemble_test_acc']:.4f}); report {html_path}")
    return metrics


def config_of(study: optuna.Study) -> SearchConfig:
    """The SearchConfig the study's search ran with (stored in the study by the command line)."""
    stored = study.user_attrs.get(STUDY_ATTR, {}).get("config")
    if stored is None:
        raise InputError(f"study {study.study_name!r} was not made by nas_kd.search (no stored config)")
    return from_dict(SearchConfig, stored)


def main(argv: list[str] | None = None) -> int:
    parser = study_parser("python -m nas_kd.retrain",
                          "Retrain a study's winner (or --trial N) with the full schedule, test it and export it;\n"
                          "or, with --online-ensemble K, retrain the top K students of its Pareto front together,\n"
                          "each learning from the ensemble of all of them (into OUT_DIR/<study>/online/).")
    parser.add_argument("--trial", type=int, help="retrain this trial instead of the best feasible one")
    parser.add_argument("--final-epochs", type=int, help="epochs of the retrain (default: the search's)")
    parser.add_argument("--online-ensemble", type=int, metavar="K",
                        help="retrain the K (>= 2) most accurate feasible students of the Pareto front together, "
                             "as an online ensemble (Walawalkar et al., ECCV 2020)")
    parser.add_argument("--with-teachers", action="store_true",
                        help="with --online-ensemble: each student also learns from the offline teachers "
                             "with the study's recipe")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        online = args.online_ensemble is not None
        if online and args.online_ensemble < 2:
            raise InputError(f"--online-ensemble needs at least 2 students, got {args.online_ensemble}")
        if args.with_teachers and not online:
            raise InputError("--with-teachers applies to an online ensemble only; add --online-ensemble K")
        if online and args.trial is not None:
            raise InputError(f"--trial picks one student, --online-ensemble the top {args.online_ensemble}; "
                             "pass one of them")
        study = load_existing(args.storage, args.study_name, Path(args.out_dir))
        cfg = config_of(study)
        if online:
            from nas_kd.online import retrain_online, top_students  # online imports this module

            top_students(study, args.online_ensemble)  # too few students: fail before any teacher is loaded
        overrides: dict[str, Any] = {"device": args.device, "retrain_trial": args.trial, "out_dir": args.out_dir}
        if cfg.cache_dir is None and cfg.cache_path().is_dir():
            # the teachers stay where the search cached them when --out-dir moves only this command's outputs
            overrides["cache_dir"] = str(cfg.cache_path())
        if args.final_epochs is not None:
            if args.final_epochs < 1:
                raise InputError(f"--final-epochs must be >= 1, got {args.final_epochs}")
            overrides["final_epochs"] = args.final_epochs
        cfg = from_dict(SearchConfig, {**cfg.to_dict(), **overrides})
        dataset = load_dataset(cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None).to(resolve_device(cfg.device))
        ensemble = ensemble_from_config(cfg, dataset, not args.quiet, log)
        check_same_teachers(study, ensemble_summary(ensemble))
        if online:
            out = Path(cfg.out_dir) / study.study_name / "online"
            metrics = retrain_online(study, dataset, ensemble, cfg, args.online_ensemble, args.with_teachers, out,
                                     not args.quiet, log)
            write_report(study, out.parent)
        else:
            metrics = finish_retrain(study, dataset, ensemble, cfg, not args.quiet, log)
    except InputError as e:
        return fail(str(e))
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
