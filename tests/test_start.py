"""Start points (nas_kd.nas.start): the hand-made network scaled to a budget, the specs a user gives,
and a search that trains them first, once per study."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import optuna
import pandas as pd
import pytest

from nas_kd.core.errors import InputError
from nas_kd.device.latency import LatencyTable
from nas_kd.device.memory import peak_activations
from nas_kd.nas.budget import Budget
from nas_kd.nas.objective import may_prune
from nas_kd.nas.picks import START_POINTS_ATTR, enqueue_start_points, retrain_candidates
from nas_kd.nas.records import SPEC_ATTR, START_ATTR
from nas_kd.nas.start import (
    FAMILY_STEPS,
    HAND_MADE,
    family,
    family_specs,
    fitting_factor,
    hand_made,
    scaled,
    space_params,
    spec_cost,
    start_points,
)
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.cost import Cost, count
from nas_kd.nets.space import load_space
from nas_kd.nets.zoo import teacher_spec
from nas_kd.search import main
from tests.conftest import AT_THE_EDGE, search_cli

SHAPE, CLASSES = (1, 28, 28), 10
# in the shipped resnet space, 9.35M MACs
GIVEN = "c16|basic_d1_w16_s1_k3_e1|basic_d1_w32_s2_k3_e1|basic_d1_w64_s2_k3_e1"


@pytest.mark.parametrize(("budget", "spec", "name"), [
    # the budgets of the hand-made rows of benchmarks/search_vs_baselines.py (BENCHMARKS.md), and 2M
    (Budget(50_000_000), "c20|basic_d3_w20_s1_k3_e1|basic_d3_w40_s2_k3_e1|basic_d3_w84_s2_k3_e1", "ResNet-20 at x1.31"),
    # ResNet-14 just under half its widths, over 0.45 (the rule of half widths or more picked
    # ResNet-8 at x0.68, 12/20/44, which was worse on each of 3 seeds)
    (Budget(5_000_000), "c8|basic_d2_w8_s1_k3_e1|basic_d2_w16_s2_k3_e1|basic_d2_w28_s2_k3_e1", "ResNet-14 at x0.46"),
    # at 2M no deeper ResNet fits at 0.45 of its widths, nor ResNet-8 at 1M: it is taken narrower
    (Budget(2_000_000), "c8|basic_d1_w8_s1_k3_e1|basic_d1_w12_s2_k3_e1|basic_d1_w28_s2_k3_e1", "ResNet-8 at x0.43"),
    (Budget(1_000_000), "c4|basic_d1_w4_s1_k3_e1|basic_d1_w12_s2_k3_e1|basic_d1_w24_s2_k3_e1", "ResNet-8 at x0.37"),
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
    points, skipped = start_points((HAND_MADE,), load_space("resnet-v1"), Budget(200_000), SHAPE, CLASSES)
    assert points == [] and skipped == ["start point hand-made: no width of ResNet-8 fits MACs <= 200K; left out"]


def test_start_points_in_the_space_carry_their_params_and_others_none() -> None:
    space = load_space("resnet-v1")
    points, skipped = start_points((HAND_MADE, GIVEN, HAND_MADE), space, Budget(50_000_000), SHAPE, CLASSES)
    assert skipped == [] and [p.name for p in points] == [HAND_MADE, "given"]  # the repeat is dropped
    made, given = points
    assert made.params is None and made.text == ("ResNet-20 at x1.31 widths, 49.96M MACs, 455.8K params, "
                                                 "outside the search space")
    assert given.params == space.params_of(Spec.parse(GIVEN)) and given.text.endswith("in the search space")


def test_the_hand_made_network_fits_a_memory_budget_and_needs_a_bound_to_scale_to() -> None:
    budget = Budget(memory=20_000)
    spec, text = hand_made(budget, SHAPE, CLASSES)
    assert peak_activations(build(spec, SHAPE, CLASSES), SHAPE) <= 20_000
    factor = float(text.split("x")[1].split(" ")[0])
    bigger = scaled(teacher_spec("resnet20" if "20" in text else "resnet14" if "14" in text else "resnet8"), factor + 0.01)
    assert peak_activations(build(bigger, SHAPE, CLASSES), SHAPE) > 20_000
    # a measured latency bound alone, and nothing to time it with: nothing to scale it to
    assert hand_made(Budget(latency_ms=1.0), SHAPE, CLASSES) is None
    points, skipped = start_points((HAND_MADE,), load_space("resnet-v1"), Budget(latency_ms=1.0), SHAPE, CLASSES)
    assert points == [] and skipped == ["start point hand-made: the budget has no MACs, params or memory bound to "
                                        "scale it to (a measured latency bound is checked by the trials alone); left out"]


def test_under_a_measured_latency_budget_the_hand_made_network_is_scaled_by_timing_a_few_widths() -> None:
    """A user who times on their own machine sees the network they would have picked: its widths
    are bisected on the measured latency (here a stand-in that grows with MACs), in a few timings."""
    timed: list[Spec] = []

    def measured(spec: Spec) -> float:
        timed.append(spec)
        return spec_cost(spec, SHAPE, CLASSES).macs / 1e8  # 1 ms per 100M MACs

    budget = Budget(latency_ms=0.5)
    spec, text = hand_made(budget, SHAPE, CLASSES, measured=measured)
    assert text.startswith("ResNet-20 at x")
    assert measured(spec) <= 0.5
    factor = float(text.split("x")[1].split(" ")[0])
    assert measured(scaled(teacher_spec("resnet20"), round(factor + 0.01, 2))) > 0.5  # the largest that fits
    assert len(timed) <= 2 * 12  # a bisection of 300 widths (and the two checks above), not a walk
    points, skipped = start_points((HAND_MADE,), load_space("resnet"), budget, SHAPE, CLASSES, measured=measured)
    assert skipped == [] and points[0].spec == spec and points[0].params is not None  # in the ranged space


def test_a_latency_table_prices_start_points_before_any_work() -> None:
    space = load_space("resnet-v1")

    def table(spec: Spec) -> float:  # a table of the space: it cannot price a spec outside it
        if space_params(space, spec) is None:
            raise InputError(f"the latency table has no entry for a layer of {spec}")
        return 0.5
    budget = Budget(50_000_000, latency_ms=1.0)
    points, skipped = start_points((HAND_MADE, GIVEN), space, budget, SHAPE, CLASSES, latency=table)
    assert [p.spec for p in points] == [Spec.parse(GIVEN)]
    assert skipped[0].startswith("start point hand-made: the latency table has no entry for a layer of c")
    with pytest.raises(InputError, match=re.escape("--start-from c20|basic_d1_w20_s1_k3_e1: the latency table has no "
                                                   "entry")):
        start_points(("c20|basic_d1_w20_s1_k3_e1",), space, budget, SHAPE, CLASSES, latency=table)
    with pytest.raises(InputError, match=r"latency_ms 2 > 1, over the budget"):
        start_points((GIVEN,), space, budget, SHAPE, CLASSES, latency=lambda spec: 2.0)


def test_a_start_point_is_one_per_spec_and_in_the_space_only_when_it_samples_back() -> None:
    space = load_space("resnet-v1")
    made = "c20|basic_d3_w20_s1_k3_e1|basic_d3_w40_s2_k3_e1|basic_d3_w84_s2_k3_e1"
    points, _ = start_points((HAND_MADE, made), space, Budget(50_000_000), SHAPE, CLASSES)
    assert [(p.name, str(p.spec)) for p in points] == [(HAND_MADE, made)]  # the same student once
    pruned = GIVEN.replace("basic_d1_w32_s2_k3_e1", "basic_d1_w32_s2_k3_e1_m12")  # a pruned internal width
    (point,), _ = start_points((pruned,), space, Budget(50_000_000), SHAPE, CLASSES)
    assert point.params is None and point.text.endswith("outside the search space")


def test_a_given_start_point_under_the_budget_floor_is_refused() -> None:
    with pytest.raises(InputError) as e:
        start_points((GIVEN,), load_space("resnet-v1"), Budget(50_000_000), SHAPE, CLASSES, floor=0.5)
    assert str(e.value) == (f"--start-from {GIVEN}: uses 19% of the budget, under the budget floor (50%); give a "
                            "larger student or lower --budget-floor")


def test_a_start_point_is_never_pruned() -> None:
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(0, 0))
    for value in (0.9, 0.8):
        t = study.ask()
        t.report(value, 1)
        study.tell(t, value)
    study.enqueue_trial({}, user_attrs={START_ATTR: HAND_MADE})
    start, other = study.ask(), study.ask()
    for t in (start, other):
        t.report(0.1, 1)  # far below the median of the finished trials at this step
    assert START_ATTR in start.user_attrs and not may_prune(start)
    assert may_prune(other)


def test_a_start_point_the_sampler_trained_first_is_still_the_start_point() -> None:
    study = optuna.create_study(direction="maximize")
    for spec, value in ((GIVEN, 0.7), ("c8|basic_d1_w8_s2_k3_e1", 0.8)):
        study.add_trial(optuna.trial.create_trial(value=value, constraints={"macs": -0.5}, user_attrs={
            "spec": spec, "macs": 1, "params": 1, "score": value}))
    (point,), _ = start_points((GIVEN,), load_space("resnet-v1"), Budget(50_000_000), SHAPE, CLASSES)
    assert enqueue_start_points(study, [point]) == [f"start point given: {GIVEN} is already in the study"]
    assert study.user_attrs[START_POINTS_ATTR] == {GIVEN: "given"}
    assert [t.number for t in retrain_candidates(study, 0)] == [0]  # trial 0 trained it: it is the start point


@pytest.mark.parametrize(("name", "message"), [
    ("c16|basic_d9", "--start-from c16|basic_d9: bad stage 'basic_d9' in spec 'c16|basic_d9'"),
    ("resnet20", "--start-from resnet20: bad spec 'resnet20': expected 'c<stem>|<stage>|...[|h<head>]'"),
    (GIVEN, f"--start-from {GIVEN}: macs 9.346M > 5M, over the budget; give a student that fits"),
])
def test_a_bad_start_point_is_refused(name: str, message: str) -> None:
    with pytest.raises(InputError) as e:
        start_points((name,), load_space("resnet-v1"), Budget(5_000_000), SHAPE, CLASSES)
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
    args = ("--flops-budget", "12M", "--teachers", "resnet8", "--teacher-epochs", "1", "--subset", "300",
            "--trials", "3", "--trial-score", "params",
            "--final-epochs", "0", "--seed", "3", "--no-onnx", "--quiet", "--start-from", HAND_MADE,
            "--start-from", GIVEN, *AT_THE_EDGE)
    study, out = search_cli(tmp_path, e2e_run["out"] / "cache", e2e_run["data_dir"], *args)
    made = "c8|basic_d3_w8_s1_k3_e1|basic_d3_w20_s2_k3_e1|basic_d3_w40_s2_k3_e1"
    first, second = study.trials[:2]
    # the default space holds the hand-made network: a start point in the space is a trial of the
    # space, the sampler sees its params (and it is trained as given, not moved to the edge)
    space = load_space("resnet")
    assert first.user_attrs[SPEC_ATTR] == made and first.user_attrs[START_ATTR] == HAND_MADE
    assert first.params == space.params_of(Spec.parse(made))
    assert second.user_attrs[SPEC_ATTR] == GIVEN and second.user_attrs[START_ATTR] == "given"
    assert second.params == space.params_of(Spec.parse(GIVEN))
    assert first.state == second.state == optuna.trial.TrialState.COMPLETE and first.value == first.user_attrs["params"]
    assert f"start point hand-made: {made} (ResNet-20 at x0.62 widths, " in out
    assert f"trial 0 complete (hand-made start point): {made}" in out
    assert START_ATTR not in study.trials[2].user_attrs
    rows = pd.read_csv(tmp_path / "studies" / "s" / "trials.csv")
    assert list(rows["start_point"].fillna(""))[:3] == [HAND_MADE, "given", ""]
    # resumed: the study holds both start points, so neither is enqueued (nor trained) again
    points, _ = start_points((HAND_MADE, GIVEN), load_space("resnet-v1"), Budget(12_000_000), SHAPE, CLASSES)
    assert enqueue_start_points(study, points) == [f"start point hand-made: {made} is already in the study",
                                      f"start point given: {GIVEN} is already in the study"]
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 0
    # resumed after the hand-made pick changed (a rule of another version, a latency timed again): the
    # study keeps the one it has and trains no second
    other = dataclasses.replace(points[0], spec=Spec.parse("c8|basic_d2_w8_s1_k3_e1|basic_d2_w16_s2_k3_e1"))
    assert enqueue_start_points(study, [other]) == [
        f"start point hand-made: the study has {made} already (picked when it was made); {other.spec} is not added"]
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 0
    assert study.user_attrs[START_POINTS_ATTR] == {made: HAND_MADE, GIVEN: "given"}


def _family_table() -> LatencyTable:
    """A latency table by hand holding every layer of the hand-made family: a layer's time grows with
    its output size, so wider members are slower, as on a device."""
    from nas_kd.device.layers import spec_layers

    entries = {layer.key(): 0.01 + layer.cout * layer.h * layer.w * 1e-6
               for name in FAMILY_STEPS for spec in family_specs(name) for layer in spec_layers(spec, (1, 28, 28), 10)}
    entries["noop"] = 0.01
    return LatencyTable("family.json", "resnet", (1, 28, 28), 10, "fp32", entries, 0.01, {})


@pytest.mark.parametrize("budget", [Budget(latency_ms=0.3), Budget(latency_ms=1.0), Budget(memory=48_000),
                                    Budget(params=250_000, memory=48_000)])
def test_every_family_member_meets_the_budget_it_was_scaled_to(budget: Budget) -> None:
    """Each member of the hand-made family at the largest width that fits, by the same table or
    memory count the benchmark judges by; one width step more does not fit."""
    table = _family_table()
    latency = table.predict if budget.latency_ms is not None else None
    members = family(budget, (1, 28, 28), 10, latency)
    assert set(members) == set(FAMILY_STEPS)

    def facts(spec: Spec) -> Cost:
        model = build(spec, (1, 28, 28), 10, channels_last=False)
        return dataclasses.replace(count(model, (1, 28, 28)), memory=peak_activations(model, (1, 28, 28)),
                                   latency_ms=table.predict(spec))

    for name, (spec, factor) in members.items():
        assert budget.fits(facts(spec)), (name, factor)
        step, steps = FAMILY_STEPS[name]
        if factor < round(step * steps, 2):  # the widest the family goes fits: nothing wider to check
            wider = scaled(teacher_spec(name), round(factor + step, 2))
            assert wider == spec or not budget.fits(facts(wider)), (name, factor)


def test_a_latency_that_does_not_grow_with_width_is_scanned_not_bisected() -> None:
    """ResNet-20 at x0.90 (16/28/56 channels) can be priced above x1.00 (16/32/64) by a table: the
    largest factor that fits is still found, as a bisection on latency did not (x0.85)."""
    base = teacher_spec("resnet20")
    slow = {scaled(base, 0.9)}  # over the budget, between factors that fit
    over = lambda spec: spec.stages[-1].width > 64  # noqa: E731 - wider than x1.00: over
    exact = lambda spec: spec not in slow and not over(spec)  # noqa: E731
    assert scaled(base, fitting_factor(base, lambda spec: True, exact=exact)) == scaled(base, 1.0)
    checked: list[Spec] = []
    fitting_factor(base, lambda spec: True, exact=lambda spec: checked.append(spec) or exact(spec))
    assert len(checked) == len(set(checked))  # once per distinct spec
    # the bound that grows stops the scan at 16/28/56 channels, which the latency refuses: 12/28/56
    narrow = fitting_factor(base, lambda spec: spec.stages[-1].width <= 56, exact=exact)
    assert scaled(base, narrow).stem == 12 and scaled(base, narrow).stages[-1].width == 56
    assert fitting_factor(base, lambda spec: True, exact=lambda spec: False) == 0.0
