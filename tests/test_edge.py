"""The budget's edge: the repair that scales a sampled shape to its budget, the space that holds
the hand-made family, a search whose every trained trial sits at the edge, and studies of before
the edge."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from nas_kd.core.config import SearchConfig
from nas_kd.core.errors import InputError
from nas_kd.device.latency import LatencyTable
from nas_kd.device.memory import peak_activations
from nas_kd.nas import start
from nas_kd.nas.budget import Budget
from nas_kd.nas.edge import EDGE_SHARE, MIN_WIDTH_RULE, allowed, capped, repair, scaled, widened
from nas_kd.nas.records import AT_LARGEST_ATTR, EDGE_FACTOR_ATTR, SHAPE_ATTR, SPEC_ATTR, USE_ATTR, was_trained
from nas_kd.nas.study import STUDY_ATTR, guarded, open_storage, open_study
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.cost import Cost, count
from nas_kd.nets.space import SHAPE_STEM, STAGE_RATIOS, STAGE_RATIOS_FIRST, load_space
from nas_kd.pipeline.checks import validate
from nas_kd.pipeline.phases import edge_cap
from tests.conftest import AT_THE_EDGE, search_cli

INPUT, CLASSES = (1, 28, 28), 10
TABLE = Path(__file__).parents[1] / "benchmarks" / "results" / "device_budgets_table.json"


def fake_latency(spec: Spec) -> float:
    """A latency that grows with width and depth as a table's does: ms per MAC, plus per block."""
    macs = count(build(spec, INPUT, CLASSES, channels_last=False), INPUT).macs
    return 0.05 + macs / 5e7 + 0.01 * sum(s.depth for s in spec.stages)


def pricer(budget: Budget):
    def price(spec: Spec) -> Cost:
        model = build(spec, INPUT, CLASSES, channels_last=False)
        cost = count(model, INPUT)
        return Cost(cost.macs, cost.params,
                    fake_latency(spec) if budget.latency_ms is not None else None,
                    peak_activations(model, INPUT) if budget.memory is not None else None)
    return price


@pytest.mark.parametrize("budget", [Budget(macs=5_000_000), Budget(params=60_000), Budget(latency_ms=0.3),
                                    Budget(params=80_000, memory=30_000), Budget(macs=20_000_000, params=80_000)],
                         ids=["macs", "params", "latency", "memory+params", "macs+params"])
def test_the_repair_puts_every_shape_at_the_edge(budget: Budget) -> None:
    space = load_space("resnet")
    price = pricer(budget)
    for shape in space.random_specs(2, seed=11):
        fixed = repair(shape, space, budget, price)
        assert budget.fits(fixed.cost), (shape, fixed)
        assert fixed.cost == price(fixed.spec)
        # at the edge, or as wide as the space allows
        assert fixed.share >= EDGE_SHARE or fixed.at_largest, (shape, fixed)
        # the shape is kept: blocks, depths, kernels, expansions and SE as drawn
        assert [(s.block, s.depth, s.kernel, s.expand, s.se) for s in fixed.spec.stages] == \
               [(s.block, s.depth, s.kernel, s.expand, s.se) for s in shape.stages]
        # a spec of the space, widths on its grid
        space.params_of(fixed.spec)
        assert repair(shape, space, budget, price) == fixed  # the same shape and budget: the same spec


def test_with_a_minimum_width_a_narrow_stage_gives_up_depth() -> None:
    budget = Budget(macs=5_000_000)
    space, price, least = load_space("resnet"), pricer(budget), 1
    deep = Spec.parse("c32|basic_d2_w16_s1_k3_e1|basic_d5_w32_s2_k3_e1|basic_d5_w64_s2_k5_e1_se")
    for shape in [deep, *space.random_specs(1, seed=5)]:
        fixed = repair(shape, space, budget, price, min_width=16)
        assert budget.fits(fixed.cost) and (fixed.share >= EDGE_SHARE or fixed.at_largest), (shape, fixed)
        # blocks, kernels, expansions and SE as drawn; depths at most as drawn, the blocks given up counted
        assert [(s.block, s.kernel, s.expand, s.se) for s in fixed.spec.stages] == \
               [(s.block, s.kernel, s.expand, s.se) for s in shape.stages]
        assert all(s.depth <= d.depth for s, d in zip(fixed.spec.stages, shape.stages))
        assert sum(d.depth - s.depth for s, d in zip(fixed.spec.stages, shape.stages)) == fixed.depth_given > 0
        # no width (the stem's included) under the minimum, or every stage at the space's least depth
        assert min(fixed.spec.stem, *(s.width for s in fixed.spec.stages)) >= 16 or \
            all(s.depth == least for s in fixed.spec.stages), fixed.spec
        space.params_of(fixed.spec)
    # the deep shape: its first stages come out 4-8 channels wide without it; the same spec every time
    plain = repair(deep, space, budget, price)
    assert min(s.width for s in plain.spec.stages) < 16 and plain.depth_given == 0
    assert repair(deep, space, budget, price, min_width=0) == plain
    fixed = repair(deep, space, budget, price, min_width=16)
    assert repair(deep, space, budget, price, min_width=16) == fixed
    # the blocks given up widened a stage that had given them
    assert any(s.width > p.width and s.depth < p.depth for s, p in zip(fixed.spec.stages, plain.spec.stages))


def test_a_narrow_stage_already_shallowest_widens_through_the_deepest() -> None:
    # the 5M search's pick of seed 1 (BENCHMARKS.md): its narrow stem and first stage cannot give up a
    # block, so the deep stages after them do, and every width widens
    budget = Budget(macs=5_000_000)
    space, price = load_space("resnet"), pricer(budget)
    shape = Spec.parse("c32|basic_d1_w64_s1_k3_e1|bottleneck_d4_w192_s2_k5_e2|bottleneck_d5_w384_s2_k3_e4_se")
    plain = repair(shape, space, budget, price)
    assert plain.spec.stem < 16 and plain.spec.stages[0].depth == 1
    fixed = repair(shape, space, budget, price, min_width=16)
    assert fixed.depth_given > 0 and fixed.spec.stages[0].depth == 1
    assert fixed.spec.stem > plain.spec.stem and fixed.spec.stages[0].width > plain.spec.stages[0].width
    assert sum(s.depth for s in fixed.spec.stages) == sum(s.depth for s in shape.stages) - fixed.depth_given
    assert budget.fits(fixed.cost) and (fixed.share >= EDGE_SHARE or fixed.at_largest)


def test_a_minimum_above_what_the_space_allows_is_met_at_its_greatest_width() -> None:
    # resnet-v1's stem is 16 or 24 channels: a minimum of 32 cannot widen it, so a shape whose stages
    # all reach 32 keeps its depths (the stem at 24) instead of giving up every block for nothing
    budget = Budget(macs=50_000_000)
    space, price = load_space("resnet-v1"), pricer(budget)
    shape = Spec.parse("c24|bottleneck_d1_w32_s1_k3_e4|basic_d3_w48_s2_k3_e1_se|basic_d3_w128_s2_k3_e1_se")
    assert allowed(space)[0][-1] == 24
    fixed = repair(shape, space, budget, price, min_width=32)
    assert fixed == repair(shape, space, budget, price) and fixed.depth_given == 0
    assert fixed.spec.stem == 24 and min(s.width for s in fixed.spec.stages) >= 32
    assert [s.depth for s in fixed.spec.stages] == [1, 3, 3] and fixed.share >= EDGE_SHARE


def test_the_minimum_width_is_guarded_and_a_bad_one_is_one_line(capsys, tmp_path: Path, monkeypatch) -> None:
    from nas_kd import search

    space = load_space("resnet")
    assert "edge_min_width" not in guarded(SearchConfig(flops_budget=5_000_000), "resnet", space.fingerprint())
    assert "edge_min_width_rule" not in guarded(SearchConfig(flops_budget=5_000_000), "resnet")
    assert "edge_min_width_rule" not in guarded(  # no repair, no rule: the study keeps its name
        SearchConfig(flops_budget=5_000_000, edge_min_width=16, budget_edge="off"), "resnet")
    made = guarded(SearchConfig(flops_budget=5_000_000, edge_min_width=16), "resnet", space.fingerprint())
    assert made["edge_min_width"] == 16 and made["edge_min_width_rule"] == MIN_WIDTH_RULE
    # a study made with a minimum width under the first rule (no rule recorded) is refused, not resumed
    storage = open_storage(f"sqlite:///{tmp_path / 'old.db'}", heartbeat=False)
    before = {k: v for k, v in made.items() if k != "edge_min_width_rule"}
    optuna.create_study(storage=storage, study_name="w16", direction="maximize").set_user_attr(
        STUDY_ATTR, {"guarded": before})
    with pytest.raises(InputError, match=f"made under version 1 or 2 of --edge-min-width's rule, this run has "
                                         f"version {MIN_WIDTH_RULE}: its trials would not match; use another "
                                         "--study-name"):
        open_study(storage, "w16", False, 0, made)
    open_study(storage, "now", False, 0, made)
    assert open_study(storage, "now", False, 0, made).study_name == "now"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as bad:
        search.main(["--flops-budget", "5M", "--edge-min-width", "-4"])
    assert bad.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "--edge-min-width" in lines[-1] and "Traceback" not in "".join(lines)
    for value, line in (("2.5", "edge_min_width: expected int, got 2.5"),
                        ("-8", "edge_min_width must be a whole number of channels >= 0 (0: off), got -8")):
        (tmp_path / "c.yaml").write_text(f"flops_budget: 5000000\nedge_min_width: {value}\n")
        assert search.main(["--config", "c.yaml"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(line)
    assert not (tmp_path / "studies").exists()


def test_a_shape_that_cannot_reach_the_budget_stays_at_the_spaces_greatest_widths() -> None:
    space = load_space("resnet")
    shape = Spec.parse("c8|basic_d1_w8_s1_k3_e1|basic_d1_w8_s2_k3_e1|basic_d1_w8_s2_k3_e1")
    fixed = repair(shape, space, Budget(macs=10_000_000_000), pricer(Budget(macs=1)))
    assert fixed.at_largest and fixed.share < EDGE_SHARE
    assert fixed.spec == scaled(shape, 100.0, allowed(space))  # every width at its greatest
    assert [fixed.spec.stem, *(s.width for s in fixed.spec.stages)] == [128, 128, 256, 512]


def test_in_a_space_of_listed_widths_the_repair_keeps_to_them() -> None:
    """resnet-v1 lists three widths a stage: a repaired student is a spec of the space (so a latency
    table of the space prices it), as close to the edge as those widths allow."""
    space = load_space("resnet-v1")
    budget = Budget(macs=20_000_000)
    for shape in space.random_specs(3, seed=5):
        fixed = repair(shape, space, budget, pricer(budget))
        space.params_of(fixed.spec)  # raises for a width the space does not list
        assert budget.fits(fixed.cost)
        assert all(not budget.fits(pricer(budget)(r)) for r in widened(fixed.spec, allowed(space)))


def test_a_shape_no_width_of_which_fits_is_left_to_the_budget_check() -> None:
    space = load_space("resnet")
    shape = space.random_specs(1, seed=2)[0]
    fixed = repair(shape, space, Budget(macs=1_000), pricer(Budget(macs=1)))
    assert not Budget(macs=1_000).fits(fixed.cost) and not fixed.at_largest


def hand_made_budgets() -> dict[str, tuple[Budget, object]]:
    """5M and 50M MACs, and the two latency budgets of the committed table (benchmarks/device_budgets)."""
    table = LatencyTable.load(TABLE, load_space("resnet-v1"), INPUT, CLASSES, "fp32")
    budgets: dict[str, tuple[Budget, object]] = {"5M": (Budget(macs=5_000_000), None),
                                                 "50M": (Budget(macs=50_000_000), None)}
    for name, factor in (("latency-half", 0.5), ("latency-full", 1.0)):
        ms = table.predict(start.scaled(start.teacher_spec("resnet20"), factor))
        budgets[name] = (Budget(latency_ms=round(ms, 3)), table.predict)
    return budgets


@pytest.mark.parametrize("name", ["5M", "50M", "latency-half", "latency-full"])
def test_the_hand_made_pick_is_a_student_of_the_space(name: str) -> None:
    budget, latency = hand_made_budgets()[name]
    found = start.hand_made(budget, INPUT, CLASSES, latency)
    assert found is not None
    spec = found[0]
    space = load_space("resnet")
    params = space.params_of(spec)
    assert space.sample(optuna.trial.FixedTrial(params)) == spec  # its Optuna params give it back
    assert start.space_params(space, spec) == params  # so --start-from hand-made enqueues it with them


@pytest.mark.parametrize(("depths", "widths"), [((1, 1, 1), (16, 32, 64)), ((2, 2, 2), (16, 32, 64)),
                                                ((3, 3, 3), (16, 32, 64)), ((5, 5, 5), (16, 32, 64)),
                                                ((3, 3, 3), (20, 40, 84)), ((3, 3, 3), (128, 256, 512))])
def test_the_space_holds_resnets_of_every_depth_to_its_greatest_width(depths, widths) -> None:
    spec = Spec(widths[0], tuple(start.teacher_spec("resnet20").stages[i].__class__(
        "basic", depths[i], widths[i], 1 if i == 0 else 2) for i in range(3)))
    load_space("resnet").params_of(spec)


def test_a_study_of_before_the_edge_resumes_only_as_it_was_made(tmp_path: Path) -> None:
    """A study made before the edge (no budget_edge, no space fingerprint recorded, space "resnet")
    was made with today's resnet-v1 and without the edge: it resumes with exactly those, and a
    run at the edge is refused in one line."""
    storage = open_storage(f"sqlite:///{tmp_path / 'old.db'}", heartbeat=False)
    cfg = SearchConfig(flops_budget=5_000_000)
    old = guarded(cfg, "resnet")
    del old["budget_edge"], old["edge_depth"]
    study = optuna.create_study(storage=storage, study_name="old", direction="maximize")
    study.set_user_attr(STUDY_ATTR, {"guarded": old})
    with pytest.raises(InputError, match="created with search_space='resnet-v1', this run has search_space='resnet'"):
        open_study(storage, "old", False, 0, guarded(cfg, "resnet", load_space("resnet").fingerprint()))
    at_edge = guarded(SearchConfig(flops_budget=5_000_000, search_space="resnet-v1"), "resnet-v1",
                      load_space("resnet-v1").fingerprint())
    with pytest.raises(InputError, match="created with budget_edge='off', this run has budget_edge='on'"):
        open_study(storage, "old", False, 0, at_edge)
    off = guarded(SearchConfig(flops_budget=5_000_000, search_space="resnet-v1", budget_edge="off"), "resnet-v1",
                  load_space("resnet-v1").fingerprint())
    assert open_study(storage, "old", False, 0, off).study_name == "old"
    # a study at the edge made before the family's depth cap resumes only with --edge-depth free
    space = load_space("resnet")
    edge_before = guarded(cfg, "resnet", space.fingerprint())
    del edge_before["edge_depth"]
    optuna.create_study(storage=storage, study_name="edge", direction="maximize").set_user_attr(
        STUDY_ATTR, {"guarded": edge_before})
    with pytest.raises(InputError, match="created with edge_depth='free', this run has edge_depth='family'"):
        open_study(storage, "edge", False, 0, guarded(cfg, "resnet", space.fingerprint()))
    free = guarded(SearchConfig(flops_budget=5_000_000, edge_depth="free"), "resnet", space.fingerprint())
    assert open_study(storage, "edge", False, 0, free).study_name == "edge"
    # a study made now records its space's choices: a space file changed since is refused
    new = guarded(cfg, "/x/space.yaml", "aaaaaaaaaaaa")
    open_study(storage, "new", False, 0, new)
    with pytest.raises(InputError, match="created with another '/x/space.yaml' space"):
        open_study(storage, "new", False, 0, {**new, "space_fingerprint": "bbbbbbbbbbbb"})


def test_the_single_width_raises_keep_the_shapes_proportions() -> None:
    space, budget = load_space("resnet"), Budget(macs=50_000_000)
    # raised by the budget alone, the first stage of this shape went from 24 to 32 channels, past the
    # second (24): the full-resolution widths buy the most MACs a raise
    shape = Spec.parse("c32|basic_d1_w24_s1_k3_e1|basic_d5_w28_s2_k5_e1_se|basic_d4_w44_s2_k3_e1")
    fixed = repair(shape, space, budget, pricer(budget))
    assert fixed.share >= EDGE_SHARE
    widths = [fixed.spec.stem, *(s.width for s in fixed.spec.stages)]
    drawn = [shape.stem, *(s.width for s in shape.stages)]
    assert widths[1] <= widths[2] <= widths[3]  # the stages' order of widths is the shape's
    scales = [w / d for w, d in zip(widths, drawn)]
    assert max(scales) - min(scales) <= 0.35, scales  # within a few raises of one factor
    # the hand-made ResNet-20's proportions repair to the hand-made network of the budget
    resnet20 = Spec.parse("c32|basic_d3_w32_s1_k3_e1|basic_d3_w64_s2_k3_e1|basic_d3_w128_s2_k3_e1")
    assert repair(resnet20, space, budget, pricer(budget)).spec == start.hand_made(budget, INPUT, CLASSES)[0]


def test_at_the_edge_a_ranged_space_asks_the_widths_proportions() -> None:
    space = load_space("resnet")
    params = {"s0_block": "basic", "s0_depth": 3, "s0_ratio": 0.75, "s1_block": "basic", "s1_depth": 3,
              "s1_ratio": 2.5, "s1_kernel": 3, "s1_se": False, "s2_block": "bottleneck", "s2_depth": 2,
              "s2_ratio": 1.75, "s2_kernel": 5, "s2_expand": 4, "s2_se": True}
    shape = space.sample(optuna.trial.FixedTrial(params), shape=True)
    # 32 x 0.75 = 24, x 2.5 = 60, x 1.75 = 105 -> 104 on the grid of 4 (from the unrounded product)
    assert str(shape) == "c32|basic_d3_w24_s1_k3_e1|basic_d3_w60_s2_k3_e1|bottleneck_d2_w104_s2_k5_e4_se"
    assert 1.0 in STAGE_RATIOS_FIRST and 2.0 in STAGE_RATIOS  # the ResNet's proportions are shapes
    # proportions far out are kept to the space's ranges, not built past them
    wide = space.sample(optuna.trial.FixedTrial({**params, "s0_ratio": 2.0, "s1_ratio": 3.0, "s2_ratio": 3.0}),
                        shape=True)
    assert [s.width for s in wide.stages] == [64, 192, 512]
    # a space of listed widths has no grid for proportions: its widths are asked, at the edge too
    listed = load_space("resnet-v1")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    listed.sample(trial, shape=True)
    assert "s0_width" in trial.params and not any("ratio" in k for k in trial.params)


def test_a_search_trains_only_students_at_the_edge(e2e_run: dict, tmp_path: Path) -> None:
    study, out = search_cli(tmp_path, e2e_run["out"] / "cache", e2e_run["data_dir"], *AT_THE_EDGE, "--flops-budget", "5M",
                            "--teachers", "resnet8", "--trials", "3", "--trial-epochs", "1", "--subset", "200",
                            "--final-epochs", "0", "--seed", "4", "--quiet", name="edge")
    trained = [t for t in study.trials if was_trained(t)]
    assert len(trained) >= 3
    for t in trained:
        assert 0.95 * 5_000_000 <= t.user_attrs["macs"] <= 5_000_000, (t.number, t.user_attrs["macs"])
        assert t.user_attrs[USE_ATTR] >= 0.95
        shape, spec = Spec.parse(t.user_attrs[SHAPE_ATTR]), Spec.parse(t.user_attrs[SPEC_ATTR])
        # the depths drawn, capped by the family (the default --edge-depth: 2 blocks a stage at 5M)
        assert [s.depth for s in capped(shape, load_space("resnet"), 2).stages] == [s.depth for s in spec.stages]
        assert max(s.depth for s in spec.stages) <= 2
        assert t.user_attrs[EDGE_FACTOR_ATTR] > 0 and AT_LARGEST_ATTR not in t.user_attrs
        # Optuna modelled the widths' proportions, not the widths
        assert {"s0_ratio", "s1_ratio", "s2_ratio"} <= set(t.params) and not any("width" in k for k in t.params)
        assert shape.stem == SHAPE_STEM and shape.stages[0].width == round(SHAPE_STEM * t.params["s0_ratio"])
    recorded = json.loads(json.dumps(study.user_attrs[STUDY_ATTR]["guarded"]))
    assert recorded["budget_edge"] == "on" and recorded["edge_depth"] == "family"


def test_the_floor_is_refused_at_the_edge(capsys, tmp_path: Path, monkeypatch) -> None:
    from nas_kd import search

    monkeypatch.chdir(tmp_path)
    assert search.main(["--flops-budget", "5M", "--budget-floor", "0.5"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--budget-floor 0.5 applies only with --budget-edge off" in lines[0]


def test_the_family_caps_depth_by_what_the_budget_affords() -> None:
    # the hand-made pick's depth: ResNet-14 at 5M (x0.46), ResNet-8 at 2M; ResNet-20 at 50M: no cap
    assert start.depth_cap(Budget(macs=5_000_000), INPUT, CLASSES) == 2
    assert start.depth_cap(Budget(macs=50_000_000), INPUT, CLASSES) == 0
    assert start.depth_cap(Budget(macs=2_000_000), INPUT, CLASSES) == 1
    assert start.depth_cap(Budget(latency_ms=1.0), INPUT, CLASSES) == 0  # nothing to scale the family to
    # the cap is the hand-made pick's depth, so a latency table need price only the ResNets (not
    # MobileNetV2); one that cannot price them is an InputError, which the run reports as no cap
    def resnets_only(spec: Spec) -> float:
        if any(s.block != "basic" for s in spec.stages):
            raise InputError("the table has no layer for it")
        return fake_latency(spec)

    at_half = Budget(latency_ms=round(fake_latency(start.scaled(start.teacher_spec("resnet20"), 0.4)), 4))
    assert start.depth_cap(at_half, INPUT, CLASSES, resnets_only) == 2  # ResNet-14 at x0.62
    assert start.hand_made(at_half, INPUT, CLASSES, resnets_only)[1] == "ResNet-14 at x0.62 widths"
    with pytest.raises(InputError):
        start.depth_cap(at_half, INPUT, CLASSES, lambda spec: resnets_only(Spec.parse("c8|bottleneck_d1_w8_s1_k3_e2")))


def test_capped_depths_keep_every_depth_under_the_cap_about_as_likely() -> None:
    space = load_space("resnet")  # depths 1-5 a stage
    shape = Spec.parse("c32|basic_d1_w16_s1_k3_e1|basic_d3_w32_s2_k3_e1|basic_d5_w64_s2_k3_e1")
    assert [s.depth for s in capped(shape, space, 2).stages] == [1, 1, 2]
    assert [s.depth for s in capped(shape, space, 3).stages] == [1, 2, 3]
    assert capped(shape, space, 5) == shape
    for cap in (1, 2, 3, 4):
        drawn = [capped(Spec.parse(f"c32|basic_d{d}_w16_s1_k3_e1|basic_d1_w32_s2_k3_e1|basic_d1_w64_s2_k3_e1"),
                        space, cap).stages[0].depth for d in range(1, 6)]
        assert sorted(set(drawn)) == list(range(1, cap + 1)) and drawn == sorted(drawn)
        assert max(drawn.count(d) for d in set(drawn)) - min(drawn.count(d) for d in set(drawn)) <= 1


def test_a_trial_at_the_edge_with_the_family_cap_trains_no_deeper_stage(mini_dataset) -> None:
    from types import SimpleNamespace

    from nas_kd.core.config import DistillConfig, TrainConfig
    from nas_kd.nas.objective import TrialRecipe, at_edge

    budget, space = Budget(macs=5_000_000), load_space("resnet")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for cap in (2, 0):
        recipe = TrialRecipe(DistillConfig(), TrainConfig(), 1, edge_depth=cap)
        ctx = SimpleNamespace(dataset=mini_dataset, budget=budget, latency=None, space=space, recipe=recipe)
        depths = []
        for _ in range(6):
            trial = study.ask()
            shape = space.sample(trial, shape=True)
            spec, _ = at_edge(ctx, trial, shape)
            assert trial.user_attrs[SHAPE_ATTR] == str(shape)  # Optuna models the shape drawn
            depths += [s.depth for s in spec.stages]
            study.tell(trial, 0.0)
        assert (max(depths) <= 2) if cap else (max(depths) > 2), depths


def test_the_depth_setting_is_guarded_and_a_bad_one_is_one_line(capsys, tmp_path: Path, monkeypatch) -> None:
    from nas_kd import search

    # always recorded: a study made before the cap (read as "free") resumes only with --edge-depth free
    assert guarded(SearchConfig(flops_budget=5_000_000), "resnet")["edge_depth"] == "family"
    # free, as before the cap, is not recorded: a study of before it keeps its default name
    assert "edge_depth" not in guarded(SearchConfig(flops_budget=5_000_000, edge_depth="free"), "resnet")
    assert "edge_depth" not in guarded(SearchConfig(flops_budget=5_000_000, budget_edge="off"), "resnet")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("flops_budget: 5000000\nedge_depth: shallow\n")
    assert search.main(["--config", "c.yaml"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "edge_depth must be free, family or a whole number of blocks >= 1, got 'shallow'")
    for value in ("deep", "0", "-2", "2.5"):
        with pytest.raises(SystemExit) as bad:
            search.main(["--flops-budget", "5M", "--edge-depth", value])
        assert bad.value.code == 2 and "--edge-depth" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("flops_budget: 5000000\nedge_depth: 3\n")  # a number, not a string
    assert search.main(["--config", "c.yaml"]) == 2
    assert "edge_depth" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "studies").exists()
    # from the Python API a number must be a string too, or it is refused before any work
    with pytest.raises(InputError, match="edge_depth must be free, family or a whole number of blocks >= 1, got 3"):
        validate(SearchConfig(flops_budget=5_000_000, edge_depth=3))
    # a given cap is recorded as given: a study made with one resumes only with it
    assert guarded(SearchConfig(flops_budget=50_000_000, edge_depth="3"), "resnet")["edge_depth"] == "3"


def test_the_cap_a_run_uses_is_given_priced_or_none() -> None:
    lines: list[str] = []
    five, fifty = Budget(macs=5_000_000), Budget(macs=50_000_000)
    cfg = SearchConfig(flops_budget=50_000_000)
    assert edge_cap(cfg, fifty, INPUT, CLASSES, None, lines.append) == 0  # the family's: ResNet-20, no cap
    assert edge_cap(cfg, five, INPUT, CLASSES, None, lines.append) == 2
    assert edge_cap(SearchConfig(edge_depth="3"), fifty, INPUT, CLASSES, None, lines.append) == 3
    assert edge_cap(SearchConfig(edge_depth="3", budget_edge="off"), fifty, INPUT, CLASSES, None, lines.append) == 0
    assert edge_cap(SearchConfig(edge_depth="free"), five, INPUT, CLASSES, None, lines.append) == 0
    assert lines == [
        "depths drawn at the edge: as the space allows (--edge-depth family: the depth of the hand-made ResNet, the "
        "deepest at x0.45 widths or more at this budget)",
        "depths drawn at the edge: at most 2 blocks a stage (--edge-depth family: the depth of the hand-made ResNet, "
        "the deepest at x0.45 widths or more at this budget)",
        "depths drawn at the edge: at most 3 blocks a stage (--edge-depth 3)"]
