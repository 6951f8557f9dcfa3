"""Typed configuration: every default lives here; YAML files and flags override it.

`SearchConfig` is the whole job; `TrainConfig` one training schedule; `DistillConfig` the KD
recipe. `from_dict` refuses unknown keys and wrong types with an error naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas_kd.core.errors import InputError


@dataclass(frozen=True)
class TrainConfig:
    """One-cycle SGD: the learning rate rises linearly for `warmup` of the steps, then falls to 0."""

    batch_size: int = 128
    lr: float = 0.2  # peak learning rate
    momentum: float = 0.9  # Nesterov
    weight_decay: float = 5e-4  # on conv/linear weights; not on BatchNorm or biases
    warmup: float = 0.2  # fraction of all steps
    label_smoothing: float = 0.0
    # padding-crop and flips where the dataset allows them. Off by default: at the short default
    # schedules it cost accuracy (ResNet-8, 3 epochs of Fashion-MNIST: 87.7% val with crop+flip,
    # 89.5% with flips, 90.0% without); turn it on for long schedules
    augment: bool = False
    # bfloat16 autocast of the forward pass (weights, optimizer and loss stay float32). On this
    # project's 2-core CPU it made teacher steps 1.6-1.8x faster, small students' 1.1-1.5x
    # (benchmarks/bf16_step.py); off by default, as every trial score was measured in float32
    bf16: bool = False


@dataclass(frozen=True)
class DistillConfig:
    """A weighted sum of registered losses (see `losses.LOSSES`) and the softmax temperature."""

    losses: tuple[tuple[str, float], ...] = (("ce", 1.0), ("kl", 1.0), ("hint", 1.0))
    temperature: float = 4.0
    # two-stage training (APSIPA 2021 cross-layer KD): this fraction of the epochs trains on the
    # feature losses only (stage one, alignment), the rest on the logit losses only (stage two,
    # KL + CE). 0 = one stage with every loss at once
    two_stage: float = 0.0
    ensemble_weighting: str = "mean"  # or "val_acc": members weighted by validation accuracy

    def weights(self) -> dict[str, float]:
        return dict(self.losses)

    def __str__(self) -> str:
        return ",".join(f"{name}={weight:g}" for name, weight in self.losses)

    def describe(self) -> str:
        """The whole recipe in one line, for logs, reports and checkpoint metadata."""
        extra = [f"T={self.temperature:g}"]
        if self.two_stage:
            extra.append(f"two-stage {self.two_stage:g}")
        if self.ensemble_weighting != "mean":
            extra.append(f"ensemble weighted by {self.ensemble_weighting}")
        return f"{self} ({', '.join(extra)})"


def parse_distill(text: str) -> tuple[tuple[str, float], ...]:
    """'kl,hint=0.5' -> (('kl', 1.0), ('hint', 0.5)); names are checked against the registry later."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise InputError(f"--distill: weight of {name!r} must be a number, got {weight!r}; "
                             "expected e.g. 'ce=1,kl=1,hint=0.5'") from None
        if not (math.isfinite(w) and w >= 0):
            raise InputError(f"--distill: weight of {name!r} must be a finite number >= 0, got {weight!r}")
        out.append((name.strip(), w))
    if not out:
        raise InputError(f"--distill needs at least one loss, e.g. 'ce=1,kl=1', got {text!r}")
    return tuple(out)


@dataclass(frozen=True)
class SearchConfig:
    # budget (MACs of one forward pass of one input; see cost.py)
    flops_budget: int | None = None
    params_budget: int | None = None
    # data
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    subset: int | None = 4000  # training images per trial; None = all
    # teachers
    # WRN-16-2 (77.2M MACs at 28x28, more than the default 50M budget) and ResNet-20; weights for
    # Fashion-MNIST ship with the package (see teachers.SHIPPED_TEACHERS and BENCHMARKS.md)
    teachers: tuple[str, ...] = ("wrn16_2", "resnet20")
    teacher_epochs: int = 3  # for a teacher neither shipped nor cached
    shipped_teachers: bool = True  # use the package's teachers when the dataset's fingerprint matches
    teacher_ckpts: tuple[tuple[str, str], ...] = ()  # (arch, path) pairs
    teacher_files: tuple[str, ...] = ()  # ONNX models or torch.export programs the user has (teaching.files)
    teacher_input: str = "dataset"  # a file teacher's input without metadata: "dataset" (normalised) or "unit"
    ensemble_views: int = 4  # augmented views whose teacher outputs are cached (with --augment)
    target_cache_gb: float = 4.0  # most memory for cached teacher outputs; beyond it teachers run live
    # search
    search_space: str = "resnet"
    trials: int = 10  # trials' worth of training in this run (a pruned trial counts its share)
    timeout: float | None = None  # seconds for the search phase
    trial_epochs: int = 2
    # students that use less than this share of every bound of the budget (budget.Budget.use) are
    # recorded as under the floor and never trained, as over-budget ones are; 0 = off. Applies
    # when there is a MACs or params bound (budget.effective_floor). Off by default: at 0.5 the
    # 50M searches of benchmarks/search_vs_baselines.py picked no better students (validation
    # 94.57% against 94.39% for the default search, 94.27% against 94.38% for random search, 3
    # seeds) and their trials, on bigger students, took longer (BENCHMARKS.md, "The budget floor")
    budget_floor: float = 0.0
    # "on": every sampled shape's widths are scaled to the largest that fit the budget (nas_kd.nas.edge),
    # so trials compare designs at equal cost; "off": trained as sampled (studies made before it)
    budget_edge: str = "on"
    # at the edge: a shape whose repaired stem or a stage is narrower than this many channels (or than
    # the greatest width the space allows there) gives up blocks for width (nas_kd.nas.edge); 0: depths stay as drawn
    edge_min_width: int = 0
    # at the edge: "family": a shape's depths are drawn no deeper than the hand-made ResNet's at this
    # budget (nas_kd.nas.start.depth_cap); "free": as the space allows; "N" (a whole number): at most N
    # blocks a stage
    edge_depth: str = "family"
    # students trained first, before the sampler proposes any (nas_kd.nas.start): "hand-made" (the
    # deepest of ResNet-20/14/8 scaled to the budget) and/or spec strings; each counts towards
    # `trials`, and a resumed study does not train one it holds again
    start_from: tuple[str, ...] = ()
    # how a trial is scored (objective.TRIAL_SCORES): "distill" = validation accuracy after brief
    # whole-network distillation; "blockwise" = DNA-style block-wise score, each student stage
    # trained alone to reproduce a teacher stage (see blockwise.py); "naswot", "synflow" =
    # training-free proxies (proxies.py); "macs", "params" = the cost alone, the baselines
    trial_score: str = "distill"
    # batches of training images (of train.batch_size) whose statistics replace BatchNorm's running
    # ones before every validation pass of a trial; 0 = off (the scores of studies made before it)
    bn_recalibration: int = 8
    trial_reports: int = 4  # validation passes of a distill trial, at equal fractions of its steps
    pruner: str = "median"  # see study.PRUNERS; ignored with objective "pareto"
    sampler: str = "tpe"  # "tpe" (Optuna's multivariate TPE) or "random" (the random-search baseline)
    objective: str = "accuracy"  # or "pareto"
    storage: str | None = None  # default sqlite:///studies/<study>.db
    # many workers, one study (README, "Many workers"): stop once the study holds this many
    # trials' worth of training, from all workers and runs together (None: this run's `trials`)
    study_trials: int | None = None
    worker: bool = False  # run trials only: no retrain, no pruned baseline, no report (run those once, after)
    more: bool = False  # a new run in the study, not the end of the one it holds (nas_kd.pipeline.resume)
    heartbeat: int = 15  # seconds between a running trial's heartbeats; one silent for 3x this is failed and retried
    study_name: str | None = None
    # deployment (nas_kd.device.latency, nas_kd.device.export)
    latency_budget_ms: float | None = None  # ms of one image (batch 1) with ONNX Runtime; None = unbounded
    memory_budget: int | None = None  # bytes of peak int8 activation memory (MCUNet); None = unbounded
    latency_precision: str = "fp32"  # "fp32" or "int8": which ONNX model a trial's latency is of
    latency_threads: int = 1  # ONNX Runtime intra-op threads of every latency measurement
    latency_table: str | None = None  # a time_blocks.py table: predict latencies from it instead of measuring
    pareto_cost: str = "macs"  # the second objective of objective "pareto": "macs" or "latency_ms"
    onnx: bool = True  # measure every trial's latency; export model.onnx and model.int8.onnx with the weights
    # the CPU model.int8.onnx is quantized for (nas_kd.device.int8.TARGETS, or "auto": this one); "x86" = any x86-64
    int8_target: str = "x86"
    # small datasets: a teacher trained here and the retrain make at least `min_steps` optimizer
    # steps, a trial at least min_steps / TRIAL_STEP_SHARE; their epochs are raised to reach them
    # (`adapt_schedule`; 0 = off). 1200 is just under the 1263 steps of the default Fashion-MNIST
    # retrain (3 epochs of 421 batches), so only datasets smaller than that change.
    min_steps: int = 1200
    # a teacher whose validation accuracy closes less than this share of the gap between chance
    # and 100% stops the run (teachers.near_chance); 0 = accept any teacher
    teacher_min_gain: float = 0.1
    # final model
    final_epochs: int = 3
    # padding-crop and flips in the retrain: "auto" = from distill.LONG_RETRAIN_EPOCHS epochs on
    # (or whenever --augment is on), "on", "off". An augmented retrain caches the teachers' outputs
    # for min(ensemble_views, epochs) views when they fit target_cache_gb, else runs them live
    final_augment: str = "auto"
    # the wall-clock seconds of the whole run (nas_kd.pipeline.plan): the run measures its costs and splits
    # them between the search (`trials`, `timeout`) and the retrain (`final_epochs`); None: the
    # counts decide. `time_fixed` names the counts given explicitly, which the plan keeps
    time_budget: float | None = None
    time_fixed: tuple[str, ...] = ()
    # the share of a time budget the search gets (after setup and the export's allowance); the
    # retrain gets the rest (BENCHMARKS.md, "The time budget's split")
    search_share: float = 0.3
    retrain_trial: int | None = None
    # retrain the best `finalists` trials (distinct specs, by trial score) with the full schedule and
    # keep the one of best validation accuracy; 1 = the best trial only. Each costs a retrain.
    finalists: int = 1
    # also L1-prune the largest teacher to the budget and distil it with the same recipe and epochs
    # as the winner (KD in place of fine-tuning after pruning); shown in the report
    pruned_baseline: bool = False
    # recipe
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # environment
    seed: int = 0
    device: str = "auto"
    out_dir: str = "studies"
    cache_dir: str | None = None  # default <out_dir>/cache

    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.out_dir) / "cache"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML or JSON value to the annotated type, naming `key` on failure."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except InputError as e:
                errors.append(str(e))
        raise InputError(errors[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise InputError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{key}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise InputError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise InputError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


# What a run given no count runs for, on the command line and through `nas_kd.run` alike: on the
# 2-core machine, a search and a retrain long enough to flatten the winner's curve (BENCHMARKS.md,
# "The retrain's curve"). Any count, or a worker, stands in its place.
DEFAULT_TIME_BUDGET = 1800.0
COUNTS = ("trials", "final_epochs", "timeout", "study_trials", "worker")


def with_default_time_budget(cfg: SearchConfig, given: set[str]) -> SearchConfig:
    """The one rule for a run's length: with no time budget and none of `COUNTS` among the settings
    `given` (flags typed, keys of a YAML file, fields set on a config), DEFAULT_TIME_BUDGET."""
    if cfg.time_budget is not None or given & {*COUNTS, "time_budget"}:
        return cfg
    return dataclasses.replace(cfg, time_budget=DEFAULT_TIME_BUDGET)


def changed_fields(cfg: SearchConfig) -> set[str]:
    """The settings of `cfg` that differ from the defaults: what a Python caller gave."""
    default = SearchConfig()
    return {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise InputError(f"unknown config key {prefix + str(unknown[0])!r}; known: {', '.join(sorted(names))}")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


TRIAL_STEP_SHARE = 20  # a trial makes at least min_steps / 20 steps: 60 by default, 62 on Fashion-MNIST


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Optimizer steps of one epoch over `images` (data.BatchIterator drops the last partial batch)."""
    return max(1, images // batch_size)


def adapt_schedule(cfg: SearchConfig, train_images: int) -> tuple[SearchConfig, str]:
    """`cfg` with its epochs raised so that teachers, trials and the retrain make at least
    `cfg.min_steps` (trials: `cfg.min_steps / TRIAL_STEP_SHARE`) optimizer steps on a training split
    of `train_images`, and one line saying what each gets. On a small dataset the default epochs
    are far too few: 3 epochs of 1,260 images at batch 128 are 27 steps, and a teacher stays at
    chance. A retrain of 0 epochs (workers, --final-epochs 0) stays 0."""
    batch = cfg.train.batch_size
    full = steps_per_epoch(train_images, batch)
    trial = steps_per_epoch(min(cfg.subset or train_images, train_images), batch)
    trial_steps = -(-cfg.min_steps // TRIAL_STEP_SHARE)

    def raised(epochs: int, per_epoch: int, steps: int) -> int:
        return max(epochs, -(-steps // per_epoch)) if epochs > 0 else 0

    adapted = dataclasses.replace(cfg, teacher_epochs=raised(cfg.teacher_epochs, full, cfg.min_steps),
                                  trial_epochs=raised(cfg.trial_epochs, trial, trial_steps),
                                  final_epochs=raised(cfg.final_epochs, full, cfg.min_steps))
    changed = [f"{what} {getattr(cfg, key)} -> {getattr(adapted, key)} epochs"
               for what, key in (("teachers trained here", "teacher_epochs"), ("trials", "trial_epochs"),
                                 ("retrain", "final_epochs")) if getattr(adapted, key) != getattr(cfg, key)]
    text = (f"schedule: {full} steps an epoch ({train_images} training images, batch {batch}), {trial} a trial "
            f"epoch; at least {cfg.min_steps} steps for a teacher and the retrain, {trial_steps} for a trial "
            f"(--min-steps): " + ("; ".join(changed) if changed else "no epochs raised"))
    return adapted, text
