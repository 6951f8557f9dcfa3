"""What a trial stores and how it is read back: its user-attribute keys, its status, its score,
its cost facts, and the Pareto front of a set of (cost, score) points.

A trial writes (objective.py) and everything after it reads (study, report, retrain, search,
benchmarks) through this one module, so a key has one spelling and one reader. The keys of a
trial's cost are those of `cost_facts` ("macs", "params", "macs_compression",
"params_compression") and of `latency.memory_facts`; they double as column names of the report
and the exported metrics.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas_kd.nets.cost import Cost

# ---------------------------------------------------------------- the keys

SPEC_ATTR = "spec"  # the trial's spec, as text (arch.Spec.parse reads it back)
WORKER_ATTR = "worker"  # "host:pid" of the process that ran the trial (many workers, one study)
USE_ATTR = "budget_use"  # Budget.use of the trial's spec: its largest share of a bound
SHAPE_ATTR = "shape"  # at the budget's edge (nas_kd.nas.edge): the spec as sampled, before its widths were scaled
EDGE_FACTOR_ATTR = "edge_factor"  # the common scale of its widths that the repair found
DEPTH_GIVEN_ATTR = "depth_given"  # blocks the shape gave up for width at the edge (--edge-min-width)
AT_LARGEST_ATTR = "at_largest_widths"  # True: the shape could not reach the budget within the space's widths
LATENCY_ATTR = "latency_ms"  # measured or table-predicted, of specs within the cheaper bounds only
PEAK_INT8_ATTR = "peak_memory_int8"  # bytes of peak int8 activations (nas_kd.device.memory.memory_facts)
FLOOR_CONSTRAINT = "budget_floor"  # the constraint (not a user attribute) of a student under the budget floor
START_ATTR = "start_point"  # of a start trial (nas_kd.nas.start): "hand-made", or "given" (a spec passed in)
START_SPEC_ATTR = "start_spec"  # its spec, as text
START_IN_SPACE_ATTR = "start_in_space"  # whether its spec is in the search space (then it has params)
REPEAT_ATTR = "repeat_of"  # a spec already scored: the number of the trial whose score was reused
FAIL_ATTR = "fail_reason"  # why a trial failed (one line), with what to change
FAIL_TRACE_ATTR = "fail_traceback"  # the last lines of its traceback, for bug reports
SCORE_ATTR = "score"  # what the trial returned as its score, whatever its kind
SCORE_KIND_ATTR = "score_kind"  # the objective.TRIAL_SCORES name that made it
NASWOT, SYNFLOW = "naswot", "synflow"  # the training-free scores, stored whatever the trial score
RECIPE_ATTR = "recipe"  # the distillation recipe of a distill trial, as text
CURVE_ATTR = "val_acc_curve"  # [[epochs trained, recalibrated val acc], ...] of a distill trial
OLD_CURVE_ATTR = "val_acc_per_epoch"  # studies made before CURVE_ATTR: [val acc after epoch 1, 2, ...]
VAL_ACC_ATTR = "val_acc"  # a distill trial's last validation accuracy (recalibrated): its score
VAL_ACC_RAW_ATTR = "val_acc_raw"  # the same without BatchNorm recalibration
TRAIN_SECONDS_ATTR = "train_seconds"  # training time, validation passes excluded
EVAL_SECONDS_ATTR = "eval_seconds"  # time of a distill trial's validation passes
TRAINED_FRACTION_ATTR = "trained_fraction"  # of a pruned trial: the share of its steps it trained
BLOCKWISE_ATTR = "blockwise_score"
BLOCKWISE_STAGES_ATTR = "blockwise_stage_scores"  # the R^2 of each of the student's stages
BLOCKWISE_NEW_ATTR = "blockwise_new_stages"  # how many of them this trial trained (the rest were known)
BLOCKWISE_MEMO_ATTR = "blockwise_memo"  # the trial's stage scores by stage key, for resumed runs


# ---------------------------------------------------------------- cost facts


def compression(cost: Cost, compression_teacher: Cost) -> tuple[float, float]:
    """(teacher MACs / student MACs, teacher params / student params), against the teacher whose
    cost compression is measured against (the ensemble's largest, `Ensemble.largest`)."""
    return compression_teacher.macs / max(1, cost.macs), compression_teacher.params / max(1, cost.params)


def cost_facts(cost: Cost, compression_teacher: Cost) -> dict[str, int | float]:
    """A student's MACs and params and its compression against the compression teacher, as
    trials, exports and reports record them."""
    macs_c, params_c = compression(cost, compression_teacher)
    return {"macs": cost.macs, "params": cost.params, "macs_compression": round(macs_c, 4),
            "params_compression": round(params_c, 4)}


# ---------------------------------------------------------------- readers


def was_trained(trial: FrozenTrial) -> bool:
    """Whether the trial scored its spec (trained it, or computed a training-free score): budget
    rejections and repeats of a scored spec never did. Studies made before scores were stored
    are read from their accuracies or block-wise score."""
    a = trial.user_attrs
    return SCORE_ATTR in a or CURVE_ATTR in a or OLD_CURVE_ATTR in a or BLOCKWISE_ATTR in a


def training_done(trial: FrozenTrial) -> float:
    """How many trials' worth of training the trial did: 1 if it scored its spec, the share of
    its steps if it was pruned, 0 if it trained nothing (over budget, a repeat, failed early)."""
    if not was_trained(trial):
        return 0.0
    if trial.state == TrialState.PRUNED:
        return float(trial.user_attrs.get(TRAINED_FRACTION_ATTR, 1.0))
    return 1.0


def curve(trial: FrozenTrial) -> list[list[float]]:
    """[[epochs trained, val acc], ...] of a distill trial (older studies: one point per epoch)."""
    if CURVE_ATTR in trial.user_attrs:
        return trial.user_attrs[CURVE_ATTR]
    return [[i + 1, acc] for i, acc in enumerate(trial.user_attrs.get(OLD_CURVE_ATTR, []))]


def trial_score(trial: FrozenTrial) -> float | None:
    """The trial's score, or the last accuracy it reached (a pruned trial's)."""
    a = trial.user_attrs
    if SCORE_ATTR in a:
        return a[SCORE_ATTR]
    points = curve(trial)
    return points[-1][1] if points else a.get(BLOCKWISE_ATTR)


def scored_before(trial: optuna.Trial, spec: str) -> FrozenTrial | None:
    """The study's first completed, scored trial of `spec` other than `trial`, if any."""
    for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.number != trial.number and t.user_attrs.get(SPEC_ATTR) == spec and was_trained(t):
            return t
    return None


def stored_blockwise_scores(study: optuna.Study) -> dict[str, float]:
    """Every stage score recorded by the study's finished blockwise trials (to preload a scorer)."""
    memo: dict[str, float] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        memo.update(t.user_attrs.get(BLOCKWISE_MEMO_ATTR, {}))
    return memo


def is_feasible(trial: FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def violated_bounds(trial: FrozenTrial) -> list[str]:
    """The budget's bounds the trial is over, by name: not the budget floor, nor the items ("0",
    "1", ...) of the legacy list optuna-dashboard reads."""
    return [k for k, v in trial.constraints.items() if v > 0 and k != FLOOR_CONSTRAINT and not k.isdigit()]


def status(trial: FrozenTrial) -> str:
    """complete, pruned (stopped early by the pruner), over_budget or under_floor (never trained:
    over a budget, or under the budget floor), repeat (a spec already scored: its score reused,
    nothing trained), failed or running."""
    if trial.state == TrialState.PRUNED:
        if was_trained(trial):
            return "pruned"
        under = not violated_bounds(trial) and trial.constraints.get(FLOOR_CONSTRAINT, 0) > 0
        return "under_floor" if under else "over_budget"
    if trial.state == TrialState.COMPLETE and REPEAT_ATTR in trial.user_attrs:
        return "repeat"
    return {TrialState.COMPLETE: "complete", TrialState.FAIL: "failed", TrialState.RUNNING: "running",
            TrialState.WAITING: "waiting"}[trial.state]


# ---------------------------------------------------------------- Pareto fronts


def pareto_front(xs: list[float], ys: list[float]) -> list[int]:
    """Indices of the points no other point beats: fewer-or-equal cost and higher-or-equal
    accuracy, strictly better in one. Sorted by cost."""
    order = sorted(range(len(xs)), key=lambda i: (xs[i], -ys[i]))
    front, best = [], float("-inf")
    for i in order:
        tie = front and (xs[i], ys[i]) == (xs[front[-1]], ys[front[-1]])  # equal points do not beat each other
        if ys[i] > best or tie:
            front.append(i)
            best = ys[i]
    return front
