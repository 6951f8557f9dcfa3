"""What a search says as it goes and when it ends: one line per finished trial (when no bar is
drawn) and the summary table printed last."""

from __future__ import annotations

from pathlib import Path

import optuna

from nas_kd.core.units import format_count
from nas_kd.device.int8 import int8_line
from nas_kd.nas.records import (
    FAIL_ATTR,
    REPEAT_ATTR,
    SPEC_ATTR,
    START_ATTR,
    USE_ATTR,
    status,
    trial_score,
    violated_bounds,
    was_trained,
)
from nas_kd.nas.study import BASELINE_ATTR, STUDY_ATTR, WINNER_ATTR


def compression_text(ratio: float) -> str:
    return f"x{ratio:.2f} smaller" if ratio >= 1 else f"x{1 / ratio:.2f} LARGER"


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


def summary_table(study: optuna.Study, out_dir: str | Path, url: str, seconds: float) -> str:
    """The table printed at the end of a search: the study, its budget, trials, teachers and winner;
    `out_dir` is the run's OUT_DIR, which holds the study's folder."""
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
                                                   f"{winner['latency_ms_fp32']:.3f} ms{int8} (the delivered files, "
                                                   "batch 1, here)"))
            if (line := int8_line(winner)) is not None:
                rows.append(("winner int8", line))
    for b in study.user_attrs.get(BASELINE_ATTR, {}).get("methods", []):
        rows.append((b["method"], f"{format_count(b['macs'])} MACs, test {b['test_acc']:.4f} after {b['final_epochs']} epochs"))
    out = Path(out_dir) / study.study_name
    rows += [("report", str(out / "report.html")), ("dashboard", f"optuna-dashboard {url}"),
             ("wall time", f"{seconds / 60:.1f} min")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
