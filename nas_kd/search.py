"""The command line: `python -m nas_kd.search --flops-budget 50M`.

Parses flags into a `SearchConfig`, then wires the pipeline: data -> teachers -> cached
ensemble targets -> Optuna trials -> report -> retrain of the winner -> report again.
Bad input of any kind ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import yaml
from tqdm.auto import tqdm

from nas_kd.arch import Spec
from nas_kd.baselines import check_prunable, pruned_baseline
from nas_kd.blockwise import BlockwiseScorer, most_accurate
from nas_kd.cli import OneLineParser, bars_shown, base_parser, fail, log, number, quiet_libraries
from nas_kd.config import SearchConfig, adapt_schedule, from_dict, parse_distill
from nas_kd.cost import Budget, Cost, format_count, parse_count
from nas_kd.data import BatchIterator, load_dataset, seeded_subset
from nas_kd.distill import check_two_stage
from nas_kd.errors import InputError
from nas_kd.latency import (
    PRECISIONS,
    check_precision,
    latency_meter,
    parse_bytes,
    parse_latency,
    peak_activations,
    require_runtime,
)
from nas_kd.losses import LOSSES, Criterion, loss_class, recipe_features, recipe_uses_teachers
from nas_kd.objective import TRIAL_SCORES, run_trial, trial_context, trial_score_named
from nas_kd.records import (
    FAIL_ATTR,
    REPEAT_ATTR,
    SPEC_ATTR,
    START_ATTR,
    USE_ATTR,
    status,
    stored_blockwise_scores,
    training_done,
    trial_score,
    violated_bounds,
    was_trained,
)
from nas_kd.report import write_report
from nas_kd.retrain import finish_retrain
from nas_kd.space import SHIPPED, SearchSpace, describe, load_space
from nas_kd.start import start_points
from nas_kd.study import (
    BASELINE_ATTR,
    COMPRESSION_TEACHER_KEY,
    GUARDED_KEYS,
    LATE_GUARDED_KEYS,
    PRUNERS,
    SAMPLERS,
    STUDY_ATTR,
    WINNER_ATTR,
    check_same_teachers,
    check_study_name,
    check_url,
    default_study_name,
    enqueue_start_points,
    open_storage,
    open_study,
    run,
    storage_url,
    study_training,
    update_study_attr,
)
from nas_kd.teachers import (
    ENSEMBLE_WEIGHTINGS,
    TEACHERS,
    CachedTargets,
    check_weighting,
    ensemble_from_config,
    ensemble_summary,
    teacher_cost,
    teacher_names,
)
from nas_kd.train import resolve_device

DEFAULTS = SearchConfig()
PARETO_COSTS = ("macs", "latency_ms")  # the Cost fields --objective pareto can minimise


def _typed(convert: Callable[[str, str], Any], flag: str) -> Callable[[str], Any]:
    """An argparse type from one of nas_kd's parsers (`parse_count`, `parse_latency`, `parse_bytes`)."""
    def parse(text: str) -> Any:
        try:
            return convert(text, flag)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _count(flag: str) -> Callable[[str], int]:
    return _typed(parse_count, flag)


def _positive(kind: type, flag: str, minimum: float = 1) -> Callable[[str], Any]:
    return number(kind, minimum)


def _fraction(flag: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}") from None
        if not 0 <= value < 1:
            raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
        return value
    return parse


def _ckpt(text: str) -> tuple[str, str]:
    arch, sep, path = text.partition("=")
    if not sep or not arch or not path:
        raise argparse.ArgumentTypeError(f"expected ARCH=PATH, e.g. resnet56=weights.safetensors; got {text!r}")
    return arch, path


EPILOG = """
budgets: MACs (multiply-accumulates of one forward pass of one input image) as counted by
ptflops' aten backend: convolutions and linear layers, which is what the NAS literature calls
"FLOPs". K/M/G are decimal: 50M = 50e6. --latency-budget is one image, batch 1, through the
student's ONNX model with ONNX Runtime (us or ms), measured here or predicted from
--latency-table; --memory-budget is peak int8 activation memory in bytes (MCUNet). A student over
any budget is recorded as infeasible and never trained, and so is one under --budget-floor.

outputs (OUT_DIR defaults to ./studies):
  OUT_DIR/<study>.db                Optuna storage (unless --storage); open it with
                                    optuna-dashboard sqlite:///studies/<study>.db
  OUT_DIR/<study>/report.html       self-contained Pareto report; trials.csv beside it
  OUT_DIR/<study>/winner/           model.safetensors (weights + spec + config), model.onnx and
                                    model.int8.onnx (checked with ONNX Runtime), metrics.json
  OUT_DIR/cache/teachers/           trained teachers, reused by later searches

examples:
  python -m nas_kd.search --flops-budget 50M
  python -m nas_kd.search --flops-budget 10M --params-budget 100K --teachers resnet56,wrn40_2 --trials 40
  python -m nas_kd.search --dataset cifar10 --flops-budget 20M --objective pareto --storage postgresql://u:p@host/db
"""


def build_parser() -> OneLineParser:
    p = base_parser("python -m nas_kd.search", "Search the most accurate student CNN within a MACs/params budget, "
                    "distilled from an ensemble of teachers; report the Pareto front; retrain and export the winner.")
    p.epilog = EPILOG
    g = p.add_argument_group("budget")
    g.add_argument("--flops-budget", type=_count("--flops-budget"), metavar="MACS",
                   help="most MACs of one forward pass, e.g. 300K, 50M, 1.5G, 2.5e6 (ptflops 'FLOPs')")
    g.add_argument("--params-budget", type=_count("--params-budget"), metavar="N",
                   help="most trainable parameters, e.g. 100K, 1.5M")
    g.add_argument("--budget-floor", type=_fraction("--budget-floor"), metavar="SHARE",
                   help="students using less than this share of every bound of the budget (MACs, params, "
                        "latency, memory) are not trained, as over-budget ones are not (default 0: off; applies "
                        "with a MACs or params budget; lowered when the space's largest student uses less of it: "
                        "the log says to what). At 0.5 it picked no better students under 50M MACs (BENCHMARKS.md)")
    g.add_argument("--latency-budget", type=_typed(parse_latency, "--latency-budget"), metavar="TIME",
                   help="most milliseconds for one image (batch 1) with ONNX Runtime, with a unit: e.g. 500us, 2ms; "
                        "measured on this machine, or predicted from --latency-table")
    g.add_argument("--memory-budget", type=_typed(parse_bytes, "--memory-budget"), metavar="BYTES",
                   help="most bytes of peak int8 activation memory (MCUNet's definition), for microcontrollers: "
                        "e.g. 256K (decimal) or 320KiB (binary)")
    g.add_argument("--latency-precision", choices=list(PRECISIONS), default=DEFAULTS.latency_precision,
                   help="the model whose latency is measured and bounded: fp32 (default) or int8 (static "
                        "post-training quantization)")
    g.add_argument("--latency-threads", type=_positive(int, "--latency-threads"), default=DEFAULTS.latency_threads,
                   metavar="N", help=f"ONNX Runtime threads of every latency measurement (default {DEFAULTS.latency_threads})")
    g.add_argument("--latency-table", metavar="JSON",
                   help="predict latencies from this per-layer table, timed on the target device "
                        "(python -m nas_kd.latency blocks, then time_blocks.py there), instead of measuring here")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=DEFAULTS.dataset,
                   help="fashion-mnist (default), mnist, cifar10, cifar100, svhn, or folder:PATH with "
                        "PATH/train/<class>/*.png [and PATH/test/<class>/*.png]")
    g.add_argument("--data-dir", help="where datasets are looked for and downloaded (default: ./data; "
                                      "Fashion-MNIST also /usr/share/datasets/fashion-mnist)")
    g.add_argument("--subset", type=_positive(int, "--subset", 10), default=DEFAULTS.subset, metavar="N",
                   help=f"training images per trial, a fixed seeded subset (default {DEFAULTS.subset})")
    g = p.add_argument_group("teachers")
    g.add_argument("--teachers", default=",".join(DEFAULTS.teachers),
                   help=f"comma-separated ensemble (default {','.join(DEFAULTS.teachers)}); known: {', '.join(TEACHERS)}")
    g.add_argument("--teacher-epochs", type=_positive(int, "--teacher-epochs"), default=DEFAULTS.teacher_epochs,
                   help=f"epochs to train a missing teacher (default {DEFAULTS.teacher_epochs}); trained teachers are cached")
    g.add_argument("--no-shipped-teachers", action="store_true",
                   help="do not use the teachers shipped with nas_kd (Fashion-MNIST wrn16_2 and resnet20); use "
                        "cached ones or train them")
    g.add_argument("--teacher-ckpt", type=_ckpt, action="append", default=[], metavar="ARCH=PATH",
                   help="use your own weights for teacher ARCH (safetensors, or a torch state dict); repeatable")
    g = p.add_argument_group("search")
    g.add_argument("--search-space", default=DEFAULTS.search_space,
                   help="a shipped space (resnet, mobilenetv2) or a path to a YAML file (default resnet)")
    g.add_argument("--trials", type=_positive(int, "--trials", 0), default=DEFAULTS.trials,
                   help=f"trials' worth of training to run now (default {DEFAULTS.trials}): a trial counts 1, a pruned "
                        "one the share of its steps it trained; over-budget specs and specs already scored count "
                        "nothing")
    g.add_argument("--timeout", type=_positive(float, "--timeout", 1), metavar="SECONDS",
                   help="stop starting trials after this many seconds")
    g.add_argument("--start-from", action="append", metavar="hand-made|SPEC",
                   help="train this student first, before the sampler proposes any; repeatable. hand-made: the "
                        "deepest of ResNet-20/14/8 scaled to fit the budget (He et al. 2016), what a person would "
                        "pick without a search; SPEC: any student, e.g. 'c16|basic_d2_w16_s1_k3_e1|"
                        "basic_d3_w32_s2_k3_e1|basic_d3_w64_s2_k3_e1'. Each counts towards --trials, and is retrained "
                        "beside the best trial whatever its trial score, kept only if better on validation: one "
                        f"more retrain each (default: {', '.join(DEFAULTS.start_from) or 'none'})")
    g.add_argument("--trial-epochs", type=_positive(int, "--trial-epochs"), default=DEFAULTS.trial_epochs,
                   help=f"distillation epochs per trial (default {DEFAULTS.trial_epochs})")
    g.add_argument("--trial-score", choices=list(TRIAL_SCORES), default=DEFAULTS.trial_score,
                   help="distill: a trial's score is its validation accuracy after --trial-epochs of whole-network "
                        "distillation, BatchNorm recalibrated (default); blockwise: each student stage is trained "
                        "alone to reproduce a teacher stage from the teacher's input (DNA), the score is the mean R^2 "
                        "over stages, and stages shared between trials are scored once; naswot, synflow: "
                        "training-free proxies of the untrained network (NASWOT, Mellor et al. 2021; SynFlow, Tanaka "
                        "et al. 2020), about a second per spec; macs, params: the cost alone, the baselines every "
                        "score must beat (see BENCHMARKS.md for how each ranks students)")
    g.add_argument("--bn-recalibration", type=_positive(int, "--bn-recalibration", 0),
                   default=DEFAULTS.bn_recalibration, metavar="BATCHES",
                   help="before every validation pass of a distill trial, re-estimate BatchNorm statistics from "
                        f"this many fixed training batches (default {DEFAULTS.bn_recalibration}; 0 = off, as in "
                        "studies made before it: resume those with 0)")
    g.add_argument("--trial-reports", type=_positive(int, "--trial-reports"), default=DEFAULTS.trial_reports,
                   metavar="N", help=f"validation passes per distill trial, at equal fractions of its steps "
                                     f"(default {DEFAULTS.trial_reports}): the steps the pruner acts on")
    g.add_argument("--pruner", choices=list(PRUNERS), default=DEFAULTS.pruner,
                   help=f"stops unpromising distill trials at a validation pass (default {DEFAULTS.pruner}); a "
                        "pruned trial counts towards --trials as the share of its steps it trained, so pruning buys "
                        "more candidates in the same time. With --objective pareto no trial is pruned "
                        "(Optuna cannot prune multi-objective studies): every trial trains to its end")
    g.add_argument("--sampler", choices=list(SAMPLERS), default=DEFAULTS.sampler,
                   help="tpe: Optuna's multivariate TPE, its first 8 trials random (default); random: random search, "
                        "the baseline to compare a search with (benchmarks/search_vs_baselines.py)")
    g.add_argument("--objective", choices=["accuracy", "pareto"], default=DEFAULTS.objective,
                   help="accuracy: maximise validation accuracy with the budgets as constraints, with a median "
                        "pruner; pareto: maximise accuracy and minimise --pareto-cost (no pruning: Optuna cannot "
                        "prune multi-objective studies)")
    g.add_argument("--pareto-cost", choices=list(PARETO_COSTS), default=DEFAULTS.pareto_cost,
                   help="the second objective of --objective pareto: macs (default) or latency_ms")
    g.add_argument("--storage", help="Optuna storage URL (default sqlite:///OUT_DIR/<study>.db; postgresql://... "
                                     "lets several workers share one study)")
    g.add_argument("--study-trials", type=_positive(int, "--study-trials"), metavar="N",
                   help="stop once the study holds N trials' worth of training from all its workers and runs "
                        "together (instead of --trials more in this run): workers started with the same "
                        "command share the work (README, 'Many workers, one study')")
    g.add_argument("--worker", action="store_true",
                   help="one of several processes sharing a study (--storage postgresql://...): run trials only; "
                        "no retrain, no pruned baseline and no report, which `python -m nas_kd.retrain` then "
                        "makes once")
    g.add_argument("--study-name", help="the same name resumes a study (default: derived from dataset, budget "
                                        "and a hash of the settings trials depend on)")
    g = p.add_argument_group("distillation")
    g.add_argument("--distill", default=str(DEFAULTS.distill),
                   help=f"weighted losses, NAME[=WEIGHT],... (default {DEFAULTS.distill}); known: {', '.join(LOSSES)} "
                        "(see the README for each method's paper)")
    g.add_argument("--two-stage", type=_fraction("--two-stage"), default=DEFAULTS.distill.two_stage, metavar="FRACTION",
                   help="two-stage training: this fraction of every training's epochs uses only the feature losses "
                        "(hint, crosslayer, at, rtk), the rest only the logit losses (ce, kl); 0 = one stage (default)")
    g.add_argument("--ensemble-weighting", choices=list(ENSEMBLE_WEIGHTINGS), default=DEFAULTS.distill.ensemble_weighting,
                   help="how the teachers' outputs are combined: mean (default), or val_acc: weighted by each "
                        "teacher's validation accuracy")
    g.add_argument("--temperature", type=_positive(float, "--temperature", 1e-3), default=DEFAULTS.distill.temperature,
                   help=f"softmax temperature of the KL loss (default {DEFAULTS.distill.temperature:g})")
    g.add_argument("--batch-size", type=_positive(int, "--batch-size"), default=DEFAULTS.train.batch_size)
    g.add_argument("--lr", type=_positive(float, "--lr", 1e-6), default=DEFAULTS.train.lr,
                   help=f"peak learning rate of the one-cycle SGD schedule (default {DEFAULTS.train.lr:g})")
    g.add_argument("--augment", action="store_true",
                   help="padding-crop and flip augmentation on whole batches (off by default: it costs "
                        "accuracy at short schedules; worth it from ~10 epochs on)")
    g.add_argument("--min-steps", type=_positive(int, "--min-steps", 0), default=DEFAULTS.min_steps, metavar="N",
                   help=f"small datasets: teachers trained here and the retrain make at least N optimizer steps, "
                        f"a trial N/20; their epochs are raised to reach them (default {DEFAULTS.min_steps}, which "
                        "changes nothing on Fashion-MNIST; 0 = off)")
    g.add_argument("--teacher-min-gain", type=_fraction("--teacher-min-gain"), default=DEFAULTS.teacher_min_gain,
                   metavar="FRACTION",
                   help="stop the run when a teacher's validation accuracy closes less than this share of the gap "
                        f"from chance to 100%% (default {DEFAULTS.teacher_min_gain:g}: below 19%% for 10 classes); "
                        "0 = accept any teacher")
    g = p.add_argument_group("final model")
    g.add_argument("--final-epochs", type=_positive(int, "--final-epochs", 0), default=DEFAULTS.final_epochs,
                   help=f"epochs of the winner's retrain (default {DEFAULTS.final_epochs}; 0 = no retrain)")
    g.add_argument("--pruned-baseline", action="store_true",
                   help="also L1-prune the largest teacher's filters until it fits the budget, keep its weights, and "
                        "distil it with the winner's recipe and epochs (and fine-tune it, for comparison); shown "
                        "in the report")
    g.add_argument("--retrain-trial", type=_positive(int, "--retrain-trial", 0), metavar="N",
                   help="retrain trial N instead of the best feasible one")
    g.add_argument("--finalists", type=_positive(int, "--finalists"), default=DEFAULTS.finalists, metavar="K",
                   help="retrain the K best trials (distinct students, by trial score) with the full schedule and "
                        "keep the one of best validation accuracy; the test set sees only that one (default "
                        f"{DEFAULTS.finalists}: the best trial only; each finalist costs a retrain)")
    g.add_argument("--no-onnx", action="store_true",
                   help="export the weights only (no model.onnx / model.int8.onnx) and do not measure the trials' "
                        "latency (unless a latency flag asks for it)")
    g = p.add_argument_group("run")
    g.add_argument("--config", metavar="YAML", help="a YAML file of SearchConfig keys; flags given override it")
    g.add_argument("--seed", type=int, default=DEFAULTS.seed)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default=DEFAULTS.device,
                   help="auto: the GPU when there is one (default)")
    g.add_argument("--out-dir", default=DEFAULTS.out_dir, help="where storage, reports and exports go (default studies)")
    g.add_argument("--cache-dir", help="where trained teachers are cached (default OUT_DIR/cache)")
    g.add_argument("--heartbeat", type=_positive(int, "--heartbeat"), default=DEFAULTS.heartbeat, metavar="SECONDS",
                   help=f"a running trial writes a heartbeat every SECONDS (default {DEFAULTS.heartbeat}); a trial "
                        "silent for 3x that (its process was killed) is failed and retried once by the next run "
                        "or another worker")
    g.add_argument("--quiet", action="store_true", help="no progress bars, one log line per trial and epoch")
    return p


def given_flags(argv: list[str] | None) -> set[str]:
    """The dests of the flags actually typed (so a YAML --config is overridden only by them)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def config_from_args(args: argparse.Namespace, given: set[str]) -> SearchConfig:
    """Defaults, then the --config YAML, then the flags the user actually typed."""
    base: dict[str, Any] = SearchConfig().to_dict()
    if args.config:
        try:
            loaded = yaml.safe_load(Path(args.config).read_text())
        except OSError as e:
            raise InputError(f"cannot read --config {args.config}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise InputError(f"{args.config}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise InputError(f"{args.config}: expected a mapping of SearchConfig keys")
        for key in ("train", "distill"):
            if isinstance(loaded.get(key), dict):
                loaded[key] = {**base[key], **loaded[key]}
        base.update(loaded)
        from_dict(SearchConfig, base)  # names the bad key, with the file's values

    def flag(name: str, key: str | None = None, convert=lambda v: v) -> None:
        if name in given:
            base[key or name] = convert(getattr(args, name))

    for name in ("flops_budget", "params_budget", "dataset", "data_dir", "subset", "teacher_epochs",
                 "search_space", "trials", "timeout", "trial_epochs", "objective", "storage", "study_name",
                 "final_epochs", "retrain_trial", "seed", "device", "out_dir", "cache_dir", "trial_score",
                 "bn_recalibration", "trial_reports", "pruner", "sampler", "latency_precision", "latency_threads",
                 "latency_table", "memory_budget", "pareto_cost", "min_steps", "teacher_min_gain", "study_trials",
                 "heartbeat", "budget_floor", "finalists"):
        flag(name)
    flag("start_from", convert=lambda v: list(dict.fromkeys(v)))
    flag("latency_budget", "latency_budget_ms")
    flag("teachers", convert=lambda v: [t.strip() for t in v.split(",") if t.strip()])
    flag("teacher_ckpt", "teacher_ckpts", convert=lambda v: [list(x) for x in v])
    # flags of the nested configs: (flag dest, section, key)
    nested = (("batch_size", "train", "batch_size"), ("lr", "train", "lr"), ("temperature", "distill", "temperature"),
              ("two_stage", "distill", "two_stage"), ("ensemble_weighting", "distill", "ensemble_weighting"))
    base["train"], base["distill"] = dict(base["train"]), dict(base["distill"])
    for dest, section, key in nested:
        if dest in given:
            base[section][key] = getattr(args, dest)
    if args.augment:
        base["train"]["augment"] = True
    if "distill" in given:
        base["distill"]["losses"] = [list(x) for x in parse_distill(args.distill)]
    if args.pruned_baseline:
        base["pruned_baseline"] = True
    if args.no_shipped_teachers:
        base["shipped_teachers"] = False
    if args.no_onnx:
        base["onnx"] = False
    if args.worker:
        base["worker"] = True
    return from_dict(SearchConfig, base)


def validate(cfg: SearchConfig) -> SearchConfig:
    if all(getattr(cfg, k) is None for k in ("flops_budget", "params_budget", "latency_budget_ms", "memory_budget")):
        raise InputError("give a budget: --flops-budget (MACs, e.g. 50M), --params-budget (e.g. 500K), "
                         "--latency-budget (e.g. 2ms) and/or --memory-budget (e.g. 256K)")
    if cfg.study_name is not None:
        check_study_name(cfg.study_name)
    trial_score_named(cfg.trial_score)
    if cfg.sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {cfg.sampler!r}; known: {', '.join(SAMPLERS)}")
    if cfg.pruner not in PRUNERS:
        raise InputError(f"unknown pruner {cfg.pruner!r}; known: {', '.join(PRUNERS)}")
    if cfg.bn_recalibration < 0 or cfg.trial_reports < 1:
        raise InputError(f"bn_recalibration must be >= 0 and trial_reports >= 1, got {cfg.bn_recalibration} "
                         f"and {cfg.trial_reports}")
    if cfg.objective not in ("accuracy", "pareto"):
        raise InputError(f"objective must be 'accuracy' or 'pareto', got {cfg.objective!r}")
    if cfg.pareto_cost not in PARETO_COSTS:
        raise InputError(f"unknown pareto cost {cfg.pareto_cost!r}; known: {', '.join(PARETO_COSTS)}")
    check_precision(cfg.latency_precision)
    if cfg.latency_threads < 1:
        raise InputError(f"latency_threads must be >= 1, got {cfg.latency_threads}")
    for key in ("latency_budget_ms", "memory_budget"):
        value = getattr(cfg, key)
        if value is not None and not value > 0:
            raise InputError(f"{key} must be positive, got {value!r}")
    if cfg.onnx or cfg.latency_budget_ms is not None or cfg.pareto_cost == "latency_ms" or cfg.latency_table:
        require_runtime()
    resolve_device(cfg.device)
    names = teacher_names(cfg)
    if not names:
        raise InputError("no teachers: pass --teachers, e.g. --teachers resnet20")
    for name in names:
        if name not in TEACHERS:
            raise InputError(f"unknown teacher {name!r}; known: {', '.join(TEACHERS)}")
    if len(set(cfg.teachers)) != len(cfg.teachers):
        raise InputError(f"--teachers lists a teacher twice: {','.join(cfg.teachers)}")
    for name, _ in cfg.distill.losses:
        loss_class(name)
    Criterion(cfg.distill.weights(), [8], [[8]], cfg.distill.temperature)  # weights and temperature
    check_two_stage(cfg.distill)
    check_weighting(cfg.distill.ensemble_weighting)
    if cfg.heartbeat < 1 or (cfg.study_trials is not None and cfg.study_trials < 1):
        raise InputError(f"heartbeat must be >= 1 s and study_trials >= 1, got {cfg.heartbeat} and {cfg.study_trials}")
    if cfg.finalists < 1:
        raise InputError(f"finalists must be >= 1, got {cfg.finalists}")
    if cfg.finalists > 1 and cfg.retrain_trial is not None:
        raise InputError(f"--retrain-trial picks one trial and --finalists {cfg.finalists} the best "
                         f"{cfg.finalists}; give one of them")
    if not 0 <= cfg.budget_floor < 1:
        raise InputError(f"budget_floor must be a share in [0, 1), got {cfg.budget_floor}")
    if cfg.min_steps < 0 or not 0 <= cfg.teacher_min_gain < 1:
        raise InputError(f"min_steps must be >= 0 and teacher_min_gain in [0, 1), got {cfg.min_steps} and "
                         f"{cfg.teacher_min_gain}")
    for key in ("trial_epochs", "teacher_epochs", "ensemble_views"):
        if getattr(cfg, key) < 1:
            raise InputError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.train.batch_size < 1 or cfg.train.lr <= 0:
        raise InputError(f"batch size and learning rate must be positive, got {cfg.train.batch_size}, {cfg.train.lr}")
    return cfg


def space_id(space: SearchSpace) -> str:
    """A shipped space by name; any other by its absolute path."""
    path = Path(space.source).resolve()
    return space.name if path.parent == SHIPPED.resolve() else str(path)


def guarded(cfg: SearchConfig, space_source: str) -> dict[str, Any]:
    """The settings a study's trials depend on. Settings added after a study format was first
    released are included only when they differ from their default, so that older studies keep
    their names and still resume."""
    d = cfg.to_dict()
    d["search_space"] = space_source
    if cfg.train.bf16 == DEFAULTS.train.bf16:  # added later, like LATE_GUARDED_KEYS
        del d["train"]["bf16"]
    d["distill"] = {"losses": [list(x) for x in cfg.distill.losses], "temperature": cfg.distill.temperature}
    for key in ("two_stage", "ensemble_weighting"):
        if getattr(cfg.distill, key) != getattr(DEFAULTS.distill, key):
            d["distill"][key] = getattr(cfg.distill, key)
    if not d["budget_floor"]:  # off: not recorded, so studies made before the floor keep their names
        del d["budget_floor"]
    return {k: d[k] for k in GUARDED_KEYS if k in d and (k not in LATE_GUARDED_KEYS or d[k] != getattr(DEFAULTS, k))}


LATENCY_PROBES = 8  # random specs timed before a search with a latency budget (besides the smallest ones)
TABLE_PROBES = 500  # random specs predicted from a latency table for the same check


def check_reachable(cfg: SearchConfig, space: SearchSpace, input_shape: tuple[int, int, int], num_classes: int,
                    smallest: list[Spec], latency: Callable[[Spec], float] | None) -> None:
    """Before any training: a memory budget below the space's least peak (`SearchSpace.least_peak`,
    exact) is refused, as is a latency budget that none of the space's smallest specs and a seeded
    sample of others meets, naming the best spec found."""
    if cfg.memory_budget is not None:
        spec, peak = space.least_peak(input_shape, num_classes, peak_activations)
        if peak > cfg.memory_budget:
            raise InputError(f"no student of search space {space.name!r} meets --memory-budget "
                             f"{format_count(cfg.memory_budget)}B: its lowest peak int8 activation memory is "
                             f"{format_count(peak)}B, by {spec}; raise the budget or use a smaller space")
    if cfg.latency_budget_ms is not None and latency is not None:
        probes = TABLE_PROBES if cfg.latency_table else LATENCY_PROBES
        specs = list(dict.fromkeys(smallest + space.random_specs(probes, cfg.seed)))
        best = min((latency(spec), str(spec)) for spec in specs)
        if best[0] > cfg.latency_budget_ms:
            raise InputError(f"no student of search space {space.name!r} meets --latency-budget "
                             f"{cfg.latency_budget_ms:.4g} ms: the lowest {cfg.latency_precision} latency of "
                             f"{len(specs)} specs tried (the smallest and {probes} random ones) is {best[0]:.4g} ms, "
                             f"by {best[1]}; raise the budget or use a smaller space")


def effective_floor(share: float, budget: Budget, space: SearchSpace, input_shape: tuple[int, int, int],
                    num_classes: int) -> tuple[float, str]:
    """The budget floor a search applies, and one line saying so ("" when `share` is 0). 0 without a MACs or params
    bound (nothing cheap tells how much of a latency bound the space reaches). `share` of the
    budget when the space's largest student (`SearchSpace.largest`) uses at least that much of its
    MACs or params bound; else `share` of what that student uses, so that a budget beyond the
    space still trains its larger students instead of rejecting every one."""
    if not share:
        return 0.0, ""
    if budget.macs is None and budget.params is None:
        return 0.0, "budget floor: none, as the budget has no MACs or params bound"
    _, cost = space.largest(input_shape, num_classes)
    reach = budget.use(Cost(cost.macs, cost.params))
    if reach >= share:
        return share, (f"budget floor: students using less than {share:.0%} of every bound of the budget are not "
                       "trained (--budget-floor)")
    floor = share * reach
    return floor, (f"budget floor: the space's largest student uses {reach:.0%} of the budget, so the floor is "
                   f"{share:.0%} of that, {floor:.1%} of the budget (--budget-floor)")


def budget_warning(budget: Budget, teachers: list[str], input_shape: tuple[int, int, int],
                   num_classes: int) -> str | None:
    """One line when the budget admits students larger than the largest teacher (then some
    students would not compress it), naming both costs; None when every student is smaller."""
    costs = {name: teacher_cost(name, input_shape, num_classes) for name in teachers}
    over = []
    for kind, limit in (("macs", budget.macs), ("params", budget.params)):
        name = max(costs, key=lambda n: getattr(costs[n], kind))
        if limit is not None and limit > getattr(costs[name], kind):
            unit = "MACs" if kind == "macs" else "params"
            over.append(f"{format_count(limit)} {unit} > teacher {name}'s {format_count(getattr(costs[name], kind))}")
    if not over:
        return None
    return ("warning: the budget admits students larger than the largest teacher (" + "; ".join(over) +
            "): those would not compress it; lower the budget or use larger --teachers")


def compression_text(ratio: float) -> str:
    return f"x{ratio:.2f} smaller" if ratio >= 1 else f"x{1 / ratio:.2f} LARGER"


def trial_text(cfg: SearchConfig, images: int) -> str:
    """One line: how this search's trials are scored (and pruned)."""
    kind = trial_score_named(cfg.trial_score)
    if not kind.trains:
        return f"trial score {cfg.trial_score}: computed from the untrained spec, nothing trained; no pruning"
    schedule = f"{cfg.trial_epochs} epoch{'s' if cfg.trial_epochs > 1 else ''} x {images} images"
    recal = (f"BatchNorm recalibrated on {cfg.bn_recalibration} batches before validation" if cfg.bn_recalibration
             else "no BatchNorm recalibration")
    if kind.blockwise:
        return f"trial score {cfg.trial_score}: {schedule} per stage; no pruning"
    pruner = "none (--objective pareto cannot prune)" if cfg.objective == "pareto" else cfg.pruner
    return (f"trial score {cfg.trial_score}: {schedule}, {recal}, {cfg.trial_reports} validation passes; "
            f"pruner {pruner}")


def trial_line(trial: optuna.trial.FrozenTrial) -> str:
    """One log line for a finished trial: number, state, spec, MACs, score, seconds (and why it
    was not trained, or failed)."""
    a = trial.user_attrs
    score = trial_score(trial) if was_trained(trial) else None
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    kind = status(trial)
    start = f" ({a[START_ATTR]} start point)" if START_ATTR in a else ""
    parts = [f"trial {trial.number} {kind}{start}", a.get(SPEC_ATTR, "?"),
             f"{format_count(a['macs'])} MACs" if "macs" in a else "", f"score {score:.4f}" if score is not None else "",
             f"{seconds:.1f} s"]
    if kind == "failed" and FAIL_ATTR in a:
        parts.append(a[FAIL_ATTR])
    elif kind == "repeat":
        parts.append(f"repeat of trial {a[REPEAT_ATTR]}: not trained again")
    elif kind == "under_floor":
        parts.append(f"under the budget floor (uses {a.get(USE_ATTR, 0):.0%} of the budget): not trained")
    elif kind == "over_budget":
        violated = violated_bounds(trial)
        parts.append(f"over budget ({', '.join(violated)}): not trained" if violated else "not trained")
    return ": ".join([parts[0], ", ".join(p for p in parts[1:] if p)])


def summary_table(study: optuna.Study, cfg: SearchConfig, url: str, seconds: float) -> str:
    info = study.user_attrs.get(STUDY_ATTR, {})
    winner = study.user_attrs.get(WINNER_ATTR)
    trials = study.get_trials(deepcopy=False)
    trained = sum(was_trained(t) for t in trials)
    floor = info.get("budget_floor")
    budget = info.get("budget_text", "") + (f"; floor {floor:.0%} of a bound" if floor else "")
    under = sum(status(t) == "under_floor" for t in trials)
    rows = [("study", study.study_name), ("storage", url), ("budget", budget),
            ("trials", f"{len(trials)} in the study, {trained} trained, {len(trials) - trained} not trained"
                       + (f" ({under} under the floor)" if under else ""))]
    for t in info.get("teachers", []):
        rows.append((f"teacher {t['name']}", f"{format_count(t['macs'])} MACs, {format_count(t['params'])} params, "
                                             f"val acc {t['val_acc']:.4f}"))
    if winner:
        rows += [("winner", f"trial {winner['trial']}: {winner['spec']}"),
                 ("winner cost", f"{format_count(winner['macs'])} MACs ({compression_text(winner['macs_compression'])}), "
                                 f"{format_count(winner['params'])} params "
                                 f"({compression_text(winner['params_compression'])}) than the largest teacher"),
                 ("winner accuracy", f"test {winner['test_acc']:.4f}, val {winner['val_acc']:.4f} after "
                                     f"{winner['final_epochs']} epochs; teacher ensemble test {winner['ensemble_test_acc']:.4f}"),
                 ("winner files", str(Path(winner["weights"]).parent))]
        if winner.get("finalists"):
            rows.append(("finalists", "retrained, kept on validation: " + ", ".join(
                f"trial {f['trial']}{' (' + f['start_point'] + ')' if 'start_point' in f else ''} {f['val_acc']:.4f}"
                for f in winner["finalists"])))
        if "onnx_test_acc" in winner:
            int8 = (f"; int8: test {winner['int8_test_acc']:.4f}, {winner['latency_ms_int8']:.3f} ms"
                    if "int8_test_acc" in winner else "")
            rows.append(("winner on ONNX Runtime", f"fp32: test {winner['onnx_test_acc']:.4f}, "
                                                   f"{winner['latency_ms_fp32']:.3f} ms{int8} (batch 1, here)"))
    for b in study.user_attrs.get(BASELINE_ATTR, {}).get("methods", []):
        rows.append((b["method"], f"{format_count(b['macs'])} MACs, test {b['test_acc']:.4f} after {b['final_epochs']} epochs"))
    out = Path(cfg.out_dir) / study.study_name
    rows += [("report", str(out / "report.html")), ("dashboard", f"optuna-dashboard {url}"),
             ("wall time", f"{seconds / 60:.1f} min")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def search(cfg: SearchConfig, progress: bool = True) -> optuna.Study:
    """The whole job; returns the study. Bad settings raise `InputError` before any work."""
    start = time.perf_counter()
    validate(cfg)
    # every check of the user's input comes before the first progress line and any training
    space = load_space(cfg.search_space)
    budget = Budget(cfg.flops_budget, cfg.params_budget, cfg.latency_budget_ms, cfg.memory_budget)
    if cfg.storage:
        check_url(cfg.storage)
    dataset = load_dataset(cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None)
    (min_macs_spec, min_macs), (min_params_spec, min_params) = space.smallest(dataset.input_shape, dataset.num_classes)
    if (budget.macs is not None and min_macs.macs > budget.macs) or (budget.params is not None and min_params.params > budget.params):
        raise InputError(f"no student of search space {space.name!r} fits {budget}: the smallest reach "
                         f"{format_count(min_macs.macs)} MACs ({min_macs_spec}) and {format_count(min_params.params)} "
                         f"params at input {'x'.join(map(str, dataset.input_shape))}; raise the budget or use another space")
    cfg, schedule_text = adapt_schedule(cfg, len(dataset.train))
    latency, latency_text = latency_meter(cfg, space, dataset.input_shape, dataset.num_classes)
    check_reachable(cfg, space, dataset.input_shape, dataset.num_classes, [min_macs_spec, min_params_spec], latency)
    floor, floor_text = effective_floor(cfg.budget_floor, budget, space, dataset.input_shape, dataset.num_classes)
    starts, starts_skipped = start_points(cfg.start_from, space, budget, dataset.input_shape, dataset.num_classes,
                                          floor, latency if cfg.latency_table else None)
    if cfg.pruned_baseline:
        check_prunable(cfg, dataset.input_shape, dataset.num_classes)
    device = resolve_device(cfg.device)
    log(f"dataset {dataset.name}: {len(dataset.train)} train / {len(dataset.val)} val / {len(dataset.test)} test "
        f"images of {'x'.join(map(str, dataset.input_shape))}, {dataset.num_classes} classes; device {device}")
    dataset = dataset.to(device)
    log(f"search space {describe(space)}; budget {budget}")
    log(schedule_text)
    log(latency_text)
    if floor_text:
        log(floor_text)
    if (warning := budget_warning(budget, teacher_names(cfg), dataset.input_shape, dataset.num_classes)):
        log(warning)

    keys = guarded(cfg, space_id(space))
    name = cfg.study_name or default_study_name(keys)
    url = storage_url(cfg.storage, name, Path(cfg.out_dir))
    study = open_study(open_storage(url, interval=cfg.heartbeat), name, cfg.objective == "pareto", cfg.seed, keys, cfg.pruner,
                       cfg.trial_reports, cfg.sampler)
    if cfg.objective == "pareto" and cfg.pruner != "none":
        log("--objective pareto: trials are not pruned (Optuna cannot prune multi-objective studies); "
            "every trial trains to its end")
    log(f"study {name} in {url} ({len(study.trials)} trials already)")
    for line in starts_skipped:
        log(line)

    ensemble = ensemble_from_config(cfg, dataset, progress, log)
    check_same_teachers(study, ensemble_summary(ensemble))
    ensemble_val = ensemble.accuracy(dataset.val, dataset)
    compression_teacher = ensemble.largest_member()
    update_study_attr(study, STUDY_ATTR, {
        "config": cfg.to_dict(), "space": space.name,
        "budget": {"macs": budget.macs, "params": budget.params, "latency_ms": budget.latency_ms, "memory": budget.memory},
        "budget_text": str(budget), "budget_floor": floor, "teachers": ensemble_summary(ensemble), "ensemble": {"val_acc": ensemble_val},
        COMPRESSION_TEACHER_KEY: f"{compression_teacher.name} for MACs, "
                          f"{max(ensemble.members, key=lambda t: t.cost.params).name} for params",
        "recipe": cfg.distill.describe(), "input_shape": list(dataset.input_shape)})
    log(f"ensemble of {len(ensemble.members)}: val acc {ensemble_val:.4f}")

    subset = seeded_subset(len(dataset.train), cfg.subset, cfg.seed)
    views = min(cfg.ensemble_views, cfg.trial_epochs) if cfg.train.augment else 1
    batches = BatchIterator(dataset.train, dataset, cfg.train.batch_size, cfg.seed, views=views,
                            augment=cfg.train.augment, indices=subset)
    features = recipe_features(cfg.distill.weights())
    targets, scorer = None, None
    if trial_score_named(cfg.trial_score).blockwise:
        best = most_accurate(ensemble.members)
        # no BatchNorm recalibration here: measured, it left the block-wise ranking as it was
        # (Spearman -0.40 without, -0.38 with, 20 students under 5M MACs; BENCHMARKS.md)
        scorer = BlockwiseScorer(best, dataset, batches, cfg.train, cfg.trial_epochs, cfg.seed)
        scorer.preload(stored_blockwise_scores(study))
        log(f"block-wise scores against teacher {best.name}; {len(scorer.scores)} stage scores from earlier trials")
    elif recipe_uses_teachers(cfg.distill.weights()):
        # without augmentation the retrain sees the same pixels every epoch: cache its targets too
        whole = cfg.final_epochs > 0 and not cfg.worker and not cfg.train.augment and CachedTargets.fits(
            ensemble, dataset.input_shape, len(dataset.train), views, features, cfg.target_cache_gb)
        cover = BatchIterator(dataset.train, dataset, cfg.train.batch_size, cfg.seed, views=views,
                              augment=cfg.train.augment, indices=None if whole else subset)
        targets = CachedTargets(ensemble, cover, features, progress=progress)
        log(f"cached ensemble targets for {len(cover.indices)} images x {views} views "
            f"({targets.nbytes() / 1e6:.0f} MB){' (trials and retrain)' if whole else ''}")
    ctx = trial_context(space, dataset, ensemble, budget, batches, targets, cfg, progress, scorer, latency, floor)
    log(trial_text(cfg, len(subset)))

    # the bar counts trials' worth of training, as --trials does: a pruned trial its share
    bar = tqdm(total=cfg.trials, desc="trials", unit="trial", disable=not progress or None, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.2f}/{total} [{elapsed}<{remaining}{postfix}]")
    pruned = []

    lines = not bars_shown(progress)  # no bars (--quiet, or stderr is a log file): a line per trial

    def on_trial(trial: optuna.trial.FrozenTrial) -> None:
        if lines:
            log(trial_line(trial))
        if was_trained(trial):
            bar.update(training_done(trial))
            if trial.state == optuna.trial.TrialState.PRUNED:
                pruned.append(training_done(trial))
            bar.set_postfix_str(f"#{trial.number} score {trial_score(trial):.4f} "
                                f"{format_count(trial.user_attrs['macs'])} MACs")

    out = Path(cfg.out_dir) / name
    # the start points go in only now, when this run trains (a run refused above, or one with
    # nothing to train, leaves the study as it was)
    if cfg.trials > 0 if cfg.study_trials is None else study_training(study) < cfg.study_trials:
        for line in enqueue_start_points(study, starts):
            log(line)
    try:
        trained = run(study, lambda trial: run_trial(ctx, trial), cfg.trials, cfg.timeout, on_trial,
                      study_target=cfg.study_trials)
    finally:
        bar.close()
        if not cfg.worker:  # workers leave the report to the one retrain after them
            write_report(study, out)
    done = f" ({len(pruned)} pruned, {trained - len(pruned) + sum(pruned):.2f} trials' worth of training)" if pruned else ""
    if cfg.worker:
        log(f"{trained} trials trained by this worker{done}; the study holds "
            f"{study_training(study):.2f} trials' worth. When every worker is done, run once: "
            f"python -m nas_kd.retrain --study-name {name} --storage '{url}'")
    else:
        log(f"{trained} trials trained in this run{done}; report {out / 'report.html'}")
        if cfg.final_epochs == 0:
            finalists = f" its {cfg.finalists} best trials" if cfg.finalists > 1 else " its winner"
            log(f"--final-epochs 0: nothing retrained; to retrain{finalists}: python -m nas_kd.retrain "
                f"--study-name {name} --storage '{url}'")
    if cfg.final_epochs > 0 and not cfg.worker:
        finish_retrain(study, dataset, ensemble, cfg, progress, log, targets)
        if cfg.pruned_baseline:
            pruned_baseline(study, dataset, ensemble, cfg, out, progress, log, targets)
            write_report(study, out)
    print(f"\nnas_kd search finished\n{summary_table(study, cfg, url, time.perf_counter() - start)}")
    return study


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = given_flags(argv)
    quiet_libraries()
    try:
        cfg = config_from_args(args, given)
        search(cfg, progress=not args.quiet)
    except InputError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print("\ninterrupted: every finished trial is in the storage; run the same command again to resume "
              "(the interrupted trial is retried)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

