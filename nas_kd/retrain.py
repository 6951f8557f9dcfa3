"""The command line of `python -m nas_kd.retrain --study-name NAME`: retrain a study's winner (or
its finalists, or an online ensemble of its top students) with `nas_kd.retraining.retrain`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial

from nas_kd.cli import fail, quiet_libraries, study_parser
from nas_kd.core.config import SearchConfig, adapt_schedule, from_dict
from nas_kd.core.errors import InputError
from nas_kd.core.progress import log
from nas_kd.core.units import parse_bytes, parse_count, parse_latency
from nas_kd.data.datasets import load_dataset
from nas_kd.device.convert import require_runtime
from nas_kd.device.int8 import TARGET_NAMES, target_help
from nas_kd.device.latency import LatencySettings, latency_meter
from nas_kd.distill.student import FINAL_AUGMENT
from nas_kd.nas.budget import Budget
from nas_kd.nas.picks import pick_at_budget, stored_cost
from nas_kd.nas.records import SPEC_ATTR
from nas_kd.nas.study import check_same_teachers, load_existing
from nas_kd.nets.arch import Spec
from nas_kd.nets.cost import Cost
from nas_kd.nets.space import load_space
from nas_kd.reporting.html import write_report
from nas_kd.retraining.online import retrain_online, top_students
from nas_kd.retraining.retrain import config_of, finish_retrain, retrain_at_budget
from nas_kd.teaching.ensemble import ensemble_from_config, ensemble_summary
from nas_kd.training.train import resolve_device


def new_budget(args: argparse.Namespace) -> Budget | None:
    """The budget the budget flags give, or None when none is given."""
    budget = Budget(None if args.flops_budget is None else parse_count(args.flops_budget, "--flops-budget"),
                    None if args.params_budget is None else parse_count(args.params_budget, "--params-budget"),
                    None if args.latency_budget is None else parse_latency(args.latency_budget),
                    None if args.memory_budget is None else parse_bytes(args.memory_budget))
    if args.latency_table and budget.latency_ms is None:
        raise InputError("--latency-table prices a latency budget; add --latency-budget")
    return None if budget == Budget() else budget


def budget_price(cfg: SearchConfig, budget: Budget, table: str | None, input_shape: tuple[int, int, int],
                 num_classes: int) -> Callable[[FrozenTrial], Cost]:
    """A trial's cost as `picks.pick_at_budget` judges it: what the trial stored, and where a
    latency bound needs a latency the trial did not record, the table's (given, or the search's)
    or one measured here."""
    if budget.latency_ms is None:
        return stored_cost
    settings = replace(LatencySettings.of(cfg), table=table or cfg.latency_table, measure=True)
    meter, _ = latency_meter(settings, load_space(cfg.search_space), input_shape, num_classes)
    assert meter is not None  # measured when there is no table

    def price(trial: FrozenTrial) -> Cost:
        cost = stored_cost(trial)
        if cost.latency_ms is not None:
            return cost
        return replace(cost, latency_ms=meter(Spec.parse(trial.user_attrs[SPEC_ATTR])))
    return price


def main(argv: list[str] | None = None) -> int:
    parser = study_parser("python -m nas_kd.retrain",
                          "Retrain a study's winner (or --trial N) with the full schedule, test it and export it;\n"
                          "or, with --online-ensemble K, retrain the top K students of its Pareto front together,\n"
                          "each learning from the ensemble of all of them (into OUT_DIR/<study>/online/).")
    parser.add_argument("--trial", type=int, help="retrain this trial instead of the best feasible one")
    parser.add_argument("--final-epochs", type=int, help="epochs of the retrain (default: the search's)")
    parser.add_argument("--final-augment", choices=FINAL_AUGMENT,
                        help="padding-crop and flips in the retrain: auto, on or off (default: the search's; see "
                             "python -m nas_kd.search --help)")
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
    b = parser.add_argument_group("one study, many budgets", "retrain the best trained trial of the study that meets "
                                  "a new budget (any of these, combined), into OUT_DIR/<study>/winner-<budget>/, "
                                  "apart from the winner")
    b.add_argument("--flops-budget", metavar="MACS", help="MACs of one forward pass of one input, e.g. 20M")
    b.add_argument("--params-budget", metavar="N", help="parameters, e.g. 200K")
    b.add_argument("--latency-budget", metavar="TIME", help="latency of one image, e.g. 1.5ms (the trial's stored "
                   "latency; measured here, or predicted from --latency-table, where a trial has none)")
    b.add_argument("--memory-budget", metavar="BYTES", help="peak int8 activation memory, e.g. 48K")
    b.add_argument("--latency-table", metavar="JSON", help="price latencies a trial did not record with this table "
                   "(default: the search's, if it had one)")
    parser.add_argument("--teacher", action="append", metavar="PATH", dest="teacher_file",
                        help="where the study's teacher files (--teacher of the search) are now, in the search's "
                             "order; repeatable. Each must be the file the study distilled from (its digest is "
                             "checked). Default: the paths the search recorded")
    parser.add_argument("--no-onnx", action="store_true", help="export the weights only, no ONNX models")
    parser.add_argument("--int8-target", choices=TARGET_NAMES, metavar="CPU",
                        help=f"the CPU model.int8.onnx is quantized for (default: the search's): {target_help()}")
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
        budget = new_budget(args)
        if budget is not None and (online or args.trial is not None or args.finalists is not None):
            raise InputError(f"a new budget ({budget}) picks its own trial; it does not go with "
                             f"{'--online-ensemble' if online else '--trial' if args.trial is not None else '--finalists'}")
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
        if args.final_augment is not None:
            overrides["final_augment"] = args.final_augment
        if args.finalists is not None:
            overrides["finalists"] = args.finalists
        elif args.trial is not None:
            overrides["finalists"] = 1  # the trial asked for, whatever the search's --finalists was
        if args.no_onnx:
            overrides["onnx"] = False
        if args.int8_target is not None:
            overrides["int8_target"] = args.int8_target
        if args.teacher_file:
            if len(args.teacher_file) != len(cfg.teacher_files):
                raise InputError(f"--teacher: study {study.study_name!r} distilled from {len(cfg.teacher_files)} teacher "
                                 f"file(s) ({', '.join(cfg.teacher_files) or 'none'}); give where each is now, in order")
            overrides["teacher_files"] = [str(Path(p).resolve()) for p in args.teacher_file]
        cfg = from_dict(SearchConfig, {**cfg.to_dict(), **overrides})
        if cfg.onnx:
            require_runtime()  # before any training
        dataset = load_dataset(cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None).to(resolve_device(cfg.device))
        if budget is not None:  # refused before any teacher is loaded when no trial meets it
            price = budget_price(cfg, budget, args.latency_table, dataset.input_shape, dataset.num_classes)
            pick_at_budget(study, budget, price)
        cfg, schedule_text = adapt_schedule(cfg, len(dataset.train))
        log(schedule_text)
        ensemble = ensemble_from_config(cfg, dataset, not args.quiet, log)
        check_same_teachers(study, ensemble_summary(ensemble))
        if online:
            out = Path(cfg.out_dir) / study.study_name / "online"
            metrics = retrain_online(study, dataset, ensemble, cfg, args.online_ensemble, args.with_teachers, out,
                                     not args.quiet, log)
            write_report(study, out.parent)
        elif budget is not None:
            metrics = retrain_at_budget(study, dataset, ensemble, cfg, budget, price, not args.quiet, log)
        else:
            metrics = finish_retrain(study, dataset, ensemble, cfg, not args.quiet, log)
    except InputError as e:
        return fail(str(e))
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
