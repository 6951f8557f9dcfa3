"""The command line of `python -m nas_kd.retrain --study-name NAME`: retrain a study's winner (or
its finalists, or an online ensemble of its top students) with `nas_kd.retrain`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from nas_kd.cli import fail, quiet_libraries, study_parser
from nas_kd.config import SearchConfig, adapt_schedule, from_dict
from nas_kd.convert import require_runtime
from nas_kd.data import load_dataset
from nas_kd.ensemble import ensemble_from_config, ensemble_summary
from nas_kd.errors import InputError
from nas_kd.online import retrain_online, top_students
from nas_kd.progress import log
from nas_kd.report import write_report
from nas_kd.retrain import config_of, finish_retrain
from nas_kd.study import check_same_teachers, load_existing
from nas_kd.train import resolve_device


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
