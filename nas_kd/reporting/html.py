"""The study as a table, its Pareto fronts as data, and both as one self-contained HTML file.

Compute first, render second: `trials_frame` turns a study into a pandas frame, `pareto_data`
turns the frame into a small `ParetoData` tuple, `pareto_figure` draws it with Plotly. Every
number shown is a validation accuracy except the winner's and the teachers' final test figures,
which come from the retrain and are never used to choose anything.

    python -m nas_kd.report --storage sqlite:///studies/NAME.db --study-name NAME
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from nas_kd.core.units import format_bytes, format_count
from nas_kd.device.int8 import AGREEMENT_WARN, int8_line
from nas_kd.nas.objective import TRIAL_SCORES
from nas_kd.nas.study import BASELINE_ATTR, ONLINE_ATTR, STUDY_ATTR, WINNER_ATTR, compression_teacher
from nas_kd.reporting.fronts import (
    COSTS,
    ParetoData,
    budget_picks,
    epochs_figure,
    pareto_data,
    pareto_figure,
    trials_frame,
)

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
    """The exported models side by side (fp32 ONNX, int8 ONNX), the int8 model's settings and
    target, and a warning when it agrees with fp32 on fewer than AGREEMENT_WARN of the
    validation images it was checked on."""
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
    out = ["<h3>Deployment (ONNX Runtime on the search machine, the delivered files, batch 1, "
           f"{html.escape(str(metrics.get('latency_threads', 1)))} thread(s))</h3>", _table(rows)]
    if (line := int8_line(metrics)) is not None:
        out.append(f"<p class=note>int8: {html.escape(line)}.</p>")
    agreement = metrics.get("int8_val_agreement")
    if agreement is not None and agreement < AGREEMENT_WARN:
        out.append(f"<p class=warn><b>Warning: the int8 model agrees with fp32 on only {agreement:.1%} of validation "
                   f"images</b> on the machine that checked it ({html.escape(str(metrics.get('int8_checked_on')))}); "
                   "ship the fp32 model, or export again with --int8-target x86.</p>")
    return out


def front_picks(name: str, datas: list[ParetoData]) -> list[str]:
    """A Pareto study's picks at a few budgets along each front, with the command that retrains each."""
    rows = []
    for data in datas:
        for pick in budget_picks(data):
            # the budget written so that it admits the pick: integers exact, milliseconds rounded up
            value = (f"{math.ceil(pick['budget'] * 1e4) / 1e4:g}ms" if data.cost == "latency_ms"
                     else str(int(math.ceil(pick["budget"]))))
            rows.append({"budget": f"{COSTS[data.cost]} <= {value}", "trial": pick["trial"], "spec": pick["spec"],
                         "trial score": round(pick["score"], 4),
                         "retrain it with": f"python -m nas_kd.retrain --study-name {name} {pick['flag']} {value}"})
    if not rows:
        return []
    return ["<h2>One study, many budgets</h2>",
            "<p>The trial each budget picks along the fronts above (its best trial score within the budget), and the "
            "command that retrains it into its own folder, apart from the winner.</p>", _table(rows)]


def render_html(study: optuna.Study, frame: pd.DataFrame) -> str:
    info = study.user_attrs.get(STUDY_ATTR, {})
    winner = study.user_attrs.get(WINNER_ATTR)
    teachers = info.get("teachers", [])
    budget = info.get("budget", {})
    score_label = TRIAL_SCORES.get(info.get("config", {}).get("trial_score", "distill"), TRIAL_SCORES["distill"]).label
    baselines = study.user_attrs.get(BASELINE_ATTR, {}).get("methods", [])
    costs = ["macs", "params"] + (["latency_ms"] if frame["latency_ms"].notna().any() else [])
    datas = [pareto_data(frame, cost, budget.get(cost), teachers, winner and winner.get("trial"), score_label,
                         baselines, winner) for cost in costs]
    figures = [pareto_figure(data) for data in datas]
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
    if info.get("config", {}).get("objective") == "pareto":
        sections += front_picks(study.study_name, datas)
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
