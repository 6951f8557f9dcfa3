"""The run's first phase: every setting checked before any work (`validate`), and the line that
says how the search's trials are scored (`trial_text`)."""

from __future__ import annotations

from nas_kd.core.config import SearchConfig
from nas_kd.core.errors import InputError
from nas_kd.device.convert import require_runtime
from nas_kd.device.int8 import check_target
from nas_kd.device.latency import check_precision
from nas_kd.distill.losses import Criterion, loss_class
from nas_kd.distill.student import RetrainRecipe, check_two_stage
from nas_kd.nas.edge import depth_setting
from nas_kd.nas.objective import trial_score_named
from nas_kd.nas.study import (
    PRUNERS,
    SAMPLERS,
    check_study_name,
)
from nas_kd.nets.zoo import TEACHERS
from nas_kd.pipeline.plan import (
    check_time_budget,
)
from nas_kd.teaching.ensemble import (
    check_weighting,
    teacher_names,
)
from nas_kd.teaching.files import INPUTS
from nas_kd.training.train import resolve_device

PARETO_COSTS = ("macs", "latency_ms")  # the Cost fields --objective pareto can minimise


def validate(cfg: SearchConfig) -> SearchConfig:
    if all(getattr(cfg, k) is None for k in ("flops_budget", "params_budget", "latency_budget_ms", "memory_budget")):
        raise InputError("give a budget: --flops-budget (MACs, e.g. 50M), --params-budget (e.g. 500K), "
                         "--latency-budget (e.g. 2ms) and/or --memory-budget (e.g. 256K)")
    if cfg.study_name is not None:
        check_study_name(cfg.study_name)
    trial_score_named(cfg.trial_score)
    check_time_budget(cfg)
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
    check_target(cfg.int8_target)
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
    if not names and not cfg.teacher_files:
        raise InputError("no teachers: pass --teachers, e.g. --teachers resnet20, or --teacher PATH (ONNX, torch.export)")
    if cfg.teacher_input not in INPUTS:
        raise InputError(f"teacher_input must be one of {', '.join(INPUTS)}, got {cfg.teacher_input!r}")
    if len(set(cfg.teacher_files)) != len(cfg.teacher_files):
        raise InputError(f"--teacher names a file twice: {', '.join(cfg.teacher_files)}")
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
    if cfg.budget_edge not in ("on", "off"):
        raise InputError(f"budget_edge must be 'on' or 'off', got {cfg.budget_edge!r}")
    if not isinstance(cfg.edge_min_width, int) or isinstance(cfg.edge_min_width, bool) or cfg.edge_min_width < 0:
        raise InputError(f"edge_min_width must be a whole number of channels >= 0 (0: off), got {cfg.edge_min_width!r}")
    try:
        depth_setting(cfg.edge_depth)
    except ValueError as e:
        raise InputError(str(e)) from None
    if cfg.budget_floor and cfg.budget_edge == "on":
        raise InputError(f"--budget-floor {cfg.budget_floor:g} applies only with --budget-edge off: at the budget's "
                         "edge every trial already uses 95% of the budget; drop it, or add --budget-edge off")
    if cfg.min_steps < 0 or not 0 <= cfg.teacher_min_gain < 1:
        raise InputError(f"min_steps must be >= 0 and teacher_min_gain in [0, 1), got {cfg.min_steps} and "
                         f"{cfg.teacher_min_gain}")
    for key in ("trial_epochs", "teacher_epochs", "ensemble_views"):
        if getattr(cfg, key) < 1:
            raise InputError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.train.batch_size < 1 or cfg.train.lr <= 0:
        raise InputError(f"batch size and learning rate must be positive, got {cfg.train.batch_size}, {cfg.train.lr}")
    RetrainRecipe.of(cfg).augments()  # a bad final_augment from YAML is named here
    return cfg


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
