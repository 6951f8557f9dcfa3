"""The budget floor: students that leave most of the budget unused are recorded, never trained."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from conftest import search_cli

from nas_kd.core.config import SearchConfig
from nas_kd.core.errors import InputError
from nas_kd.nas.budget import Budget, effective_floor, floor_shortfall
from nas_kd.nas.objective import record_cost
from nas_kd.nas.records import FLOOR_CONSTRAINT, USE_ATTR, is_feasible, status, was_trained
from nas_kd.nas.study import default_study_name, guarded, open_storage, open_study
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.cost import Cost, count
from nas_kd.nets.space import load_space
from nas_kd.reporting.summary import trial_line
from nas_kd.search import main

SPEC = Spec.parse("c16|basic_d1_w16_s1_k3_e1|basic_d1_w32_s2_k3_e1")
COMPRESSION_TEACHER = Cost(40_000_000, 400_000)


def test_use_is_the_larger_share_of_the_count_bounds() -> None:
    cost = Cost(10_000_000, 300_000)
    assert Budget(macs=40_000_000).use(cost) == 0.25
    assert Budget(params=400_000).use(cost) == 0.75
    assert Budget(macs=40_000_000, params=400_000).use(cost) == 0.75  # the binding bound
    assert Budget(latency_ms=2.0).use(cost) is None  # the latency is not known
    # a student close to its latency bound uses its budget, however few MACs it has
    assert Budget(macs=40_000_000, latency_ms=2.0).use(Cost(10_000_000, 300_000, latency_ms=1.5)) == 0.75
    assert Budget(macs=40_000_000, memory=100_000).use(Cost(10_000_000, 300_000, memory=20_000)) == 0.25
    assert floor_shortfall(Budget(macs=40_000_000), cost, 0.5) == pytest.approx(0.5)  # half the floor short
    assert floor_shortfall(Budget(macs=20_000_000), cost, 0.5) == pytest.approx(0.0)  # exactly on it: met
    assert floor_shortfall(Budget(macs=40_000_000), cost, 0.0) is None


@pytest.mark.parametrize(("cost", "state", "line"), [
    (Cost(4_000_000, 40_000), "under_floor", "under the budget floor (uses 33% of the budget): not trained"),
    (Cost(6_000_000, 60_000), "complete", None),  # exactly half the budget: trained
    (Cost(13_000_000, 60_000), "over_budget", "over budget (macs): not trained"),
])
def test_a_student_under_the_floor_is_recorded_and_not_trained(cost: Cost, state: str, line: str | None) -> None:
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    budget = Budget(macs=12_000_000)

    def objective(trial: optuna.Trial) -> float:
        if not record_cost(trial, SPEC, cost, COMPRESSION_TEACHER, budget, floor=0.5):
            raise optuna.TrialPruned("not trained")
        trial.set_user_attr("score", 0.5)
        return 0.5

    study.optimize(objective, n_trials=1)
    t = study.trials[0]
    assert status(t) == state
    assert t.user_attrs[USE_ATTR] == pytest.approx(cost.macs / 12_000_000, abs=1e-4)
    assert t.constraints[FLOOR_CONSTRAINT] == pytest.approx(1 - cost.macs / 6_000_000)
    assert is_feasible(t) == (state == "complete")
    if line:
        assert trial_line(t).endswith(line), trial_line(t)


def test_the_largest_spec_has_more_macs_than_any_random_one() -> None:
    space = load_space("resnet-v1")
    spec, cost = space.largest((1, 28, 28), 10)
    assert space.params_of(spec) is not None  # in the space
    assert cost.macs == count(build(spec, (1, 28, 28), 10, channels_last=False), (1, 28, 28)).macs
    randoms = [count(build(s, (1, 28, 28), 10, channels_last=False), (1, 28, 28)).macs
               for s in space.random_specs(60, seed=1)]
    assert cost.macs >= max(randoms)


def test_the_floor_follows_the_space_when_the_budget_is_beyond_it() -> None:
    space = load_space("resnet-v1")
    shape = (1, 28, 28)
    # a tight budget most random specs exceed keeps the whole floor (few random specs fit 5M)
    assert effective_floor(0.5, Budget(macs=5_000_000), space, shape, 10)[0] == 0.5
    floor, text = effective_floor(0.5, Budget(macs=50_000_000), space, shape, 10)
    assert floor == 0.5 and "less than 50% of every bound of the budget are not trained" in text
    # the resnet space's students stay far under 5G MACs: the floor is half of what they reach,
    # so the larger ones still train instead of every trial being refused
    floor, text = effective_floor(0.5, Budget(macs=5_000_000_000), space, shape, 10)
    assert 0 < floor < 0.1 and "the space's largest student uses" in text
    reach = 2 * floor
    big = effective_floor(0.5, Budget(macs=int(5_000_000_000 * reach) + 1), space, shape, 10)[0]
    assert big == pytest.approx(0.5)  # a budget the space reaches: the share as asked
    assert effective_floor(0.5, Budget(latency_ms=2.0), space, shape, 10) == (
        0.0, "budget floor: none, as the budget has no MACs or params bound")
    assert effective_floor(0.0, Budget(macs=50_000_000), space, shape, 10) == (0.0, "")  # off: nothing to say


def test_a_study_resumes_only_with_the_floor_it_was_made_with(tmp_path: Path) -> None:
    """The floor decides which students a study trains: off (the default, and every study made
    before the floor existed) it is not recorded, so those keep their names; a study made with
    one resumes only with the same one, and one made without refuses a floor, naming the setting."""
    storage = open_storage(f"sqlite:///{tmp_path / 'old.db'}", heartbeat=False)
    off = guarded(SearchConfig(flops_budget=5_000_000), "resnet-v1")
    assert "budget_floor" not in off
    open_study(storage, "old", False, 0, off)
    half = guarded(SearchConfig(flops_budget=5_000_000, budget_floor=0.5), "resnet-v1")
    assert half["budget_floor"] == 0.5 and default_study_name(half) != default_study_name(off)
    with pytest.raises(InputError, match="created with budget_floor=0.0, this run has budget_floor=0.5"):
        open_study(storage, "old", False, 0, half)
    assert open_study(storage, "old", False, 0, off).study_name == "old"
    open_study(storage, "new", False, 0, half)
    with pytest.raises(InputError, match="created with budget_floor=0.5, this run has budget_floor=0.0"):
        open_study(storage, "new", False, 0, off)


def test_a_search_with_a_floor_trains_only_students_over_it(e2e_run: dict, tmp_path: Path) -> None:
    study, out = search_cli(tmp_path, e2e_run["out"] / "cache", e2e_run["data_dir"], "--flops-budget", "12M",
                            "--teachers", "resnet8", "--trials", "2", "--trial-epochs", "1", "--subset", "300",
                            "--final-epochs", "0", "--seed", "3", "--no-onnx", "--quiet", "--budget-floor", "0.5",
                            "--budget-edge", "off", "--search-space", "resnet-v1")
    assert sum(was_trained(t) for t in study.trials) == 2
    for t in study.trials:
        macs = t.user_attrs["macs"]
        # the named constraints, and the legacy list optuna-dashboard 0.21 reads (items "0", "1")
        assert set(t.constraints) == {"macs", "budget_floor", "0", "1"}
        assert [t.constraints["0"], t.constraints["1"]] == [t.constraints["macs"], t.constraints["budget_floor"]]
        assert t.constraints["budget_floor"] == pytest.approx(1 - macs / 6_000_000)
        assert is_feasible(t) == (6_000_000 <= macs <= 12_000_000) == was_trained(t)
        if not was_trained(t):
            assert status(t) == ("over_budget" if macs > 12_000_000 else "under_floor")
    under = sum(status(t) == "under_floor" for t in study.trials)
    assert "budget floor: students using less than 50% of every bound of the budget are not trained" in out
    assert "MACs <= 12M; floor 50% of a bound" in out and (f"({under} under the floor)" in out) == (under > 0)
    assert study.user_attrs["nas_kd"]["budget_floor"] == 0.5


@pytest.mark.parametrize(("argv", "message"), [
    (["--budget-floor", "1"], "argument --budget-floor: expected a fraction in [0, 1), got '1'"),
    (["--budget-floor", "-0.1"], "argument --budget-floor: expected a fraction in [0, 1), got '-0.1'"),
    (["--budget-floor", "half"], "argument --budget-floor: expected a fraction in [0, 1), got 'half'"),
    (["--config", "c.yaml"], "budget_floor must be a share in [0, 1), got 1.5"),
])
def test_a_bad_floor_is_one_line_and_exit_2(argv: list[str], message: str, capsys, tmp_path: Path,
                                            monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("budget_floor: 1.5\n")
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(["--flops-budget", "50M", *argv]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "studies").exists()  # refused before any work
