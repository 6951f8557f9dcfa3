"""The Pareto fronts of a study, computed first and rendered second: its trials as a pandas frame,
the front's plot data as a NamedTuple the tests compare exactly, and the Plotly figures of the report."""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import optuna
import pandas as pd
import plotly.graph_objects as go

from nas_kd.core.units import format_count
from nas_kd.nas.objective import TRIAL_SCORES
from nas_kd.nas.records import (
    FAIL_ATTR,
    LATENCY_ATTR,
    NASWOT,
    REPEAT_ATTR,
    SHAPE_ATTR,
    SPEC_ATTR,
    START_ATTR,
    SYNFLOW,
    TRAIN_SECONDS_ATTR,
    USE_ATTR,
    VAL_ACC_RAW_ATTR,
    curve,
    is_feasible,
    pareto_front,
    status,
    trial_score,
)

COLUMNS = ["number", "status", "spec", "macs", "params", "macs_compression", "params_compression", "latency_ms",
           "peak_memory_int8", "weights_int8", "score",
           "val_acc_raw", "naswot", "synflow", "val_acc_curve", "train_seconds", "feasible", "repeat_of", "start_point",
           "fail_reason", "budget_use", "shape"]


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        points = curve(t)
        rows.append({"number": t.number, "status": status(t), "spec": a.get(SPEC_ATTR), "macs": a.get("macs"),
                     "params": a.get("params"), "macs_compression": a.get("macs_compression"),
                     "params_compression": a.get("params_compression"), "latency_ms": a.get(LATENCY_ATTR),
                     "peak_memory_int8": a.get("peak_memory_int8"), "weights_int8": a.get("weights_int8"),
                     # validation accuracy, or the block-wise or training-free score the study ranks by
                     "score": trial_score(t), "val_acc_raw": a.get(VAL_ACC_RAW_ATTR), "naswot": a.get(NASWOT),
                     "synflow": a.get(SYNFLOW), "val_acc_curve": json.dumps(points) if points else None,
                     "train_seconds": a.get(TRAIN_SECONDS_ATTR), "feasible": is_feasible(t) if t.constraints else None,
                     "repeat_of": a.get(REPEAT_ATTR), "start_point": a.get(START_ATTR), "fail_reason": a.get(FAIL_ATTR),
                     "budget_use": a.get(USE_ATTR), "shape": a.get(SHAPE_ATTR)})
    return pd.DataFrame(rows, columns=COLUMNS)


class Points(NamedTuple):
    x: list[float]
    acc: list[float]
    number: list[int]  # trial numbers (teachers: -1)
    label: list[str]  # spec strings (teachers: names)


COSTS = {"macs": "MACs", "params": "parameters", "latency_ms": "latency (ms)"}  # the x axes of the fronts


class ParetoData(NamedTuple):
    cost: str  # a key of COSTS
    front: Points  # feasible trained trials on the front, by cost
    feasible: Points  # every feasible trained trial (complete or pruned: last validation accuracy)
    infeasible: Points  # over budget: cost only, acc is NaN (never trained)
    pruned: Points  # stopped early by the pruner
    teachers: Points  # validation accuracy of each teacher (full training: drawn in the lower panel)
    budget: float | None
    compression_teacher: float  # the largest teacher's cost: compression = compression_teacher / cost
    winner: int | None  # trial number
    # what the y axis holds: validation accuracy, or the block-wise score of a blockwise study
    score_label: str = "validation accuracy"
    # baselines retrained with the winner's schedule (pruned teacher + KD / + fine-tuning): their
    # validation accuracy after that retrain, labelled by method
    baselines: Points = Points([], [], [], [])
    # the winner after its full retrain (validation accuracy), drawn in the lower panel under its
    # trial score in the upper one
    retrained: Points = Points([], [], [], [])
    # the legend of the never-trained rug: what kept its students from training
    rug_label: str = "over budget (not trained)"


# the rug's legend by the statuses in it (report.status)
RUG_LABELS = {frozenset({"over_budget"}): "over budget (not trained)",
              frozenset({"under_floor"}): "under the budget floor (not trained)",
              frozenset({"over_budget", "under_floor"}): "over budget or under the budget floor (not trained)"}


def _points(frame: pd.DataFrame, cost: str) -> Points:
    return Points([float(v) for v in frame[cost]], [float(v) for v in frame["score"]],
                  [int(v) for v in frame["number"]], [str(v) for v in frame["spec"]])


def pareto_data(frame: pd.DataFrame, cost: str, budget: float | None, teachers: list[dict[str, Any]],
                winner: int | None = None, score_label: str = TRIAL_SCORES["distill"].label,
                baselines: list[dict[str, Any]] = (), retrained: dict[str, Any] | None = None) -> ParetoData:
    """The plot data of one cost. Trial scores (brief training) and accuracies after full training
    (teachers, the retrained winner, baselines) are kept apart, for the figure's two panels."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {', '.join(COSTS)}, got {cost!r}")
    # teachers and baselines have no latency of their own unless they were measured
    teachers = [t for t in teachers if t.get(cost) is not None]
    baselines = [b for b in baselines if b.get(cost) is not None]
    has_cost = frame[cost].notna()
    trained = frame[has_cost & frame["score"].notna() & (frame["status"] != "repeat")]
    feasible = trained[trained["feasible"] != False]  # noqa: E712 (None: no budget on this study)
    complete = feasible[feasible["status"] == "complete"]
    front_idx = pareto_front([float(v) for v in complete[cost]], [float(v) for v in complete["score"]])
    front = complete.iloc[front_idx]
    infeasible = frame[has_cost & frame["status"].isin(["over_budget", "under_floor"])].assign(score=float("nan"))
    pruned = trained[trained["status"] == "pruned"]
    teacher_points = Points([float(t[cost]) for t in teachers], [float(t["val_acc"]) for t in teachers],
                            [-1] * len(teachers), [str(t["name"]) for t in teachers])
    compression_teacher = max((float(t[cost]) for t in teachers), default=float("nan"))
    baseline_points = Points([float(b[cost]) for b in baselines], [float(b["val_acc"]) for b in baselines],
                             [-2] * len(baselines), [str(b["method"]) for b in baselines])
    retrained_points = (Points([float(retrained[cost])], [float(retrained["val_acc"])], [int(retrained["trial"])],
                               [str(retrained["spec"])])
                        if retrained and "val_acc" in retrained and retrained.get(cost) is not None
                        else Points([], [], [], []))
    return ParetoData(cost, _points(front, cost), _points(feasible, cost), _points(infeasible, cost),
                      _points(pruned, cost), teacher_points, budget, compression_teacher, winner, score_label, baseline_points,
                      retrained_points, RUG_LABELS.get(frozenset(infeasible["status"]), RUG_LABELS[frozenset({"over_budget"})]))


# ---------------------------------------------------------------- rendering


def _hover(points: Points, data: ParetoData, what: str) -> list[str]:
    out = []
    for x, acc, n, label in zip(*points):
        ratio = data.compression_teacher / x if x else float("nan")
        head = {-1: f"teacher {label}", -2: f"baseline: {label}"}.get(n, f"trial {n} ({what})")
        full = n < 0 or points is data.retrained  # accuracy after full training, not a trial score
        acc_text = "not trained" if acc != acc else f"{'val acc' if full else data.score_label} {acc:.4f}"
        cost = f"{x:.4g} ms" if data.cost == "latency_ms" else f"{data.cost} {format_count(x)}"
        ratio_text = f" (compression x{ratio:.2f})" if ratio == ratio else ""
        out.append(f"{head}<br>{label if n >= 0 else ''}<br>{cost}{ratio_text}<br>{acc_text}")
    return out


# vertical extents of the figure's panels: trial scores above, accuracy after full training below,
# and a rug of over-budget specs at the bottom
TRIAL_PANEL, FULL_PANEL, RUG_PANEL = [0.47, 1.0], [0.09, 0.40], [0.0, 0.04]


def pareto_figure(data: ParetoData) -> go.Figure:
    """Two panels over one cost axis. Upper: every trial's score after its brief training, the
    Pareto front and the winner. Lower: validation accuracy after full training: the teachers, the
    retrained winner (straight under its trial score) and any baselines. A brief trial's score is
    far below what full training reaches, so the two are never drawn on one axis."""
    fig = go.Figure()
    name = COSTS[data.cost]
    layers = [
        (data.feasible, "trained within budget", dict(color="#1f77b4", size=8, opacity=0.55), "y"),
        (data.pruned, "pruned early", dict(color="#ff7f0e", size=8, symbol="x"), "y"),
        (data.front, "Pareto front", dict(color="#d62728", size=11, line=dict(width=1, color="black")), "y"),
        (data.teachers, "teachers (full training)", dict(color="#2ca02c", size=15, symbol="star"), "y3"),
    ]
    if data.retrained.x:
        layers.append((data.retrained, "winner after the full retrain",
                       dict(color="black", size=13, symbol="circle-open", line=dict(width=3)), "y3"))
    if data.baselines.x:  # only in studies run with --pruned-baseline
        layers.append((data.baselines, "pruned-teacher baselines (val acc after the full retrain)",
                       dict(color="#9467bd", size=12, symbol="diamond"), "y3"))
    for points, label, marker, axis in layers:
        mode = "lines+markers" if label == "Pareto front" else "markers"
        fig.add_trace(go.Scatter(x=points.x, y=points.acc, mode=mode, name=label, marker=marker, yaxis=axis,
                                 line=dict(shape="hv", color="#d62728") if mode != "markers" else None,
                                 hovertext=_hover(points, data, label), hoverinfo="text"))
    if data.infeasible.x:  # never trained: shown as a rug under the plot, at their cost
        fig.add_trace(go.Scatter(x=data.infeasible.x, y=[0] * len(data.infeasible.x), yaxis="y2", mode="markers",
                                 name=data.rug_label,
                                 marker=dict(color="#7f7f7f", symbol="line-ns-open", size=12),
                                 hovertext=_hover(data.infeasible, data, "not trained"), hoverinfo="text"))
    if data.winner is not None and data.winner in data.feasible.number:
        i = data.feasible.number.index(data.winner)
        fig.add_trace(go.Scatter(x=[data.feasible.x[i]], y=[data.feasible.acc[i]], mode="markers", name="winner",
                                 marker=dict(size=20, color="rgba(0,0,0,0)", line=dict(width=3, color="black")),
                                 hovertext=[f"winner: trial {data.winner}"], hoverinfo="text"))
    if data.budget:  # across both panels
        fig.add_shape(type="line", x0=data.budget, x1=data.budget, xref="x", y0=0, y1=1, yref="paper",
                      line=dict(dash="dash", color="black"))
        fig.add_annotation(x=math.log10(data.budget), xref="x", y=1, yref="paper", xanchor="right", yanchor="bottom",
                           showarrow=False, text=f"budget {data.budget:.4g} ms" if data.cost == "latency_ms"
                           else f"budget {format_count(data.budget)}")
    xs = data.feasible.x + data.infeasible.x + data.teachers.x + data.baselines.x + data.retrained.x
    ticks = _log_ticks(min(xs), max(xs)) if xs else []
    known = data.compression_teacher == data.compression_teacher  # not NaN: some teacher has this cost
    ticktext = [f"{format_count(v)}<br>x{data.compression_teacher / v:.1f}" if known else format_count(v)
                for v in ticks]
    compression = " (second tick row: compression vs the largest teacher)" if known else ""
    fig.update_layout(
        title=f"{data.score_label.capitalize()} vs {name}{compression}",
        # the cost axis under the lower panel and the rug; gridlines run through both panels
        xaxis=dict(title=f"{name} (log scale)", type="log", tickvals=ticks, ticktext=ticktext, anchor="free",
                   position=0.0),
        yaxis=dict(title=f"trial: {data.score_label}<br>after brief training", domain=TRIAL_PANEL),
        yaxis3=dict(title="validation accuracy<br>after full training", domain=FULL_PANEL,
                    **({"range": span} if (span := full_panel_range(data)) else {})),
        yaxis2=dict(domain=RUG_PANEL, showticklabels=False, showgrid=False, zeroline=False),
        template="plotly_white", height=640, legend=dict(orientation="h", y=-0.2))
    return fig


FULL_PANEL_MIN_SPAN = 0.01  # accuracy: the lower panel spans at least 1 point, so hundredths look small


def full_panel_range(data: ParetoData, min_span: float = FULL_PANEL_MIN_SPAN) -> list[float] | None:
    """The accuracy range of the lower panel: its points with a tenth of their spread as margin
    on each side, widened to `min_span` about their middle when narrower; None without points
    (Plotly's own range)."""
    accs = [a for a in data.teachers.acc + data.retrained.acc + data.baselines.acc if a == a]
    if not accs:
        return None
    margin = 0.1 * (max(accs) - min(accs))
    lo, hi = min(accs) - margin, max(accs) + margin
    if hi - lo < min_span:
        middle = (lo + hi) / 2
        lo, hi = middle - min_span / 2, middle + min_span / 2
    return [round(lo, 6), round(hi, 6)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    out = []
    decade = 10 ** int(f"{lo:e}".split("e")[1])
    while decade <= hi * 10:
        for m in (1, 2, 5):
            if lo / 1.5 <= m * decade <= hi * 1.5:
                out.append(float(m * decade))
        decade *= 10
    return out


def epochs_figure(frame: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for _, row in frame[frame["val_acc_curve"].notna()].iterrows():
        points = json.loads(row["val_acc_curve"])
        fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                                 name=f"trial {row['number']}", hovertext=str(row["spec"]), showlegend=False))
    fig.update_layout(title="Validation accuracy of each trial during its training (what the pruner saw)",
                      xaxis=dict(title="epochs trained"),
                      yaxis_title="validation accuracy", template="plotly_white", height=380)
    return fig




FRONT_BUDGETS = 3  # budgets along a Pareto study's front that the report lists a pick at
FLAGS = {"macs": "--flops-budget", "params": "--params-budget", "latency_ms": "--latency-budget"}


def budget_picks(data: ParetoData, n: int = FRONT_BUDGETS) -> list[dict[str, Any]]:
    """One study, many budgets: `n` budgets spread along the front (the costs of its points at evenly
    spaced ranks, cheapest to dearest), and at each the trial `nas_kd.retraining.retrain --<cost> BUDGET`
    picks: the best trial score within it, which on a front is that point itself."""
    order = sorted(range(len(data.front.x)), key=lambda i: data.front.x[i])
    if not order:
        return []
    ranks = sorted({round(k * (len(order) - 1) / max(1, n - 1)) for k in range(n)})
    return [{"budget": data.front.x[order[r]], "trial": data.front.number[order[r]], "spec": data.front.label[order[r]],
             "score": data.front.acc[order[r]], "flag": FLAGS[data.cost]} for r in ranks]
