"""The time budget's arithmetic (nas_kd.pipeline.plan), driven by fake costs and a fake clock."""

from __future__ import annotations

import re

import pytest

from nas_kd.core.errors import InputError
from nas_kd.core.progress import RunClock
from nas_kd.core.units import format_duration, parse_duration
from nas_kd.pipeline.plan import Costs, epochs_left, least_budget, make_plan, retrain_end


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400),
                                           ("1.5h", 5400), (" 10m ", 600), ("1m30s", 90)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "5x", "-5m", "0s", "m", "1d", "30 minutes", "nan", "1e3s"])
def test_bad_durations_are_refused_in_one_line(text: str) -> None:
    with pytest.raises(InputError, match=r"--time-budget .* is not a duration; use a number with s, m or h") as e:
        parse_duration(text)
    assert "\n" not in str(e.value)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (12, 89, 540, 1080, 3900)] == ["12s", "89s", "540s", "18m", "1h05m"]


COSTS = Costs(spent=100.0, trial=40.0, epoch=90.0, export=60.0)


def test_the_split() -> None:
    plan = make_plan(1800.0, COSTS, search_share=0.3)
    left = 1800 - 100 - 60  # 1640 s to share
    assert plan.trials == 12  # floor(0.3 * 1640 / 40)
    assert plan.search == 12 * 40
    assert plan.epochs == 12  # floor((1640 - 480) / 90)
    assert plan.retrain == 12 * 90
    assert plan.spent + plan.search + plan.retrain + plan.export <= 1800
    assert plan.line(12) == ("time budget 30m on this machine: 100s spent on setup, search ~480s (~12 trials), "
                             "retrain ~18m (~12 epochs), export ~60s")
    assert left - plan.search - plan.retrain < COSTS.epoch  # nothing worth an epoch is left over


def test_a_larger_share_buys_trials_not_epochs() -> None:
    small, large = make_plan(1800.0, COSTS, 0.2), make_plan(1800.0, COSTS, 0.4)
    assert small.trials < large.trials and small.epochs > large.epochs


def test_a_budget_that_fits_nothing_is_refused_naming_the_least() -> None:
    assert least_budget(COSTS) == 100 + 40 + 90 + 60
    with pytest.raises(InputError, match=r"--time-budget 240s is too small on this machine: .* need at least 290s"):
        make_plan(240.0, COSTS)
    plan = make_plan(290.0, COSTS)  # the least itself works: one trial, one epoch
    assert (plan.trials, plan.epochs) == (1, 1)


def test_overrides() -> None:
    trials = make_plan(1800.0, COSTS, trials=5)
    assert trials.trials == 5 and trials.search == 200 and trials.epochs == 16  # floor((1640 - 200) / 90)
    epochs = make_plan(1800.0, COSTS, epochs=3)
    assert epochs.epochs == 3 and epochs.trials == 34  # floor((1640 - 270) / 40)
    both = make_plan(60.0, COSTS, trials=2, epochs=1)  # counts given: no refusal, whatever the budget
    assert (both.trials, both.epochs) == (2, 1)


def test_a_resumed_study_plans_from_what_it_holds() -> None:
    fresh, resumed = make_plan(1800.0, COSTS), make_plan(1800.0, COSTS, held=7)
    assert resumed.trials == fresh.trials + 7 and resumed.search == fresh.search
    assert make_plan(1800.0, COSTS, trials=10, held=7).search == 3 * 40
    assert make_plan(1800.0, COSTS, trials=5, held=7).search == 0


def test_epochs_left_after_the_search_with_a_fake_clock() -> None:
    now = [1000.0]
    clock = RunClock(now=lambda: now[0])
    now[0] += 700.0
    assert clock.elapsed() == 700.0
    assert epochs_left(1800.0, clock.elapsed(), epoch=90.0, export=60.0) == 12  # 1040 / 90 = 11.6: 12 end nearest
    assert epochs_left(1800.0, clock.elapsed(), epoch=100.0, export=60.0) == 10  # 10.4: 10, 40 s short
    assert epochs_left(600.0, 277.0, epoch=166.0, export=60.0) == 2  # 1.58: the 10-minute run that trained 1
    assert epochs_left(1800.0, 1790.0, epoch=90.0) == 1  # past the budget: still one epoch


def test_a_time_budget_run_ends_within_it_and_records_its_plan(tmp_path, mini_fashion_dir) -> None:
    """A tiny search with --time-budget: the plan line at the start, trials and retrain epochs
    chosen by the plan, the actual split at the end and in the study, and the run within its
    budget plus the tolerance of one trial."""
    import optuna

    from nas_kd.pipeline.plan import TIME_ATTR
    from tests.conftest import TINY_DATA_FLAGS, run_cli

    # the least this run accepts is 31 s on a quiet 2-core machine at one thread (9 s of setup, a trial,
    # a retrain epoch and the export's 20-s estimate); 50 s leaves room for a slower machine
    budget = 50
    result = run_cli("nas_kd.search", *TINY_DATA_FLAGS, "--flops-budget", "12M", "--teachers", "resnet8",
                     "--teacher-epochs", "1", "--trial-epochs", "1", "--subset", "300", "--no-onnx", "--quiet",
                     "--study-name", "timed", "--data-dir", str(mini_fashion_dir), "--time-budget", f"{budget}s",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"time budget {budget}s on this machine: " in result.stderr
    study = optuna.load_study(study_name="timed", storage=f"sqlite:///{tmp_path / 'studies' / 'timed.db'}")
    record = study.user_attrs[TIME_ATTR]
    plan, actual = record["plan"], record["actual"]
    assert plan["budget"] == budget and plan["trials"] >= 1 and plan["epochs"] >= 1
    assert actual["trials"] >= 1 and actual["epochs"] == study.user_attrs["winner"]["final_epochs"] >= 1
    assert actual["export"] > 0  # the test, weights and report after the retrain, counted apart from it
    trial_seconds = record["costs"]["trial"]
    assert actual["total"] <= budget + max(trial_seconds, 30), actual
    assert any(f"time budget {budget}s: setup " in line and " the budget" in line and "total" in line
               for line in result.stderr.splitlines())
    # off a terminal, every trial and retrain epoch line says the time elapsed of the budget
    lines = result.stderr.splitlines()
    trial_lines = [line for line in lines if line.startswith("[nas_kd] trial ") and " complete: " in line]
    epoch_lines = [line for line in lines if line.startswith("[nas_kd] retrain epoch ")]
    assert trial_lines and epoch_lines
    # the retrain's length is re-planned after each epoch: its lines count to the epochs it trained
    assert any("re-planned after each" in line for line in lines if line.startswith("[nas_kd] retraining trial"))
    assert epoch_lines[-1].startswith(f"[nas_kd] retrain epoch {actual['epochs']}/{actual['epochs']}: ")
    assert all(re.search(rf" \[\d+s of {budget}s\]$", line) for line in trial_lines + epoch_lines), trial_lines + epoch_lines


def test_a_time_budget_too_small_is_refused_in_one_line(tmp_path, mini_fashion_dir) -> None:
    from tests.conftest import TINY_DATA_FLAGS, run_cli

    result = run_cli("nas_kd.search", *TINY_DATA_FLAGS, "--flops-budget", "12M", "--teachers", "resnet8",
                     "--teacher-epochs", "1", "--subset", "300", "--no-onnx", "--quiet", "--data-dir",
                     str(mini_fashion_dir), "--time-budget", "1s", cwd=tmp_path)
    assert result.returncode == 2
    assert "error: --time-budget 1s is too small on this machine" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "studies").exists()  # refused before any teacher, target or study
    bad = run_cli("nas_kd.search", "--flops-budget", "12M", "--time-budget", "5 minutes", cwd=tmp_path)
    assert bad.returncode == 2 and "--time-budget '5 minutes' is not a duration" in bad.stderr


def test_the_export_allowance_is_smaller_without_onnx() -> None:
    from nas_kd.core.config import SearchConfig
    from nas_kd.pipeline.plan import EXPORT_SECONDS, REPORT_SECONDS, export_seconds

    assert export_seconds(SearchConfig()) == EXPORT_SECONDS == 60.0
    assert export_seconds(SearchConfig(onnx=False)) == REPORT_SECONDS == 20.0


def test_the_time_budget_status_and_bar_follow_the_clock() -> None:
    from nas_kd.core.progress import RunClock, budget_status

    now = [100.0]
    assert budget_status() == ""
    with RunClock(1800.0, 40.0, progress=False, now=lambda: now[0]) as run:
        assert run.bar is None  # no terminal here: the lines carry the status instead
        assert budget_status() == " [60s of 30m]"
        now[0] = 40.0 + 725.0
        assert budget_status() == " [12m of 30m]"
    assert budget_status() == "" and RunClock.active is None
    with RunClock(None, 0.0, progress=True):  # no budget: nothing
        assert budget_status() == ""


def test_a_search_timeout_waits_for_one_trained_trial() -> None:
    """The search's timeout (what a time budget sets) stops the study only once it holds a trained
    trial: rejections that eat the time do not leave the run without a student."""
    import time

    import optuna

    from nas_kd.nas.records import SCORE_ATTR
    from nas_kd.nas.study import run

    calls = []

    def objective(trial: optuna.Trial) -> float:
        calls.append(trial.number)
        time.sleep(0.02)
        if len(calls) > 3:  # the first three are rejected (over budget: no score), the rest train
            trial.set_user_attr(SCORE_ATTR, 0.5)
        return 0.5

    study = optuna.create_study(direction="maximize")
    assert run(study, objective, trained=10, timeout=0.01) == 1
    assert calls == [0, 1, 2, 3]  # the timeout had passed after trial 0; it stopped after the first trained one
    assert run(study, objective, trained=10, timeout=0.01) == 1  # a study that holds one: the timeout counts at once


def test_the_retrain_ends_by_the_budget_less_the_export_unless_its_epochs_were_given() -> None:
    from nas_kd.core.config import SearchConfig

    planned = SearchConfig(time_budget=1800.0)
    assert retrain_end(planned, elapsed=700.0, now=lambda: 5000.0) == 5000.0 + 1800 - 60 - 700
    assert retrain_end(SearchConfig(time_budget=1800.0, onnx=False), 700.0, lambda: 0.0) == 1800 - 20 - 700
    fixed = SearchConfig(time_budget=1800.0, time_fixed=("final_epochs",))
    assert retrain_end(fixed, 700.0) is None  # --final-epochs given: its count is kept, not re-planned


@pytest.mark.parametrize("marks, why", [
    ({"setup": 200.0, "search": 600.0, "retrain": 1720.0, "end": 1750.0}, ""),  # 3% under: the figures alone
    ({"setup": 200.0, "search": 600.0, "retrain": 1470.0, "end": 1500.0}, " (the retrain took 14m of the ~18m planned)"),
    ({"setup": 200.0, "search": 1000.0, "retrain": 2070.0, "end": 2100.0}, " (the search took 13m of the ~400s planned)"),
    ({"setup": 200.0, "search": 600.0, "retrain": 1650.0, "end": 2000.0}, " (the export took 350s of the ~60s planned)"),
])
def test_the_split_line_says_why_a_run_ended_more_than_10_percent_off(marks: dict[str, float], why: str) -> None:
    """Within 10% of the budget the split line gives the figures alone; beyond, the part of the run
    that strayed furthest from its plan, the way the run did; the study keeps the actual split."""
    import optuna

    from nas_kd.pipeline.plan import TIME_ATTR, Plan, record_split

    study = optuna.create_study()
    plan = Plan(budget=1800.0, spent=200.0, search=400.0, trials=10, retrain=1100.0, epochs=12, export=60.0)
    line = record_split(study, plan, marks, 10, 5)
    assert line.endswith(f"{'over' if marks['end'] > 1800 else 'under'} the budget{why}"), line
    assert study.user_attrs[TIME_ATTR]["actual"]["epochs"] == 5
