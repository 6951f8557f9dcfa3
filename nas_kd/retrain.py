"""Retrain the winner with the full schedule, test it once beside the teachers, export it.

    python -m nas_kd.retrain --study-name NAME [--trial N | --finalists K] [--final-epochs E]

Without augmentation the teachers' outputs are computed once for the whole training split (or
taken from the search's cache); with it, the teachers run live on a fresh view every epoch
(`distill.retrain_targets`). The winner is exported by `nas_kd.export`: safetensors weights that
describe themselves, an ONNX model and an int8 ONNX model, both checked with ONNX Runtime.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import optuna

from nas_kd.arch import Network, Spec, build
from nas_kd.cli import fail, log, quiet_libraries, study_parser
from nas_kd.config import SearchConfig, adapt_schedule, from_dict
from nas_kd.cost import count
from nas_kd.data import Dataset, load_dataset
from nas_kd.distill import criterion_for, retrain_student, retrain_targets
from nas_kd.errors import InputError
from nas_kd.export import export, student_metrics, teachers_test_metrics
from nas_kd.latency import require_runtime
from nas_kd.online import retrain_online, top_students
from nas_kd.records import LATENCY_ATTR, SPEC_ATTR, cost_facts
from nas_kd.report import write_report
from nas_kd.study import (
    STUDY_ATTR,
    WINNER_ATTR,
    check_same_teachers,
    finalists,
    load_existing,
    pick_winner,
    retrain_candidates,
    start_names,
)
from nas_kd.teachers import CachedTargets, Ensemble, ensemble_from_config, ensemble_summary
from nas_kd.train import evaluate, resolve_device


def retrain(spec: Spec, dataset: Dataset, ensemble: Ensemble, cfg: SearchConfig, epochs: int,
            progress: bool = True, cached: CachedTargets | None = None) -> tuple[Network, float]:
    """Distil a fresh `spec` network for `epochs` with the study's recipe; returns it and the seconds."""
    device = dataset.train.x.device
    return retrain_student(lambda: build(spec, dataset.input_shape, dataset.num_classes).to(device), dataset,
                           ensemble, cfg, epochs, progress=progress, cached=cached, epoch_lines=True)


def test_metrics(model: Network, dataset: Dataset, ensemble: Ensemble) -> dict[str, Any]:
    """The one look at the test set: the student, each teacher and the ensemble."""
    return {**student_metrics(model, dataset), **teachers_test_metrics(dataset, ensemble)}


def retrain_winner(study: optuna.Study, dataset: Dataset, ensemble: Ensemble, cfg: SearchConfig,
                   out_dir: Path, progress: bool = True, log=print, cached: CachedTargets | None = None) -> dict[str, Any]:
    """Pick the winner (or cfg.retrain_trial), retrain, test, export, and store the figures in the study.

    With cfg.finalists K > 1 the K best trials are each retrained and the one of best validation
    accuracy is the winner (ties: the better trial score); only it is tested and exported. The
    study's start points (`study.retrain_candidates`) are retrained beside them, whatever their
    trial scores, and win only on validation too."""
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
        _, shared = retrain_targets(ensemble, dataset, cfg, criterion_for(first, cfg.distill, ensemble.feature_channels),
                                    cached, progress)
        cached = shared if isinstance(shared, CachedTargets) else cached
    rows: list[dict[str, Any]] = []
    best: tuple[float, optuna.trial.FrozenTrial, Spec, Network, float] | None = None
    for rank, trial in enumerate(candidates, 1):
        spec = Spec.parse(trial.user_attrs[SPEC_ATTR])
        start_point = names.get(str(spec))
        label = f" ({start_point} start point)" if start_point else ""
        which = f"finalist {rank} of {len(candidates)}{label}: " if many else ""
        log(f"retraining {which}trial {trial.number} ({spec}) for {cfg.final_epochs} epochs")
        model, seconds = retrain(spec, dataset, ensemble, cfg, cfg.final_epochs, progress, cached)
        val = evaluate(model, dataset.val, dataset) if many else 0.0
        if many:
            rows.append({"trial": trial.number, "spec": str(spec), "search_val_acc": trial.values[0], "val_acc": val,
                         "train_seconds": round(seconds, 2),
                         **({"start_point": start_point} if start_point else {})})
            log(f"finalist {rank}: trial {trial.number} val acc {val:.4f} after the retrain "
                f"(trial score {trial.values[0]:.4g})")
        if best is None or val > best[0]:  # only the best model is kept in memory
            best = (val, trial, spec, model, seconds)
        del model  # before the next finalist trains
    assert best is not None
    _, trial, spec, model, seconds = best
    if many:
        log(f"finalists: trial {trial.number} has the best validation accuracy ({best[0]:.4f}); testing it")
    metrics = test_metrics(model, dataset, ensemble)
    metrics = {"trial": trial.number, "spec": str(spec),
               **cost_facts(count(model, dataset.input_shape), ensemble.largest()),
               "latency_ms": trial.user_attrs.get(LATENCY_ATTR),
               "search_val_acc": trial.values[0], "final_epochs": cfg.final_epochs, **metrics,
               "train_seconds": round(seconds, 2), "retrain_seconds": round(time.perf_counter() - start, 2),
               "recipe": cfg.distill.describe(), "temperature": cfg.distill.temperature,
               **({"finalists": rows} if many else {})}
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
    parser.add_argument("--finalists", type=int, metavar="K",
                        help="retrain the K best trials (distinct students) and keep the one of best validation "
                             "accuracy; only it is tested (default: the search's, 1). The study's start points "
                             "(--start-from) are retrained beside them")
    parser.add_argument("--online-ensemble", type=int, metavar="K",
                        help="retrain the K (>= 2) most accurate feasible students of the Pareto front together, "
                             "as an online ensemble (Walawalkar et al., ECCV 2020)")
    parser.add_argument("--with-teachers", action="store_true",
                        help="with --online-ensemble: each student also learns from the offline teachers "
                             "with the study's recipe")
    parser.add_argument("--no-onnx", action="store_true", help="export the weights only, no ONNX models")
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
        if args.finalists is not None and (args.finalists < 1 or online or args.trial is not None):
            raise InputError(f"--finalists must be >= 1, got {args.finalists}" if args.finalists < 1 else
                             f"--finalists {args.finalists} picks the winner by retraining the best {args.finalists}; "
                             f"it does not go with {'--online-ensemble' if online else '--trial'}")
        study = load_existing(args.storage, args.study_name, Path(args.out_dir))
        cfg = config_of(study)
        if online:
            top_students(study, args.online_ensemble)  # too few students: fail before any teacher is loaded
        overrides: dict[str, Any] = {"device": args.device, "retrain_trial": args.trial, "out_dir": args.out_dir}
        if cfg.cache_dir is None and cfg.cache_path().is_dir():
            # the teachers stay where the search cached them when --out-dir moves only this command's outputs
            overrides["cache_dir"] = str(cfg.cache_path())
        if args.final_epochs is not None:
            if args.final_epochs < 1:
                raise InputError(f"--final-epochs must be >= 1, got {args.final_epochs}")
            overrides["final_epochs"] = args.final_epochs
        elif cfg.final_epochs == 0:  # searched with --final-epochs 0: nothing retrained then, so nothing to repeat
            overrides["final_epochs"] = SearchConfig().final_epochs
            log(f"the search ran with --final-epochs 0: retraining for the default {SearchConfig().final_epochs} "
                "epochs (--final-epochs E for others)")
        if args.finalists is not None:
            overrides["finalists"] = args.finalists
        elif args.trial is not None:
            overrides["finalists"] = 1  # the trial asked for, whatever the search's --finalists was
        if args.no_onnx:
            overrides["onnx"] = False
        cfg = from_dict(SearchConfig, {**cfg.to_dict(), **overrides})
        if cfg.onnx:
            require_runtime()  # before any training
        dataset = load_dataset(cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None).to(resolve_device(cfg.device))
        cfg, schedule_text = adapt_schedule(cfg, len(dataset.train))
        log(schedule_text)
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
