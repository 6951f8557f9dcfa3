"""One study, many budgets: the best trained trial within a new budget (`picks.pick_at_budget`),
its own folder (`python -m nas_kd.retrain --flops-budget ...`), and the report's picks along a
Pareto front (`fronts.budget_picks`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest

from nas_kd.core.errors import InputError
from nas_kd.device.latency import LatencyTable
from nas_kd.device.layers import spec_layers
from nas_kd.nas.budget import Budget
from nas_kd.nas.picks import budget_tag, pick_at_budget, stored_cost
from nas_kd.nas.records import LATENCY_ATTR, PEAK_INT8_ATTR, SCORE_ATTR, SPEC_ATTR
from nas_kd.nets.arch import Spec
from nas_kd.reporting.fronts import budget_picks, pareto_data
from tests.conftest import copy_of_e2e, load_json, run_cli
from tests.test_report import FRAME, TEACHERS

SPECS = ["c8|basic_d1_w8_s1_k3_e1", "c8|basic_d1_w16_s1_k3_e1", "c16|basic_d1_w16_s1_k3_e1",
         "c16|basic_d2_w32_s1_k3_e1", "c24|basic_d2_w32_s1_k3_e1"]
# (score, MACs, params, stored latency or None, peak int8 bytes), one row per spec above
ROWS = [(0.80, 1_000_000, 10_000, 0.10, 20_000), (0.84, 3_000_000, 20_000, None, 25_000),
        (0.86, 6_000_000, 40_000, 0.30, 30_000), (0.90, 12_000_000, 90_000, 0.60, 50_000),
        (0.91, 20_000_000, 150_000, 0.90, 60_000)]


def make_study(over: int | None = None) -> optuna.Study:
    """Five trained trials of known scores and costs (trial `over` outside the search's own budget),
    and one the search rejected (never trained)."""
    study = optuna.create_study(direction="maximize", study_name="budgets")
    for i, (spec, (score, macs, params, ms, peak)) in enumerate(zip(SPECS, ROWS)):
        attrs = {SPEC_ATTR: spec, SCORE_ATTR: score, "macs": macs, "params": params, PEAK_INT8_ATTR: peak}
        if ms is not None:
            attrs[LATENCY_ATTR] = ms
        study.add_trial(optuna.trial.create_trial(value=score, user_attrs=attrs,
                                                  constraints={"macs": 0.5 if i == over else -0.5}))
    study.add_trial(optuna.trial.create_trial(value=0.0, user_attrs={SPEC_ATTR: "c24|basic_d3_w64_s1_k3_e1",
                                                                     "macs": 90_000_000, "params": 1},
                                              constraints={"macs": 1.0}))
    return study


@pytest.mark.parametrize("budget, trial, fitting", [
    (Budget(macs=20_000_000), 4, 5), (Budget(macs=12_000_000), 3, 4), (Budget(macs=11_999_999), 2, 3),
    (Budget(params=40_000), 2, 3), (Budget(macs=20_000_000, params=89_999), 2, 3),
    (Budget(memory=50_000), 3, 4), (Budget(memory=29_999), 1, 2)])
def test_the_pick_is_the_best_trained_trial_within_the_budget(budget: Budget, trial: int, fitting: int) -> None:
    picked, cost, n = pick_at_budget(make_study(), budget)
    assert (picked.number, n) == (trial, fitting)
    assert cost == stored_cost(picked)


def test_a_trial_outside_the_searchs_own_budget_is_never_picked() -> None:
    picked, _, n = pick_at_budget(make_study(over=4), Budget(macs=50_000_000))
    assert (picked.number, n) == (3, 4)


def test_a_budget_no_trial_meets_is_refused_naming_the_cheapest() -> None:
    with pytest.raises(InputError) as e:
        pick_at_budget(make_study(), Budget(macs=500_000))
    assert str(e.value) == ("no trained trial of study 'budgets' meets MACs <= 500K: the cheapest is trial 0 "
                            "(c8|basic_d1_w8_s1_k3_e1, 1M MACs, 10K params, 0.1 ms, 20KB peak int8); raise the budget")


def small_table() -> LatencyTable:
    """A latency table by hand: every layer of the specs above at 0.1 ms, the per-call overhead 0.02 ms,
    so a spec's latency is 0.08 ms a layer plus 0.02."""
    entries = {layer.key(): 0.1 for spec in SPECS for layer in spec_layers(Spec.parse(spec), (1, 28, 28), 10)}
    entries["noop"] = 0.02
    return LatencyTable("hand.json", "resnet", (1, 28, 28), 10, "fp32", entries, 0.02, {})


def test_the_latency_variant_prices_what_a_trial_did_not_record_with_a_table() -> None:
    table = small_table()

    def price(trial: optuna.trial.FrozenTrial):
        cost = stored_cost(trial)
        return cost if cost.latency_ms is not None else dataclasses.replace(
            cost, latency_ms=table.predict(Spec.parse(trial.user_attrs[SPEC_ATTR])))

    # trial 1 stored no latency; the table gives its 4 layers (stem, block, classifier... ) 0.08 each + 0.02
    layers = len(spec_layers(Spec.parse(SPECS[1]), (1, 28, 28), 10))
    assert price(make_study().trials[1]).latency_ms == pytest.approx(0.08 * layers + 0.02)
    picked, cost, n = pick_at_budget(make_study(), Budget(latency_ms=0.3), price)
    assert (picked.number, n, cost.latency_ms) == (2, 3, 0.30)
    picked, _, _ = pick_at_budget(make_study(), Budget(latency_ms=0.29), price)
    assert picked.number == 1  # priced by the table: 0.26 ms
    with pytest.raises(InputError, match="meets latency <= 0.05 ms: the cheapest is trial 0"):
        pick_at_budget(make_study(), Budget(latency_ms=0.05), price)


def test_budget_tags_name_the_folder() -> None:
    assert budget_tag(Budget(macs=20_000_000)) == "macs20M"
    assert budget_tag(Budget(params=200_000, memory=48_000)) == "params200K-mem48KB"
    assert budget_tag(Budget(latency_ms=1.5)) == "lat1.5ms"


def test_the_picks_along_a_front_are_its_points_at_spread_budgets() -> None:
    data = pareto_data(FRAME, "macs", None, TEACHERS)
    picks = budget_picks(data, 3)
    front = sorted(zip(data.front.x, data.front.number))
    assert [p["trial"] for p in picks] == [front[0][1], front[len(front) // 2][1], front[-1][1]][:len(picks)]
    assert [p["budget"] for p in picks] == sorted(p["budget"] for p in picks)
    assert all(p["flag"] == "--flops-budget" for p in picks)
    assert budget_picks(data, 1) == picks[:1]


def test_retrain_at_a_new_budget_into_its_own_folder(e2e_run: dict, tmp_path: Path) -> None:
    """The e2e study's cheapest trained trial, retrained at its own MACs: a folder apart from the
    winner's, one line naming the pick, and the study keeps it beside the winner."""
    e2e_run = copy_of_e2e(e2e_run, tmp_path)  # the retrain adds to the study
    study = optuna.load_study(study_name="e2e", storage=e2e_run["url"])
    trained = [t for t in study.trials if SCORE_ATTR in t.user_attrs and t.state.name == "COMPLETE"]
    cheapest = min(trained, key=lambda t: t.user_attrs["macs"])
    macs = cheapest.user_attrs["macs"]
    winner_before = (e2e_run["study_dir"] / "winner" / "metrics.json").read_text()
    result = run_cli("nas_kd.retrain", "--study-name", "e2e", "--storage", e2e_run["url"], "--flops-budget", str(macs),
                     "--final-epochs", "1", "--no-onnx", "--quiet", cwd=e2e_run["work"])
    assert result.returncode == 0, result.stderr[-2000:]
    tag = budget_tag(Budget(macs=macs))
    assert f"MACs <= {tag[4:]}: trial {cheapest.number} ({cheapest.user_attrs[SPEC_ATTR]};" in result.stderr
    assert "the best of 1 trained trials that meet it" in result.stderr
    metrics = load_json(e2e_run["study_dir"] / f"winner-{tag}" / "metrics.json")
    assert metrics["trial"] == cheapest.number and metrics["macs"] <= macs
    assert (e2e_run["study_dir"] / "winner" / "metrics.json").read_text() == winner_before
    stored = optuna.load_study(study_name="e2e", storage=e2e_run["url"]).user_attrs
    assert stored["winners_at_budgets"][tag]["test_acc"] == metrics["test_acc"]
    assert stored["winner"]["trial"] == load_json(e2e_run["study_dir"] / "winner" / "metrics.json")["trial"]

    refused = run_cli("nas_kd.retrain", "--study-name", "e2e", "--storage", e2e_run["url"], "--flops-budget", "1K",
                      cwd=e2e_run["work"])
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("error: no trained trial of study 'e2e' meets MACs <= 1K: the cheapest is trial ")
    bad = run_cli("nas_kd.retrain", "--study-name", "e2e", "--storage", e2e_run["url"], "--flops-budget", "12M",
                  "--trial", "0", cwd=e2e_run["work"])
    assert bad.returncode == 2 and "picks its own trial; it does not go with --trial" in bad.stderr
