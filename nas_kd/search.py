"""The command line: `python -m nas_kd.search --flops-budget 50M`.

Parses flags into a `SearchConfig` (defaults, then a --config YAML, then the flags typed) and
hands it to `nas_kd.pipeline.run.search`, which runs the job. Bad input of any kind ends in one line
on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from nas_kd.cli import OneLineParser, arch_path, base_parser, fail, fraction, number, quiet_libraries, typed
from nas_kd.core.config import DEFAULT_TIME_BUDGET, SearchConfig, from_dict, parse_distill, with_default_time_budget
from nas_kd.core.errors import InputError
from nas_kd.core.units import parse_bytes, parse_count, parse_duration, parse_latency
from nas_kd.device.int8 import TARGET_NAMES, target_help
from nas_kd.device.latency import PRECISIONS
from nas_kd.distill.losses import LOSSES
from nas_kd.distill.student import FINAL_AUGMENT, LONG_RETRAIN_EPOCHS
from nas_kd.nas.edge import depth_setting
from nas_kd.nas.objective import TRIAL_SCORES
from nas_kd.nas.study import PRUNERS, SAMPLERS
from nas_kd.nets.zoo import TEACHERS
from nas_kd.pipeline.checks import PARETO_COSTS
from nas_kd.pipeline.resume import Interrupted
from nas_kd.pipeline.run import search
from nas_kd.teaching.ensemble import ENSEMBLE_WEIGHTINGS
from nas_kd.teaching.files import INPUTS

DEFAULTS = SearchConfig()


def _duration_or_off(text: str, flag: str) -> float | None:
    """A --time-budget: a duration, or 'off' for the counts alone."""
    return None if text.strip().lower() == "off" else parse_duration(text, flag)


def _count(flag: str) -> Callable[[str], int]:
    return typed(parse_count, flag)


def _edge_depth(value: str) -> str:
    try:
        depth_setting(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _positive(kind: type, minimum: float = 1) -> Callable[[str], Any]:
    return number(kind, minimum)


EPILOG = """
budgets: MACs (multiply-accumulates of one forward pass of one input image) as counted by
ptflops' aten backend: convolutions and linear layers, which is what the NAS literature calls
"FLOPs". K/M/G are decimal: 50M = 50e6. --latency-budget is one image, batch 1, through the
student's ONNX model with ONNX Runtime (us or ms), measured here or predicted from
--latency-table; --memory-budget is peak int8 activation memory in bytes (MCUNet). A student over
any budget is recorded as infeasible and never trained. At the budget's edge (--budget-edge on,
the default) every sampled shape's widths are first scaled to the largest that fit every bound
(nas_kd.nas.edge), so each trained trial uses at least 95% of its binding bound, or the space's
greatest widths.

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
    g.add_argument("--budget-edge", choices=["on", "off"], default=DEFAULTS.budget_edge,
                   help="on (default): the sampler draws a shape (blocks, depths, kernels, expansions, SE, the "
                        "widths' proportions) and its widths are scaled to the largest that fit every bound, so "
                        "trials compare designs at equal cost; off: students are trained as sampled, as before")
    g.add_argument("--edge-min-width", type=_positive(int, 0), default=DEFAULTS.edge_min_width, metavar="CHANNELS",
                   help="at the budget's edge: a shape whose stem or a stage comes out narrower than this (or than "
                        "the greatest width the space allows there) gives up blocks for width, a narrow stage's "
                        f"first, else the deepest stage's (default {DEFAULTS.edge_min_width}; 0: depths stay as drawn)")
    g.add_argument("--edge-depth", type=_edge_depth, default=DEFAULTS.edge_depth, metavar="family|free|N",
                   help="at the budget's edge: family (default): depths drawn no deeper than the hand-made "
                        "network's (--start-from hand-made: the deepest of ResNet-20/14/8 at 0.45 of its widths or "
                        "more; 2 blocks a stage at 5M MACs, no cap at 50M); free: as the space allows; N: at most N "
                        "blocks a stage")
    g.add_argument("--budget-floor", type=fraction(), metavar="SHARE",
                   help="with --budget-edge off only (the edge replaces it): students using less than this share "
                        "of every bound of the budget are not trained (default 0: off; applies with a MACs or "
                        "params budget). At 0.5 it picked no better students under 50M MACs (BENCHMARKS.md)")
    g.add_argument("--latency-budget", type=typed(parse_latency, "--latency-budget"), metavar="TIME",
                   help="most milliseconds for one image (batch 1) with ONNX Runtime, with a unit: e.g. 500us, 2ms; "
                        "measured on this machine, or predicted from --latency-table")
    g.add_argument("--memory-budget", type=typed(parse_bytes, "--memory-budget"), metavar="BYTES",
                   help="most bytes of peak int8 activation memory (MCUNet's definition), for microcontrollers: "
                        "e.g. 256K (decimal) or 320KiB (binary)")
    g.add_argument("--latency-precision", choices=list(PRECISIONS), default=DEFAULTS.latency_precision,
                   help="the model whose latency is measured and bounded: fp32 (default) or int8 (static "
                        "post-training quantization)")
    g.add_argument("--latency-threads", type=_positive(int), default=DEFAULTS.latency_threads,
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
    g.add_argument("--subset", type=_positive(int, 10), default=DEFAULTS.subset, metavar="N",
                   help=f"training images per trial, a fixed seeded subset (default {DEFAULTS.subset})")
    g = p.add_argument_group("teachers")
    g.add_argument("--teachers", default=",".join(DEFAULTS.teachers),
                   help=f"comma-separated ensemble (default {','.join(DEFAULTS.teachers)}); known: {', '.join(TEACHERS)}; none: only the --teacher files")
    g.add_argument("--teacher-epochs", type=_positive(int), default=DEFAULTS.teacher_epochs,
                   help=f"epochs to train a missing teacher (default {DEFAULTS.teacher_epochs}); trained teachers are cached")
    g.add_argument("--no-shipped-teachers", action="store_true",
                   help="do not use the teachers shipped with nas_kd (Fashion-MNIST wrn16_2 and resnet20); use "
                        "cached ones or train them")
    g.add_argument("--teacher-ckpt", type=arch_path, action="append", default=[], metavar="ARCH=PATH",
                   help="use your own weights for teacher ARCH (safetensors, or a torch state dict); repeatable")
    g.add_argument("--teacher", action="append", default=[], metavar="PATH", dest="teacher_file",
                   help="a teacher you already have, beside --teachers: an ONNX model (run with ONNX Runtime) or a "
                        "program saved with torch.export.save; repeatable. It joins the ensemble's soft targets "
                        "(logits only: feature losses use the zoo's members). Checked on the data before any trial")
    g.add_argument("--teacher-input", choices=INPUTS, default=DEFAULTS.teacher_input,
                   help="what a --teacher file takes when its metadata does not say (nas_kd.input): dataset: "
                        "inputs normalised by the dataset's per-channel mean and std, as the students' are "
                        "(default); unit: pixels / 255 in [0, 1]")
    g = p.add_argument_group("search")
    g.add_argument("--search-space", default=DEFAULTS.search_space,
                   help="a shipped space (resnet, mobilenetv2) or a path to a YAML file (default resnet)")
    g.add_argument("--trials", type=_positive(int, 0), default=DEFAULTS.trials,
                   help=f"trials' worth of training to run now (default {DEFAULTS.trials}): a trial counts 1, a pruned "
                        "one the share of its steps it trained; over-budget specs and specs already scored count "
                        "nothing")
    g.add_argument("--timeout", type=_positive(float, 1), metavar="SECONDS",
                   help="stop starting trials after this many seconds")
    g.add_argument("--time-budget", type=typed(_duration_or_off, "--time-budget"), metavar="DURATION",
                   help="wall-clock time for the whole run, e.g. 90s, 30m, 2h: the run times a trial and a retrain "
                        "epoch here and splits the time between the search and the retrain (one line at the start "
                        "says how); --trials and --final-epochs given explicitly keep their counts. Default "
                        f"{DEFAULT_TIME_BUDGET / 60:.0f}m when no count (--trials, --final-epochs, --timeout, --study-trials, "
                        "--worker) is given; "
                        f"off: the counts alone ({DEFAULTS.trials} trials, {DEFAULTS.final_epochs} retrain epochs)")
    g.add_argument("--search-share", type=fraction(zero=False), default=DEFAULTS.search_share, metavar="FRACTION",
                   help=f"the search's share of a time budget, the retrain getting the rest (default "
                        f"{DEFAULTS.search_share})")
    g.add_argument("--start-from", action="append", metavar="hand-made|SPEC",
                   help="train this student first, before the sampler proposes any; repeatable. hand-made: the "
                        "deepest of ResNet-20/14/8 scaled to fit the budget (He et al. 2016), what a person would "
                        "pick without a search; SPEC: any student, e.g. 'c16|basic_d2_w16_s1_k3_e1|"
                        "basic_d3_w32_s2_k3_e1|basic_d3_w64_s2_k3_e1'. Each counts towards --trials, and is retrained "
                        "beside the best trial whatever its trial score, kept only if better on validation: one "
                        f"more retrain each (default: {', '.join(DEFAULTS.start_from) or 'none'})")
    g.add_argument("--trial-epochs", type=_positive(int), default=DEFAULTS.trial_epochs,
                   help=f"distillation epochs per trial (default {DEFAULTS.trial_epochs})")
    g.add_argument("--trial-score", choices=list(TRIAL_SCORES), default=DEFAULTS.trial_score,
                   help="distill: a trial's score is its validation accuracy after --trial-epochs of whole-network "
                        "distillation, BatchNorm recalibrated (default); blockwise: each student stage is trained "
                        "alone to reproduce a teacher stage from the teacher's input (DNA), the score is the mean R^2 "
                        "over stages, and stages shared between trials are scored once; naswot, synflow: "
                        "training-free proxies of the untrained network (NASWOT, Mellor et al. 2021; SynFlow, Tanaka "
                        "et al. 2020), about a second per spec; macs, params: the cost alone, the baselines every "
                        "score must beat (see BENCHMARKS.md for how each ranks students)")
    g.add_argument("--bn-recalibration", type=_positive(int, 0),
                   default=DEFAULTS.bn_recalibration, metavar="BATCHES",
                   help="before every validation pass of a distill trial, re-estimate BatchNorm statistics from "
                        f"this many fixed training batches (default {DEFAULTS.bn_recalibration}; 0 = off, as in "
                        "studies made before it: resume those with 0)")
    g.add_argument("--trial-reports", type=_positive(int), default=DEFAULTS.trial_reports,
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
    g.add_argument("--study-trials", type=_positive(int), metavar="N",
                   help="stop once the study holds N trials' worth of training from all its workers and runs "
                        "together (instead of --trials more in this run): workers started with the same "
                        "command share the work (README, 'Many workers, one study')")
    g.add_argument("--worker", action="store_true",
                   help="one of several processes sharing a study (--storage postgresql://...): run trials only; "
                        "no retrain, no pruned baseline and no report, which `python -m nas_kd.retrain` then "
                        "makes once")
    g.add_argument("--study-name", help="the same name resumes a study (default: derived from dataset, budget "
                                        "and a hash of the settings trials depend on)")
    g.add_argument("--more", action="store_true",
                   help="start a new run in the study instead of finishing the one it holds: the same command "
                        "after an interruption finishes the run it began (the trials left, then the retrain from "
                        "its last epoch) and after a finished run does nothing; --more searches again (--trials "
                        "more, or a fresh --time-budget) and retrains")
    g = p.add_argument_group("distillation")
    g.add_argument("--distill", default=str(DEFAULTS.distill),
                   help=f"weighted losses, NAME[=WEIGHT],... (default {DEFAULTS.distill}); known: {', '.join(LOSSES)} "
                        "(see the README for each method's paper)")
    g.add_argument("--two-stage", type=fraction(), default=DEFAULTS.distill.two_stage, metavar="FRACTION",
                   help="two-stage training: this fraction of every training's epochs uses only the feature losses "
                        "(hint, crosslayer, at, rtk), the rest only the logit losses (ce, kl); 0 = one stage (default)")
    g.add_argument("--ensemble-weighting", choices=list(ENSEMBLE_WEIGHTINGS), default=DEFAULTS.distill.ensemble_weighting,
                   help="how the teachers' outputs are combined: mean (default), or val_acc: weighted by each "
                        "teacher's validation accuracy")
    g.add_argument("--temperature", type=_positive(float, 1e-3), default=DEFAULTS.distill.temperature,
                   help=f"softmax temperature of the KL loss (default {DEFAULTS.distill.temperature:g})")
    g.add_argument("--batch-size", type=_positive(int), default=DEFAULTS.train.batch_size)
    g.add_argument("--lr", type=_positive(float, 1e-6), default=DEFAULTS.train.lr,
                   help=f"peak learning rate of the one-cycle SGD schedule (default {DEFAULTS.train.lr:g})")
    g.add_argument("--augment", action="store_true",
                   help="padding-crop and flip augmentation on whole batches (off by default: it costs "
                        "accuracy at short schedules; worth it from ~10 epochs on)")
    g.add_argument("--min-steps", type=_positive(int, 0), default=DEFAULTS.min_steps, metavar="N",
                   help=f"small datasets: teachers trained here and the retrain make at least N optimizer steps, "
                        f"a trial N/20; their epochs are raised to reach them (default {DEFAULTS.min_steps}, which "
                        "changes nothing on Fashion-MNIST; 0 = off)")
    g.add_argument("--teacher-min-gain", type=fraction(), default=DEFAULTS.teacher_min_gain,
                   metavar="FRACTION",
                   help="stop the run when a teacher's validation accuracy closes less than this share of the gap "
                        f"from chance to 100%% (default {DEFAULTS.teacher_min_gain:g}: below 19%% for 10 classes); "
                        "0 = accept any teacher")
    g = p.add_argument_group("final model")
    g.add_argument("--final-epochs", type=_positive(int, 0), default=DEFAULTS.final_epochs,
                   help=f"epochs of the winner's retrain (default {DEFAULTS.final_epochs}; 0 = no retrain)")
    g.add_argument("--final-augment", choices=FINAL_AUGMENT, default=DEFAULTS.final_augment,
                   help="padding-crop and flips in the retrain: auto (default: "
                        + (f"from {LONG_RETRAIN_EPOCHS} epochs on" if LONG_RETRAIN_EPOCHS else "only with --augment")
                        + "; BENCHMARKS.md, \"The retrain's curve\"), on, or off; the teachers' outputs are cached "
                        "for up to --ensemble-views views")
    g.add_argument("--pruned-baseline", action="store_true",
                   help="also L1-prune the largest teacher's filters until it fits the budget, keep its weights, and "
                        "distil it with the winner's recipe and epochs (and fine-tune it, for comparison); shown "
                        "in the report")
    g.add_argument("--retrain-trial", type=_positive(int, 0), metavar="N",
                   help="retrain trial N instead of the best feasible one")
    g.add_argument("--finalists", type=_positive(int), default=DEFAULTS.finalists, metavar="K",
                   help="retrain the K best trials (distinct students, by trial score) with the full schedule and "
                        "keep the one of best validation accuracy; the test set sees only that one (default "
                        f"{DEFAULTS.finalists}: the best trial only; each finalist costs a retrain)")
    g.add_argument("--no-onnx", action="store_true",
                   help="export the weights only (no model.onnx / model.int8.onnx) and do not measure the trials' "
                        "latency (unless a latency flag asks for it)")
    g.add_argument("--int8-target", choices=TARGET_NAMES, default=DEFAULTS.int8_target, metavar="CPU",
                   help="the CPU model.int8.onnx is quantized for, its settings checked against fp32 on validation "
                        f"images: {target_help()}")
    g = p.add_argument_group("run")
    g.add_argument("--config", metavar="YAML", help="a YAML file of SearchConfig keys; flags given override it")
    g.add_argument("--seed", type=int, default=DEFAULTS.seed)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default=DEFAULTS.device,
                   help="auto: the GPU when there is one (default)")
    g.add_argument("--out-dir", default=DEFAULTS.out_dir, help="where storage, reports and exports go (default studies)")
    g.add_argument("--cache-dir", help="where trained teachers are cached (default OUT_DIR/cache)")
    g.add_argument("--heartbeat", type=_positive(int), default=DEFAULTS.heartbeat, metavar="SECONDS",
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
    """Defaults, then the --config YAML, then the flags the user actually typed. With no time
    budget and no count given either way, the run gets DEFAULT_TIME_BUDGET."""
    base: dict[str, Any] = SearchConfig().to_dict()
    loaded: dict[str, Any] = {}
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
                 "heartbeat", "budget_floor", "budget_edge", "edge_min_width", "edge_depth", "finalists", "time_budget", "final_augment", "search_share"):
        flag(name)
    if "time_budget" in given:  # the counts given explicitly keep their part of the plan
        base["time_fixed"] = [k for k in ("trials", "final_epochs") if k in given]
    elif "time_budget" not in loaded:  # the bare command: a time, not counts (the rule nas_kd.run follows too)
        given_or_loaded = given | {k for k, v in loaded.items() if v not in (None, False)}
        base["time_budget"] = with_default_time_budget(SearchConfig(), given_or_loaded).time_budget
    if "search_share" in given and base["time_budget"] is None:
        raise InputError("--search-share splits a time budget between the search and the retrain, and this run has "
                         "none (counts were given, or --time-budget off); give --time-budget too, or drop it")
    flag("start_from", convert=lambda v: list(dict.fromkeys(v)))
    flag("latency_budget", "latency_budget_ms")
    flag("teachers", convert=lambda v: [t.strip() for t in v.split(",") if t.strip() and t.strip() != "none"])
    flag("teacher_ckpt", "teacher_ckpts", convert=lambda v: [list(x) for x in v])
    flag("teacher_file", "teacher_files", convert=lambda v: [str(Path(p).resolve()) for p in v])
    flag("teacher_input")
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
    if args.more:
        base["more"] = True
    return from_dict(SearchConfig, base)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = given_flags(argv)
    quiet_libraries()
    try:
        cfg = config_from_args(args, given)
        search(cfg, progress=not args.quiet)
    except InputError as e:
        return fail(str(e))
    except Interrupted as e:  # the run stored how far it got
        print(f"\ninterrupted: {e.next}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted before the search began: nothing is stored; run the same command again",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

