"""The study as a table, its Pareto fronts as data, and both as one self-contained HTML file.

Compute first, render second: `trials_frame` turns a study into a pandas frame, `pareto_data`
turns the frame into a small `ParetoData` tuple, `pareto_figure` draws it with Plotly. Every
number shown is a validation accuracy except the winner's and the teachers' final test figures,
which come from the retrain and are never used to choose anything.

    python -m nas_kd.report --storage sqlite:///studies/NAME.db --study-name NAME
"""

from __future__ import annotations

import html
import json
import math
import sys
from pathlib import Path
from typing import Any, NamedTuple

import optuna
import pandas as pd
import plotly.graph_objects as go

from nas_kd.convert import INT8_WARN_POINTS
from nas_kd.cost import format_count
from nas_kd.memory import format_bytes
from nas_kd.objective import TRIAL_SCORES
from nas_kd.records import (
    FAIL_ATTR,
    LATENCY_ATTR,
    NASWOT,
    REPEAT_ATTR,
    SPEC_ATTR,
    START_ATTR,
    SYNFLOW,
    TRAIN_SECONDS_ATTR,
    VAL_ACC_RAW_ATTR,
    curve,
    is_feasible,
    pareto_front,
    status,
    trial_score,
)
from nas_kd.study import BASELINE_ATTR, ONLINE_ATTR, STUDY_ATTR, WINNER_ATTR, compression_teacher

COLUMNS = ["number", "status", "spec", "macs", "params", "macs_compression", "params_compression", "latency_ms",
           "peak_memory_int8", "weights_int8", "score",
           "val_acc_raw", "naswot", "synflow", "val_acc_curve", "train_seconds", "feasible", "repeat_of", "start_point",
           "fail_reason"]


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
                     "repeat_of": a.get(REPEAT_ATTR), "start_point": a.get(START_ATTR), "fail_reason": a.get(FAIL_ATTR)})
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


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
table.trials td:nth-child(3), table.trials th:nth-child(3), td.spec { text-align: left; font-family: monospace; }
table.facts th { text-align: left; }
.note { color: #555; }
.warn { color: #b00020; }
"""


# a fact shown under another name: export.py stores the int8 model's test accuracy *drop* in
# points, which reads as a loss whichever way it went; the report shows the signed change
SHOWN_AS = {"int8_accuracy_drop": "int8_accuracy_change"}


def _fmt(key: str, value: Any) -> str:
    if key == "int8_accuracy_drop" and isinstance(value, (int, float)):
        return f"{0.0 - value:+.2f} points"  # 0.0 - : a drop of 0 is "+0.00", not "-0.00"
    if isinstance(value, float) and ("acc" in key):
        return f"{value:.2%}"
    if key in ("macs", "params") and isinstance(value, (int, float)):
        return format_count(value)
    if key.startswith(("peak_memory", "weights_")) and isinstance(value, (int, float)):
        return format_bytes(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _facts(facts: dict[str, Any]) -> str:
    """A vertical two-column table: one fact a row."""
    rows = "".join(f"<tr><th>{html.escape(SHOWN_AS.get(k, k).replace('_', ' '))}</th>"
                   f"<td{' class=spec' if k == 'spec' else ''}>{html.escape(_fmt(k, v))}</td></tr>"
                   for k, v in facts.items() if not isinstance(v, (dict, list)))
    return f"<table class=facts>{rows}</table>"


def _table(rows: list[dict[str, Any]]) -> str:
    """One row per dict; nested values (dicts, lists) are left out."""
    frame = pd.DataFrame([{SHOWN_AS.get(k, k): _fmt(k, v) for k, v in row.items() if not isinstance(v, (dict, list))}
                          for row in rows])
    return frame.to_html(index=False, border=0, escape=True, na_rep="")


def finalists_table(metrics: dict[str, Any]) -> list[str]:
    """The finalists retrained with the full schedule (--finalists K), the one kept marked; none
    without the stage."""
    rows = metrics.get("finalists")
    if not rows:
        return []
    starts = any("start_point" in r for r in rows)
    table = _table([{"trial": r["trial"], **({"start point": r.get("start_point", "")} if starts else {}),
                     "spec": r["spec"], "trial score": r["search_val_acc"], "val acc after the retrain": r["val_acc"],
                     "kept": "yes" if r["trial"] == metrics["trial"] else ""} for r in rows])
    chosen = (f"The best {len(rows)} trials by trial score"
              if not starts else
              "The best trials by trial score and the study's start points (--start-from: retrained whatever their "
              "trial score)")
    return [f"<h3>Finalists</h3><p class=note>{chosen}, each retrained with the full schedule; the one of "
            "best validation accuracy is the winner, and only it was tested.</p>", table]


def deployment(metrics: dict[str, Any]) -> list[str]:
    """The exported models side by side (fp32 ONNX, int8 ONNX), with a warning when int8 loses
    more than INT8_WARN_POINTS of test accuracy."""
    if "onnx_test_acc" not in metrics:
        return []
    rows = [{"model": "fp32 (model.onnx)", "test_acc": metrics["onnx_test_acc"],
             "latency_ms": metrics.get("latency_ms_fp32"), "weights": metrics.get("weights_fp32"),
             "peak_memory": metrics.get("peak_memory_fp32")}]
    if "int8_test_acc" in metrics:
        rows.append({"model": "int8 (model.int8.onnx)", "test_acc": metrics["int8_test_acc"],
                     "latency_ms": metrics.get("latency_ms_int8"), "weights": metrics.get("weights_int8"),
                     "peak_memory": metrics.get("peak_memory_int8")})
    rows = [{k: (format_bytes(v) if k in ("weights", "peak_memory") and v is not None else v) for k, v in r.items()}
            for r in rows]
    out = ["<h3>Deployment (ONNX Runtime on the search machine, batch 1, "
           f"{html.escape(str(metrics.get('latency_threads', 1)))} thread(s))</h3>", _table(rows)]
    drop = metrics.get("int8_accuracy_drop")
    if drop is not None and drop > INT8_WARN_POINTS:
        out.append(f"<p class=warn><b>Warning: the int8 model loses {drop:.2f} points of test accuracy</b> "
                   f"(more than {INT8_WARN_POINTS:g}); ship the fp32 model or calibrate on more images.</p>")
    return out


def render_html(study: optuna.Study, frame: pd.DataFrame) -> str:
    info = study.user_attrs.get(STUDY_ATTR, {})
    winner = study.user_attrs.get(WINNER_ATTR)
    teachers = info.get("teachers", [])
    budget = info.get("budget", {})
    score_label = TRIAL_SCORES.get(info.get("config", {}).get("trial_score", "distill"), TRIAL_SCORES["distill"]).label
    baselines = study.user_attrs.get(BASELINE_ATTR, {}).get("methods", [])
    costs = ["macs", "params"] + (["latency_ms"] if frame["latency_ms"].notna().any() else [])
    figures = [pareto_figure(pareto_data(frame, cost, budget.get(cost), teachers, winner and winner.get("trial"),
                                         score_label, baselines, winner))
               for cost in costs]
    figures.append(epochs_figure(frame))
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0), default_width="100%")
             for i, fig in enumerate(figures)]
    counts = frame["status"].value_counts().to_dict()
    summary = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(counts.items()))
    esc = html.escape
    sections = [
        f"<h1>nas_kd study {esc(study.study_name)}</h1>",
        f"<p>Dataset <b>{esc(str(info.get('guarded', {}).get('dataset', '?')))}</b>; budget "
        f"<b>{esc(info.get('budget_text', 'none'))}</b> (MACs of one forward pass, ptflops aten backend)"
        + (f", floor {info['budget_floor']:.0%} of it (students using less were not trained)"
           if info.get("budget_floor") else "") + "; "
        f"search space <b>{esc(str(info.get('space', '?')))}</b>; distillation <b>{esc(str(info.get('recipe', '?')))}</b>. "
        f"Trials: {esc(summary)}.</p>",
        "<p class=note>Accuracies in the plots and the trial table are on the validation split carved from the "
        "training set; the test set is used only for the retrained winner and the teachers below. Compression is "
        f"the largest teacher's cost over the student's ({esc(str(compression_teacher(study)))}).</p>",
    ]
    if winner:
        test = winner.get("teachers_test_acc", {})
        sections += ["<h2>Winner</h2>", _facts(winner), *finalists_table(winner), *deployment(winner)]
        teachers = [{**t, "test_acc": test.get(t["name"])} for t in teachers]
        ensemble = {"name": "ensemble", **info.get("ensemble", {}), "test_acc": winner.get("ensemble_test_acc")}
    else:
        ensemble = {"name": "ensemble", **info.get("ensemble", {})}
    if teachers:
        # the weights' digest is for resume checks, not for reading
        shown = [{k: v for k, v in t.items() if k != "weights_sha256"} for t in teachers]
        sections += ["<h2>Teachers</h2>", _table(shown + [ensemble])]
    if baselines:
        info_b = study.user_attrs[BASELINE_ATTR]
        sections += ["<h2>Pruned-teacher baseline</h2>",
                     f"<p>{esc(str(info_b.get('teacher')))} with its filters L1-pruned to the budget (keep "
                     f"{info_b.get('keep', float('nan')):.3f} of each prunable layer), its surviving weights kept, "
                     f"then trained for the winner's {esc(str(info_b.get('epochs')))} epochs: distilled with the "
                     "search's recipe (KD in place of fine-tuning), and fine-tuned with cross-entropy alone.</p>",
                     _table(baselines)]
    online = study.user_attrs.get(ONLINE_ATTR)
    if online and isinstance(online.get("students"), list):
        sections += ["<h2>Online ensemble of students</h2>",
                     _table(online["students"])]
    sections += ["<h2>Pareto fronts</h2>", *parts, "<h2>All trials</h2>",
                 frame.astype({"feasible": "boolean"}).to_html(index=False, border=0, na_rep="", classes="trials")]
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>nas_kd {esc(study.study_name)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(sections)}</body></html>")


def write_report(study: optuna.Study, out_dir: Path) -> tuple[Path, Path]:
    """Write `report.html` and `trials.csv` into out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = trials_frame(study)
    csv_path, html_path = out_dir / "trials.csv", out_dir / "report.html"
    frame.to_csv(csv_path, index=False)
    tmp = html_path.with_suffix(".html.tmp")
    tmp.write_text(render_html(study, frame), encoding="utf-8")
    tmp.replace(html_path)
    return html_path, csv_path


if __name__ == "__main__":
    from nas_kd.report_cli import main

    sys.exit(main())
