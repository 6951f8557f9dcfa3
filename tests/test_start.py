"""Start points (nas_kd.start): the hand-made network scaled to a budget, the specs a user gives,
and a search that trains them first, once per study."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest

from nas_kd.arch import Spec
from nas_kd.cost import Budget
from nas_kd.errors import InputError
from nas_kd.search import main
from nas_kd.space import load_space
from nas_kd.start import HAND_MADE, START_ATTR, enqueue, hand_made, scaled, spec_cost, start_points
from nas_kd.teachers import teacher_spec
from tests.conftest import search_cli

SHAPE, CLASSES = (1, 28, 28), 10
# in the shipped resnet space, 9.35M MACs
GIVEN = "c16|basic_d1_w16_s1_k3_e1|basic_d1_w32_s2_k3_e1|basic_d1_w64_s2_k3_e1"


@pytest.mark.parametrize(("budget", "spec", "name"), [
    # the hand-made rows of benchmarks/search_vs_baselines.py (BENCHMARKS.md)
    (Budget(50_000_000), "c20|basic_d3_w20_s1_k3_e1|basic_d3_w40_s2_k3_e1|basic_d3_w84_s2_k3_e1", "ResNet-20 at x1.31"),
    (Budget(5_000_000), "c12|basic_d1_w12_s1_k3_e1|basic_d1_w20_s2_k3_e1|basic_d1_w44_s2_k3_e1", "ResNet-8 at x0.68"),
    (Budget(12_000_000), "c8|basic_d3_w8_s1_k3_e1|basic_d3_w20_s2_k3_e1|basic_d3_w40_s2_k3_e1", "ResNet-20 at x0.62"),
    (Budget(None, 100_000), "c8|basic_d3_w8_s1_k3_e1|basic_d3_w20_s2_k3_e1|basic_d3_w36_s2_k3_e1", "ResNet-20 at x0.59"),
])
def test_the_hand_made_network_is_the_deepest_resnet_at_the_widest_width_that_fits(budget: Budget, spec: str,
                                                                                     name: str) -> None:
    found, text = hand_made(budget, SHAPE, CLASSES)
    assert str(found) == spec and text == f"{name} widths"
    base = teacher_spec(name.split(" ")[0].replace("ResNet-", "resnet"))
    factor = float(name.split("x")[1])
    assert scaled(base, factor) == found and budget.fits(spec_cost(found, SHAPE, CLASSES))
    # the next width step does not fit (so the bisection found the largest one)
    assert not budget.fits(spec_cost(scaled(base, factor + 0.01), SHAPE, CLASSES))


def test_no_hand_made_network_when_not_even_resnet8_fits() -> None:
    assert hand_made(Budget(200_000), SHAPE, CLASSES) is None
    points, skipped = start_points((HAND_MADE,), load_space("resnet"), Budget(200_000), SHAPE, CLASSES)
    assert points == [] and skipped == ["start point hand-made: no width of ResNet-8 fits MACs <= 200K; left out"]


def test_start_points_in_the_space_carry_their_params_and_others_none() -> None:
    space = load_space("resnet")
    points, skipped = start_points((HAND_MADE, GIVEN, HAND_MADE), space, Budget(50_000_000), SHAPE, CLASSES)
    assert skipped == [] and [p.name for p in points] == [HAND_MADE, "given"]  # the repeat is dropped
    made, given = points
    assert made.params is None and made.text == ("ResNet-20 at x1.31 widths, 49.96M MACs, 455.8K params, "
                                                 "outside the search space")
    assert given.params == space.params_of(Spec.parse(GIVEN)) and given.text.endswith("in the search space")


@pytest.mark.parametrize(("name", "message"), [
    ("c16|basic_d9", "--start-from: bad stage 'basic_d9' in spec 'c16|basic_d9'"),
    ("resnet20", "--start-from: bad spec 'resnet20': expected 'c<stem>|<stage>|...[|h<head>]'"),
    (GIVEN, f"--start-from {GIVEN}: macs 9.346M > 5M, over the budget; give a student that fits"),
])
def test_a_bad_start_point_is_refused(name: str, message: str) -> None:
    with pytest.raises(InputError) as e:
        start_points((name,), load_space("resnet"), Budget(5_000_000), SHAPE, CLASSES)
    assert str(e.value).startswith(message)


def test_a_bad_start_point_on_the_command_line_is_one_line_and_exit_2(capsys, tmp_path: Path, monkeypatch,
                                                                      mini_fashion_dir: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--flops-budget", "5M", "--start-from", GIVEN, "--data-dir", str(mini_fashion_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --start-from {GIVEN}: macs 9.346M > 5M, over the budget; give a student that fits"]
    assert not (tmp_path / "studies").exists()  # refused before any work


def test_a_search_trains_its_start_points_first_and_once_per_study(e2e_run: dict, tmp_path: Path) -> None:
    # scored by parameter count: nothing is trained, the plumbing is what is tested
    args = ("--flops-budget", "12M", "--teachers", "resnet8", "--trials", "3", "--trial-score", "params",
            "--final-epochs", "0", "--seed", "3", "--no-onnx", "--quiet", "--start-from", HAND_MADE,
            "--start-from", GIVEN)
    study, out = search_cli(tmp_path, e2e_run["out"] / "cache", e2e_run["data_dir"], *args)
    made = "c8|basic_d3_w8_s1_k3_e1|basic_d3_w20_s2_k3_e1|basic_d3_w40_s2_k3_e1"
    first, second = study.trials[:2]
    assert first.user_attrs["spec"] == made and first.params == {} and first.user_attrs[START_ATTR] == HAND_MADE
    # a start point in the space is a trial of the space: the sampler sees its params
    assert second.user_attrs["spec"] == GIVEN and second.user_attrs[START_ATTR] == "given"
    assert second.params == load_space("resnet").params_of(Spec.parse(GIVEN))
    assert first.state == second.state == optuna.trial.TrialState.COMPLETE and first.value == first.user_attrs["params"]
    assert f"start point hand-made: {made} (ResNet-20 at x0.62 widths, " in out
    assert f"trial 0 complete (hand-made start point): {made}" in out
    assert START_ATTR not in study.trials[2].user_attrs
    rows = pd.read_csv(tmp_path / "studies" / "s" / "trials.csv")
    assert list(rows["start_point"].fillna(""))[:3] == [HAND_MADE, "given", ""]
    # resumed: the study holds both start points, so neither is enqueued (nor trained) again
    points, _ = start_points((HAND_MADE, GIVEN), load_space("resnet"), Budget(12_000_000), SHAPE, CLASSES)
    assert enqueue(study, points) == [f"start point hand-made: {made} is already in the study",
                                      f"start point given: {GIVEN} is already in the study"]
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 0
