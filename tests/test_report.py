"""nas_kd.reporting.html: the Pareto front, the plot data, the trial table, and the files the report writes.

Compute first, render second: `pareto_front` and `pareto_data` are compared exactly against
hand-made inputs, `trials_frame` against a study built trial by trial through the real storage,
and the written report.html / trials.csv of the end-to-end search against its storage.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import optuna
import pandas as pd
import plotly.offline
import pytest
from conftest import E2E_STUDY, copy_of_e2e, run_cli

from nas_kd import report as report_cli
from nas_kd.nas.budget import Budget
from nas_kd.nas.objective import record_cost
from nas_kd.nas.records import pareto_front
from nas_kd.nas.study import (
    COMPRESSION_TEACHER_KEY,
    OLD_COMPRESSION_TEACHER_KEY,
    STUDY_ATTR,
    WINNER_ATTR,
    compression_teacher,
    open_storage,
)
from nas_kd.nets.arch import Spec
from nas_kd.nets.cost import Cost
from nas_kd.reporting import fronts
from nas_kd.reporting import html as report
from nas_kd.reporting.fronts import COLUMNS, ParetoData, Points

NAN = float("nan")
E2E_BUDGET = 12_000_000  # --flops-budget 12M in conftest.E2E_ARGS

# ---------------------------------------------------------------- pareto_front


@pytest.mark.parametrize(("xs", "ys", "front"), [
    pytest.param([], [], [], id="empty"),
    pytest.param([5.0], [0.3], [0], id="single point"),
    pytest.param([3, 1, 2, 4], [0.5, 0.2, 0.6, 0.55], [1, 2], id="dominated points dropped"),
    pytest.param([4, 1, 3, 2], [0.9, 0.6, 0.8, 0.7], [1, 3, 2, 0], id="staircase, sorted by cost"),
    pytest.param([2, 2, 1], [0.4, 0.7, 0.1], [2, 1], id="equal cost: the more accurate one"),
    pytest.param([1, 2], [0.5, 0.5], [0], id="equal accuracy: the cheaper one"),
    pytest.param([1, 3, 2], [0.9, 0.1, 0.5], [0], id="one point beats all"),
    pytest.param([1, 1, 2], [0.5, 0.5, 0.6], [0, 1, 2], id="identical points: neither beats the other"),
])
def test_pareto_front(xs: list[float], ys: list[float], front: list[int]) -> None:
    assert pareto_front(xs, ys) == front


# ---------------------------------------------------------------- pareto_data


def _row(number: int, status: str, macs: float | None, params: float | None, val_acc: float | None,
         feasible: bool | None) -> dict:
    """One row of `trials_frame`; the columns pareto_data does not read get plausible values."""
    trained = val_acc is not None
    return {"number": number, "status": status, "spec": None if macs is None else f"c16|basic_d1_w{number + 8}_s1_k3_e1",
            "macs": macs, "params": params, "macs_compression": None if macs is None else 40e6 / macs,
            "params_compression": None if params is None else 270e3 / params, "score": val_acc,
            "val_acc_curve": f"[[1, {val_acc}]]" if trained else None, "train_seconds": 1.0 if trained else None,
            "feasible": feasible}


FRAME = pd.DataFrame([
    _row(0, "complete", 4e6, 40e3, 0.80, True),
    _row(1, "complete", 2e6, 60e3, 0.70, True),
    _row(2, "complete", 6e6, 30e3, 0.75, True),
    _row(3, "pruned", 1e6, 10e3, 0.90, True),  # cheapest and best, but stopped early: never on the front
    _row(4, "over_budget", 20e6, 200e3, None, False),
    _row(5, "failed", None, None, None, None),  # failed before its cost was counted
    _row(6, "complete", 15e6, 20e3, 0.95, False),  # trained yet over budget: on no layer
    _row(7, "running", 3e6, 35e3, None, True),  # counted, not trained yet
    _row(8, "complete", 2e6, 50e3, 0.65, True),  # same MACs as trial 1, less accurate
    _row(9, "under_floor", 1.5e6, 15e3, None, False),  # under the budget floor: never trained, in the rug
], columns=COLUMNS)
TEACHERS = [{"name": "resnet8", "macs": 9e6, "params": 80e3, "val_acc": 0.85, "source": "trained"},
            {"name": "resnet20", "macs": 40e6, "params": 270e3, "val_acc": 0.9, "source": "trained"}]
TEACHER_POINTS = {"macs": Points([9e6, 40e6], [0.85, 0.9], [-1, -1], ["resnet8", "resnet20"]),
                  "params": Points([80e3, 270e3], [0.85, 0.9], [-1, -1], ["resnet8", "resnet20"])}


def _spec(number: int) -> str:
    return str(FRAME.loc[number, "spec"])


def _pts(cost: str, numbers: list[int]) -> Points:
    return Points([float(FRAME.loc[n, cost]) for n in numbers],
                  [NAN if FRAME.loc[n, "status"] in ("over_budget", "under_floor") else float(FRAME.loc[n, "score"])
                   for n in numbers],
                  numbers, [_spec(n) for n in numbers])


def _comparable(data: ParetoData) -> ParetoData:
    """NaN never equals itself; spell it so that two ParetoData compare with ==."""
    def fix(p: Points) -> Points:
        return p._replace(acc=["nan" if math.isnan(a) else a for a in p.acc])
    return data._replace(front=fix(data.front), feasible=fix(data.feasible), infeasible=fix(data.infeasible),
                         pruned=fix(data.pruned), teachers=fix(data.teachers),
                         compression_teacher="nan" if math.isnan(data.compression_teacher)
                         else data.compression_teacher)


@pytest.mark.parametrize(("cost", "budget", "front", "compression_teacher"), [
    ("macs", 12e6, [1, 0], 40e6),  # trial 2 is beaten by 0 (cheaper, more accurate), trial 8 by 1
    ("params", None, [2, 0], 270e3),  # by parameters trial 2 is the cheapest; 1 and 8 are beaten by 0
])
def test_pareto_data(cost: str, budget: float | None, front: list[int], compression_teacher: float) -> None:
    data = fronts.pareto_data(FRAME, cost, budget, TEACHERS, winner=0)
    expected = ParetoData(cost=cost, front=_pts(cost, front), feasible=_pts(cost, [0, 1, 2, 3, 8]),
                          infeasible=_pts(cost, [4, 9]), pruned=_pts(cost, [3]), teachers=TEACHER_POINTS[cost],
                          budget=budget, compression_teacher=compression_teacher, winner=0,
                          rug_label="over budget or under the budget floor (not trained)")
    assert math.isnan(data.infeasible.acc[0])  # over budget: never trained, so no accuracy
    assert _comparable(data) == _comparable(expected)


def test_pareto_data_without_budget_keeps_every_trained_trial() -> None:
    """A study without a budget has no constraints: `feasible` is None, which must not mean infeasible."""
    frame = pd.DataFrame([_row(0, "complete", 2e6, 20e3, 0.7, None), _row(1, "complete", 1e6, 10e3, 0.6, None),
                          _row(2, "pruned", 3e6, 30e3, 0.8, None)], columns=COLUMNS)
    data = fronts.pareto_data(frame, "macs", None, TEACHERS[:1])
    assert (data.front.number, data.feasible.number, data.pruned.number, data.infeasible) == \
        ([1, 0], [0, 1, 2], [2], Points([], [], [], []))
    assert (data.budget, data.compression_teacher, data.winner) == (None, 9e6, None)


@pytest.mark.parametrize(("rejected", "label"), [
    ([4], "over budget (not trained)"),
    ([9], "under the budget floor (not trained)"),
    ([4, 9], "over budget or under the budget floor (not trained)"),
])
def test_the_rug_is_named_by_what_it_holds(rejected: list[int], label: str) -> None:
    """A study without a budget floor has no under-floor students: its rug does not mention a floor."""
    frame = FRAME[~FRAME["number"].isin({4, 9} - set(rejected))]
    data = fronts.pareto_data(frame, "macs", 12e6, TEACHERS, winner=0)
    assert (data.infeasible.number, data.rug_label) == (rejected, label)
    assert label in [t.name for t in fronts.pareto_figure(data).data]


def test_pareto_data_rejects_an_unknown_cost() -> None:
    with pytest.raises(ValueError, match=re.escape("cost must be one of macs, params, latency_ms, got 'flops'")):
        fronts.pareto_data(FRAME, "flops", None, TEACHERS)


@pytest.mark.parametrize(("cost", "ticks", "shapes", "annotations"), [
    ("macs", [1e6, 2e6, 5e6, 1e7, 2e7, 5e7], 1, ["budget 12M"]),
    ("params", [1e4, 2e4, 5e4, 1e5, 2e5], 0, []),
])
def test_pareto_figure(cost: str, ticks: list[float], shapes: int, annotations: list[str]) -> None:
    """One trace per layer in drawing order, log ticks spanning every point, the budget as a line."""
    fig = fronts.pareto_figure(fronts.pareto_data(FRAME, cost, 12e6 if cost == "macs" else None, TEACHERS, winner=0))
    assert [t.name for t in fig.data] == ["trained within budget", "pruned early", "Pareto front",
                                          "teachers (full training)",
                                          "over budget or under the budget floor (not trained)", "winner"]
    # trial scores (brief training) and full-training accuracies are on separate panels
    assert [t.yaxis for t in fig.data] == ["y", "y", "y", "y3", "y2", None]
    assert fig.layout.yaxis.domain[0] > fig.layout.yaxis3.domain[1] > fig.layout.yaxis3.domain[0] > fig.layout.yaxis2.domain[1]
    assert (list(fig.data[-1].x), list(fig.data[-1].y)) == ([FRAME.loc[0, cost]], [0.80])
    assert list(fig.layout.xaxis.tickvals) == ticks
    teacher = 40e6 if cost == "macs" else 270e3
    assert fig.layout.xaxis.ticktext[0] == f"{'1M' if cost == 'macs' else '10K'}<br>x{teacher / ticks[0]:.1f}"
    assert (len(fig.layout.shapes), [a.text for a in fig.layout.annotations]) == (shapes, annotations)
    baselines = [{"method": "pruned teacher + KD", "macs": 9e6, "params": 90e3, "val_acc": 0.7}]
    data = fronts.pareto_data(FRAME, cost, None, TEACHERS, winner=0, baselines=baselines)
    assert data.baselines == fronts.Points([9e6 if cost == "macs" else 90e3], [0.7], [-2], ["pruned teacher + KD"])
    names = [t.name for t in fronts.pareto_figure(data).data]
    assert names[4] == "pruned-teacher baselines (val acc after the full retrain)"


@pytest.mark.parametrize("cost", ["macs", "params"])
def test_the_retrained_winner_is_drawn_under_its_trial_score(cost: str) -> None:
    winner = {"trial": 0, "spec": _spec(0), "macs": float(FRAME.loc[0, "macs"]), "params": float(FRAME.loc[0, "params"]),
              "val_acc": 0.91, "test_acc": 0.9}
    data = fronts.pareto_data(FRAME, cost, None, TEACHERS, winner=0, retrained=winner)
    assert data.retrained == Points([float(FRAME.loc[0, cost])], [0.91], [0], [_spec(0)])
    fig = fronts.pareto_figure(data)
    traces = {t.name: t for t in fig.data}
    full, trial = traces["winner after the full retrain"], traces["winner"]
    assert (full.yaxis, list(full.x), list(full.y)) == ("y3", list(trial.x), [0.91])
    assert "val acc 0.9100" in full.hovertext[0]
    assert fronts.pareto_data(FRAME, cost, None, TEACHERS, winner=0, retrained={"trial": 0}).retrained.x == []


@pytest.mark.parametrize(("accs", "expected"), [
    pytest.param([0.946, 0.954], [0.945, 0.955], id="the main command's 0.8 points: widened to 1 about 0.95"),
    pytest.param([0.90, 0.95], [0.895, 0.955], id="5 points: a tenth of the spread each side"),
    pytest.param([0.93], [0.925, 0.935], id="one point"),
    pytest.param([], None, id="nothing drawn: Plotly's range"),
])
def test_the_full_training_panel_spans_at_least_one_point(accs: list[float], expected: list[float] | None) -> None:
    teachers = [{"name": f"t{i}", "macs": 9e6, "params": 1, "val_acc": acc} for i, acc in enumerate(accs[:1])]
    retrained = {"trial": 0, "spec": _spec(0), "macs": 4e6, "val_acc": accs[-1]} if accs else None
    data = fronts.pareto_data(FRAME, "macs", None, teachers, winner=0, retrained=retrained)
    assert fronts.full_panel_range(data) == expected
    span = fronts.pareto_figure(data).layout.yaxis3.range
    assert (list(span) if span else None) == expected


@pytest.mark.parametrize(("drop", "shown"), [(-0.06, "+0.06 points"), (1.5, "-1.50 points"), (0.0, "+0.00 points")])
def test_the_int8_change_is_shown_in_signed_points(drop: float, shown: str) -> None:
    """export.py stores the int8 model's test accuracy *drop* in points; the winner's table shows
    the signed change (a gain of 0.06 points once read "int8 accuracy drop -6.00%")."""
    study = optuna.create_study(direction="maximize")
    study.set_user_attr(WINNER_ATTR, {"trial": 0, "spec": SPECS[0], "int8_accuracy_drop": drop})
    text = report.render_html(study, fronts.trials_frame(study))
    assert f"<tr><th>int8 accuracy change</th><td>{shown}</td></tr>" in text
    assert "int8 accuracy drop" not in text


def test_the_compression_teacher_is_read_under_its_old_key_too() -> None:
    study = optuna.create_study(direction="maximize")
    assert compression_teacher(study) == "?"
    study.set_user_attr(STUDY_ATTR, {OLD_COMPRESSION_TEACHER_KEY: "resnet56 for MACs"})
    assert compression_teacher(study) == "resnet56 for MACs"
    study.set_user_attr(STUDY_ATTR, {OLD_COMPRESSION_TEACHER_KEY: "old", COMPRESSION_TEACHER_KEY: "resnet110 for MACs"})
    assert compression_teacher(study) == "resnet110 for MACs"


# ---------------------------------------------------------------- trials_frame on a real storage

SPECS = ["c16|basic_d1_w16_s1_k3_e1|basic_d1_w32_s2_k3_e1", "c24|bottleneck_d2_w16_s1_k3_e4|basic_d1_w48_s2_k5_e1_se",
         "c16|basic_d3_w24_s1_k3_e1|bottleneck_d2_w64_s2_k5_e2", "c8|basic_d1_w8_s1_k3_e1|basic_d1_w16_s2_k3_e1|h64"]
COMPRESSION_TEACHER = Cost(40_000_000, 400_000)
BUDGET = Budget(macs=12_000_000)
# trial number -> (spec, cost, what the objective does after recording the cost, accuracies per epoch)
PLAN = {
    0: (SPECS[0], Cost(10_000_000, 100_000), "return", [0.5, 0.625]),
    1: (SPECS[1], Cost(20_000_000, 200_000), "return", [0.75]),  # over budget: record_cost stops it first
    2: (SPECS[2], Cost(12_000_000, 160_000), "prune", [0.375]),  # exactly on the budget: feasible
    3: (None, None, "fail", None),  # fails before the cost is counted
    4: (SPECS[3], Cost(8_000_000, 50_000), "fail", [0.25]),  # fails after training
}


def _objective(trial: optuna.Trial) -> float:
    """What run_trial does, without the network: record the cost, reject or 'train'."""
    spec, cost, then, accuracies = PLAN[trial.number]
    if spec is None:
        raise RuntimeError("data loader broke")
    if not record_cost(trial, Spec.parse(spec), cost, COMPRESSION_TEACHER, BUDGET):
        raise optuna.TrialPruned("over budget; not trained")
    trial.set_user_attr("val_acc_per_epoch", accuracies)
    trial.set_user_attr("train_seconds", 1.5)
    if then == "prune":
        raise optuna.TrialPruned("pruned after epoch 1")
    if then == "fail":
        raise RuntimeError("loss is NaN")
    return accuracies[-1]


@pytest.fixture(scope="module")
def made_study(tmp_path_factory: pytest.TempPathFactory) -> optuna.Study:
    """Trials 0-4 from PLAN, then one left running (5) and one enqueued (6), with the attributes
    the command line stores on a study."""
    url = f"sqlite:///{tmp_path_factory.mktemp('made') / 'made.db'}"
    study = optuna.create_study(storage=open_storage(url, heartbeat=False), study_name="made", direction="maximize")
    study.optimize(_objective, n_trials=len(PLAN), catch=(RuntimeError,))
    study.ask()
    study.enqueue_trial({})
    study.set_user_attr(STUDY_ATTR, {"budget": {"macs": BUDGET.macs, "params": None}, "budget_text": str(BUDGET),
                                     "teachers": [{"name": "resnet20", "macs": COMPRESSION_TEACHER.macs, "params": COMPRESSION_TEACHER.params,
                                                   "val_acc": 0.9, "source": "trained"}],
                                     "guarded": {"dataset": "fashion-mnist"}, "space": "resnet",
                                     # a study made before the key was renamed to "compression_teacher"
                                     "reference_name": "resnet20 for MACs, resnet20 for params"})
    study.set_user_attr(WINNER_ATTR, {"trial": 0, "spec": SPECS[0], "test_acc": 0.6, "teachers_test_acc": {"resnet20": 0.9},
                                      "int8_accuracy_drop": -0.06})
    return study

def _made_row(number: int, status: str, **values: object) -> dict:
    return {"number": number, "status": status, **{c: values.get(c) for c in COLUMNS[2:]}}


MADE_FRAME = pd.DataFrame([
    _made_row(0, "complete", spec=SPECS[0], macs=10_000_000, params=100_000, macs_compression=4.0,
              params_compression=4.0, score=0.625, val_acc_curve="[[1, 0.5], [2, 0.625]]", train_seconds=1.5,
              feasible=True, budget_use=0.8333),
    _made_row(1, "over_budget", spec=SPECS[1], macs=20_000_000, params=200_000, macs_compression=2.0,
              params_compression=2.0, feasible=False, budget_use=1.6667),
    _made_row(2, "pruned", spec=SPECS[2], macs=12_000_000, params=160_000, macs_compression=3.3333,
              params_compression=2.5, score=0.375, val_acc_curve="[[1, 0.375]]", train_seconds=1.5, feasible=True,
              budget_use=1.0),
    _made_row(3, "failed"),
    _made_row(4, "failed", spec=SPECS[3], macs=8_000_000, params=50_000, macs_compression=5.0, params_compression=8.0,
              score=0.25, val_acc_curve="[[1, 0.25]]", train_seconds=1.5, feasible=True, budget_use=0.6667),
    _made_row(5, "running"),
    _made_row(6, "waiting"),
], columns=COLUMNS)


def test_trials_frame(made_study: optuna.Study) -> None:
    pd.testing.assert_frame_equal(fronts.trials_frame(made_study), MADE_FRAME)


def test_write_report(made_study: optuna.Study, tmp_path: Path) -> None:
    html_path, csv_path = report.write_report(made_study, tmp_path / "out")
    assert (html_path, csv_path) == (tmp_path / "out" / "report.html", tmp_path / "out" / "trials.csv")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "trials.csv"]  # no .tmp left
    text = html_path.read_text(encoding="utf-8")
    _assert_self_contained(text)
    for spec in SPECS:
        assert spec in text
    assert "budget <b>MACs &lt;= 12M</b>" in text
    assert "Trials: 1 complete, 2 failed, 1 over budget, 1 pruned, 1 running, 1 waiting.</p>" in text
    assert ("<h2>Winner</h2>" in text, "<h2>Teachers</h2>" in text) == (True, True)
    assert "the largest teacher's cost over the student's (resnet20 for MACs, resnet20 for params)." in text
    assert "<tr><th>int8 accuracy change</th><td>+0.06 points</td></tr>" in text
    table = pd.read_csv(csv_path)
    assert list(table.columns) == COLUMNS
    assert table["number"].tolist() == list(range(7))
    assert table["status"].tolist() == MADE_FRAME["status"].tolist()
    assert table["spec"].fillna("").tolist() == [SPECS[0], SPECS[1], SPECS[2], "", SPECS[3], "", ""]
    assert table["score"].fillna(-1).tolist() == [0.625, -1, 0.375, -1, 0.25, -1, -1]


def _assert_self_contained(text: str) -> None:
    """plotly.js inline exactly once (the first figure carries it), nothing fetched from a network."""
    assert text.count(plotly.offline.get_plotlyjs()) == 1
    assert re.search(r"<script[^>]*\bsrc=", text) is None


# ---------------------------------------------------------------- the end-to-end search's report


def _e2e_study(e2e_run: dict) -> optuna.Study:
    return optuna.load_study(study_name=E2E_STUDY, storage=open_storage(e2e_run["url"], heartbeat=False))


def test_search_report_matches_its_storage(e2e_run: dict) -> None:
    study = _e2e_study(e2e_run)
    table = pd.read_csv(e2e_run["study_dir"] / "trials.csv")
    # read against the storage itself, not the function that wrote the file: a row per trial, its figures
    trials = study.get_trials(deepcopy=False)
    assert table["number"].tolist() == [t.number for t in trials]
    for row, trial in zip(table.to_dict("records"), trials):
        a = trial.user_attrs
        assert (row["spec"], row["macs"], row["params"]) == (a["spec"], a["macs"], a["params"])
        if trial.state.name == "COMPLETE":
            assert row["score"] == pytest.approx(trial.values[0]) and row["train_seconds"] == pytest.approx(
                a["train_seconds"])
        else:
            assert pd.isna(row["score"])
    # --trials 2: two trained, no pruning before the median pruner's 4 start-up trials; the rest over budget
    assert sorted(table["status"].unique()) == ["complete", "over_budget"]
    assert (table["status"] == "complete").sum() == 2
    assert table["feasible"].tolist() == (table["macs"] <= E2E_BUDGET).tolist()
    assert table["feasible"].tolist() == (table["status"] == "complete").tolist()

    text = (e2e_run["study_dir"] / "report.html").read_text(encoding="utf-8")
    _assert_self_contained(text)
    for spec in table["spec"]:
        assert spec in text
    assert "budget <b>MACs &lt;= 12M</b>" in text
    assert f"<h1>nas_kd study {E2E_STUDY}</h1>" in text
    assert "<h2>Winner</h2>" in text  # --final-epochs 1 retrained the winner


def test_search_winner_is_on_the_pareto_front(e2e_run: dict) -> None:
    """The winner (best feasible accuracy, ties: fewer MACs) cannot be beaten, so the front holds it."""
    study = _e2e_study(e2e_run)
    info, winner = study.user_attrs[STUDY_ATTR], study.user_attrs[WINNER_ATTR]
    data = fronts.pareto_data(fronts.trials_frame(study), "macs", info["budget"]["macs"], info["teachers"],
                              winner["trial"])
    assert data.budget == E2E_BUDGET
    assert winner["trial"] in data.front.number
    assert all(x <= E2E_BUDGET for x in data.feasible.x)
    assert all(x > E2E_BUDGET for x in data.infeasible.x)


def test_report_command_rebuilds_both_files(e2e_run: dict, tmp_path: Path) -> None:
    e2e_run = copy_of_e2e(e2e_run, tmp_path)  # the files are rewritten while other tests read the shared ones
    html_path, csv_path = e2e_run["study_dir"] / "report.html", e2e_run["study_dir"] / "trials.csv"
    csv_before = csv_path.read_text()
    mtimes = (html_path.stat().st_mtime_ns, csv_path.stat().st_mtime_ns)
    result = run_cli("nas_kd.report", "--study-name", E2E_STUDY, "--out-dir", str(e2e_run["out"]),
                     cwd=e2e_run["work"], timeout=120)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"report: {html_path}\ntrials: {csv_path}\n"
    assert html_path.stat().st_mtime_ns > mtimes[0] and csv_path.stat().st_mtime_ns > mtimes[1]
    assert csv_path.read_text() == csv_before  # the same storage gives the same table
    _assert_self_contained(html_path.read_text(encoding="utf-8"))


def test_report_command_bad_input_is_one_line(tmp_path: Path) -> None:
    """As a user meets it: exit status 2, one line on stderr, no traceback."""
    result = run_cli("nas_kd.report", "--study-name", "nope", "--out-dir", str(tmp_path), cwd=tmp_path, timeout=120)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (f"error: no storage at sqlite:///{tmp_path}/nope.db; "
                             "pass --storage with the URL the search used\n")
    assert list(tmp_path.iterdir()) == []  # nothing written, no storage created


@pytest.mark.parametrize("case", ["no storage file", "no such study", "unsupported URL"])
def test_report_main_bad_input(case: str, e2e_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Each kind of bad storage input is one clear line and status 2 (in-process: an escaping
    exception would fail the test the way a traceback would)."""
    args, message = {
        "no storage file": (["--out-dir", str(tmp_path)],
                            f"no storage at sqlite:///{tmp_path}/nope.db; pass --storage with the URL the search used"),
        "no such study": (["--storage", e2e_run["url"]], f"no study 'nope' in {e2e_run['url']}; it holds: {E2E_STUDY}"),
        "unsupported URL": (["--storage", "mysql://u@h/db"],
                            "storage URL 'mysql://u@h/db' uses 'mysql'; supported: sqlite:///PATH.db, postgresql://..."),
    }[case]
    verbosity = optuna.logging.get_verbosity()
    try:
        status = report_cli.main(["--study-name", "nope", *args])
    finally:
        optuna.logging.set_verbosity(verbosity)  # main quiets optuna for the whole process
    assert (status, *capsys.readouterr()) == (2, "", f"error: {message}\n")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the report renders in a browser, offline

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TITLES = ["Validation accuracy vs MACs (second tick row: compression vs the largest teacher)",
          "Validation accuracy vs parameters (second tick row: compression vs the largest teacher)",
          "Validation accuracy vs latency (ms)",  # trials carry latency_ms: the third front
          "Validation accuracy of each trial during its training (what the pruner saw)"]


def test_report_renders_offline_in_chromium(e2e_run: dict, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed; install it with `apt-get install -y chromium` to run this test")
    page = (e2e_run["study_dir"] / "report.html").resolve()
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--host-resolver-rules=MAP * ~NOTFOUND",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    # plotly draws each figure into <svg class="main-svg"> elements; the titles are rendered SVG text
    assert 'class="main-svg"' in dom
    assert re.findall(r'<text class="gtitle"[^>]*>([^<]*)</text>', dom) == TITLES


def test_a_repeat_is_listed_but_drawn_once() -> None:
    """A trial that reused the score of an earlier trial of its spec is a row of the table
    ('repeat', pointing at that trial) and not a second point of the front."""
    study = optuna.create_study(direction="maximize")
    spec = {"spec": "c16|basic_d1_w16_s1_k3_e1", "macs": 4_000_000, "params": 40_000}
    study.add_trial(optuna.trial.create_trial(value=0.8, constraints={"macs": -0.5}, user_attrs={
        **spec, "score": 0.8, "score_kind": "distill", "val_acc_curve": [[1.0, 0.8]], "val_acc_raw": 0.7}))
    study.add_trial(optuna.trial.create_trial(value=0.8, constraints={"macs": -0.5},
                                              user_attrs={**spec, "repeat_of": 0}))
    frame = fronts.trials_frame(study)
    assert frame["status"].tolist() == ["complete", "repeat"]
    assert frame["repeat_of"].tolist()[1] == 0 and frame["val_acc_raw"].tolist()[0] == 0.7
    data = fronts.pareto_data(frame, "macs", 5e6, TEACHERS)
    assert data.feasible.number == [0] and data.front.number == [0]
