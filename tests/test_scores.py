"""Trial scores: BatchNorm recalibration, the training-free proxies, every registered score
through a real trial, repeated specs, and the pruners' decisions on known intermediate values."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import optuna
import pytest
import torch
import torch.nn as nn

from nas_kd.core.config import SearchConfig, TrainConfig
from nas_kd.core.errors import InputError
from nas_kd.data.batches import BatchIterator, eval_batches, seeded_subset
from nas_kd.distill.blockwise import BlockwiseScorer
from nas_kd.distill.losses import recipe_features
from nas_kd.nas.objective import TRIAL_SCORES, report_steps, run_trial, trial_context, trial_score_named
from nas_kd.nas.proxies import naswot, synflow
from nas_kd.nas.records import CURVE_ATTR, REPEAT_ATTR, SCORE_ATTR, SCORE_KIND_ATTR, was_trained
from nas_kd.nas.study import PRUNERS, default_study_name, guarded, make_pruner, open_storage, open_study, run
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.cost import count
from nas_kd.nets.space import load_space
from nas_kd.nets.weights import load_state
from nas_kd.nets.zoo import teacher_spec
from nas_kd.pipeline.checks import trial_text
from nas_kd.pipeline.phases import budget_of, trial_recipe
from nas_kd.teaching.cache import SHIPPED_TEACHERS, Teacher
from nas_kd.teaching.ensemble import CachedTargets, Ensemble
from nas_kd.training.train import evaluate, recalibrate_bn, recalibrated
from tests.conftest import run_cli, search_cli

# ---------------------------------------------------------------- BatchNorm recalibration


def test_recalibration_equals_the_statistics_of_the_calibration_batches() -> None:
    """Each BatchNorm's running mean is the mean of its per-batch means over the calibration
    batches, its running variance the mean of its per-batch unbiased variances, whatever the
    running statistics were before."""
    torch.manual_seed(0)
    model = build(Spec.parse("c8|basic_d1_w8_s1_k3_e1|bottleneck_d1_w16_s2_k3_e2_se"), (1, 12, 12), 10,
                  channels_last=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(7.0)
            m.running_var.fill_(0.01)
    batches = [torch.randn(16, 1, 12, 12) * 2 + 1 for _ in range(3)]
    # what each BatchNorm sees: its input in a training-mode pass (batch statistics), captured directly
    seen: dict[nn.Module, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.setdefault(mod, []).append(args[0].detach()))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    assert recalibrate_bn(model, batches) == len(seen) >= 6
    assert not model.training
    for m, inputs in seen.items():
        means = torch.stack([x.mean((0, 2, 3)) for x in inputs])
        variances = torch.stack([x.var((0, 2, 3), unbiased=True) for x in inputs])
        torch.testing.assert_close(m.running_mean, means.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var, variances.mean(0), rtol=1e-5, atol=1e-6)
        assert m.momentum == 0.1  # restored
        assert int(m.num_batches_tracked) == len(batches)


def test_recalibration_recovers_a_network_with_corrupted_statistics(mini_dataset) -> None:
    """The shipped ResNet-20, its running statistics destroyed, is back to its accuracy after
    recalibration on a few training batches."""
    model = build(teacher_spec("resnet20"), mini_dataset.input_shape, mini_dataset.num_classes)
    model.load_state_dict(load_state(SHIPPED_TEACHERS / "resnet20-fashion-mnist.safetensors"))
    split = mini_dataset.test  # 200 images the shipped teacher was never tuned on
    before = evaluate(model, split, mini_dataset)
    assert before > 0.85
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.add_(3.0)
            m.running_var.mul_(50.0)
    assert evaluate(model, split, mini_dataset) < 0.5
    calibration = [x for x, _ in eval_batches(mini_dataset.train, mini_dataset, 128)][:4]
    recalibrate_bn(model, calibration)
    assert evaluate(model, split, mini_dataset) >= before - 0.03


# ---------------------------------------------------------------- proxies


def test_naswot_is_the_log_determinant_of_the_hamming_kernel() -> None:
    """One ReLU layer of 3 units on 3 images, worked by hand: codes 110, 100, 011."""
    layer = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]))
    model = nn.Sequential(nn.Flatten(), layer, nn.ReLU())
    x = torch.tensor([[2.0, 1.0], [1.0, -1.0], [-1.0, 1.0]]).view(3, 1, 1, 2)
    # codes: [1,1,0], [1,0,0], [0,1,1]; K[i,j] = units where both agree (3 - Hamming distance)
    kernel = torch.tensor([[3.0, 2.0, 0.0], [2.0, 3.0, 1.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    assert naswot(model, x) == pytest.approx(math.log(torch.linalg.det(kernel).item()), rel=1e-12)


def test_naswot_sees_functional_relus_and_a_collapsed_batch_is_minus_infinity() -> None:
    torch.manual_seed(0)
    model = build(Spec.parse("c8|basic_d1_w8_s1_k3_e1"), (1, 8, 8), 10, channels_last=False)
    x = torch.randn(8, 1, 8, 8)
    score = naswot(model, x)
    assert math.isfinite(score) and score > 0
    assert naswot(model, x[:1].repeat(8, 1, 1, 1)) == float("-inf")  # identical codes: singular kernel


def test_synflow_of_a_linear_chain_is_depth_times_its_output() -> None:
    """With no nonlinearity each layer's sum of |theta * dR/dtheta| equals R, so S = layers * R."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False)
    model = nn.Sequential(nn.Flatten(), a, b)
    r = (b.weight.abs().double() @ a.weight.abs().double() @ torch.ones(4, dtype=torch.float64)).sum().item()
    assert synflow(model, (1, 2, 2)) == pytest.approx(math.log(2 * r), rel=1e-12)
    assert a.weight.min() < 0  # the model itself is untouched


# ---------------------------------------------------------------- every score through a trial

SPEC = Spec.parse("c16|bottleneck_d1_w16_s1_k3_e4|bottleneck_d1_w32_s2_k3_e4|bottleneck_d1_w64_s2_k3_e4")
OTHER = Spec.parse("c16|basic_d1_w16_s1_k3_e1|basic_d1_w32_s2_k3_e1|basic_d1_w64_s2_k3_e1")


@pytest.fixture(scope="module")
def small_context(mini_dataset):
    """A search's trial context on the mini dataset: an untrained resnet8 teacher, 256 images."""
    torch.manual_seed(0)
    teacher_model = build(teacher_spec("resnet8"), mini_dataset.input_shape, mini_dataset.num_classes).eval()
    ensemble = Ensemble([Teacher("resnet8", teacher_model, count(teacher_model, mini_dataset.input_shape), 0.5,
                                 "test")])
    cfg = SearchConfig(flops_budget=50_000_000, subset=256, trial_epochs=1, train=TrainConfig(batch_size=64), seed=2)
    batches = BatchIterator(mini_dataset.train, mini_dataset, 64, cfg.seed, views=1,
                            indices=seeded_subset(len(mini_dataset.train), cfg.subset, cfg.seed))
    targets = CachedTargets(ensemble, batches, recipe_features(cfg.distill.weights()), progress=False)
    scorer = BlockwiseScorer(ensemble.members[0], mini_dataset, batches, cfg.train, 1, cfg.seed, val_images=50,
                             recalibration=2)
    space = load_space("resnet")

    def make(score: str):
        budget = budget_of(cfg)
        return trial_context(space, mini_dataset, ensemble, budget, batches, targets,
                             trial_recipe(dataclasses.replace(cfg, trial_score=score), budget), False, scorer)
    return make, space


def _score_once(small_context, score: str, spec: Spec = SPEC) -> optuna.trial.FrozenTrial:
    make, space = small_context
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    study.enqueue_trial(space.params_of(spec))
    study.optimize(lambda t: run_trial(make(score), t), n_trials=1)
    return study.trials[0]


@pytest.mark.parametrize("score", list(TRIAL_SCORES))
def test_every_score_is_deterministic_and_stored(small_context, score: str) -> None:
    first, second = _score_once(small_context, score), _score_once(small_context, score)
    assert first.state == optuna.trial.TrialState.COMPLETE and was_trained(first)
    assert first.value == second.value
    a = first.user_attrs
    assert a[SCORE_ATTR] == first.value and a[SCORE_KIND_ATTR] == score
    # the training-free scores and the cost are kept on every trial, whatever it is scored by
    assert {"naswot", "synflow", "macs", "params"} <= set(a) and a["naswot"] == second.user_attrs["naswot"]
    if not TRIAL_SCORES[score].trains:
        assert first.value == a[score] and "train_seconds" not in a
    if score == "distill":
        # four reports at quarters of the 4 steps, the last one the score; the raw accuracy beside it
        assert [p[0] for p in a[CURVE_ATTR]] == [0.25, 0.5, 0.75, 1.0]
        assert a[CURVE_ATTR][-1][1] == first.value == a["val_acc"] and 0 <= a["val_acc_raw"] <= 1
        assert first.intermediate_values == {k + 1: p[1] for k, p in enumerate(a[CURVE_ATTR])}


def test_recalibration_is_what_changes_the_distill_score(small_context) -> None:
    make, space = small_context
    trial = _score_once(small_context, "distill")
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    study.enqueue_trial(space.params_of(SPEC))
    off = make("distill")
    off.calibration = []
    study.optimize(lambda t: run_trial(off, t), n_trials=1)
    plain = study.trials[0]
    # the same training: without recalibration the score is the raw accuracy of the run with it
    assert plain.value == trial.user_attrs["val_acc_raw"] and "val_acc_raw" not in plain.user_attrs


def test_a_repeated_spec_reuses_its_score_and_does_not_count(small_context) -> None:
    make, space = small_context
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    for spec in (SPEC, SPEC, OTHER):
        study.enqueue_trial(space.params_of(spec))
    assert run(study, lambda t: run_trial(make("synflow"), t), trained=2, timeout=None) == 2
    first, repeat, other = study.trials
    assert repeat.user_attrs[REPEAT_ATTR] == 0 and repeat.value == first.value and not was_trained(repeat)
    assert "naswot" not in repeat.user_attrs and was_trained(other)


def test_runs_stop_when_the_sampler_only_repeats(small_context) -> None:
    make, space = small_context
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    for _ in range(6):
        study.enqueue_trial(space.params_of(SPEC))
    assert run(study, lambda t: run_trial(make("macs"), t), trained=3, timeout=None, max_repeats=5) == 1
    assert len(study.trials) == 6


@pytest.mark.parametrize(("total", "reports", "start", "steps"), [
    (62, 4, 0, [16, 31, 46, 62]),
    (4, 4, 0, [1, 2, 3, 4]),
    (3, 4, 0, [1, 2, 3]),  # fewer steps than reports: each step once
    (62, 4, 31, [39, 47, 54, 62]),  # two-stage: stage one's 31 steps are not validated
    (10, 1, 0, [10]),
])
def test_report_steps(total: int, reports: int, start: int, steps: list[int]) -> None:
    assert report_steps(total, reports, start) == steps


# ---------------------------------------------------------------- pruners


def _prune_run(pruner: optuna.pruners.BasePruner, curves: list[list[float]]) -> tuple[list[int | None], optuna.Study]:
    """Run one trial per curve, in order, reporting its values at steps 1, 2, ...; returns the step
    at which each was pruned (None: ran to its end) and the study."""
    study = optuna.create_study(direction="maximize", pruner=pruner, study_name="pruners")
    pruned_at: list[int | None] = []

    def objective(trial: optuna.Trial) -> float:
        values = curves[trial.number]
        for step, value in enumerate(values, 1):
            trial.report(value, step)
            if step < len(values) and trial.should_prune():  # as distill_score: never after the last
                pruned_at.append(step)
                raise optuna.TrialPruned()
        pruned_at.append(None)
        return values[-1]

    study.optimize(objective, n_trials=len(curves))
    return pruned_at, study


def _halving(curves: list[list[float]], first_rung: int) -> list[int | None]:
    """Asynchronous successive halving by its definition, reduction factor 2: at rungs first_rung,
    2 first_rung, ... before a trial's last report, the trial goes on only if its value is among
    the top half of the values every trial so far recorded at that rung (itself included; the
    first trial at a rung always goes on)."""
    rungs: dict[int, list[float]] = {}
    out: list[int | None] = []
    for values in curves:
        step, pruned = first_rung, None
        while step < len(values):
            seen = rungs.setdefault(step, [])
            seen.append(values[step - 1])
            keep = max(1, len(seen) // 2)
            if values[step - 1] < sorted(seen)[-keep]:
                pruned = step
                break
            step *= 2
        out.append(pruned)
    return out


def test_successive_halving_prunes_where_its_rungs_say() -> None:
    """Rungs at reports 1 and 2 (4 is the end); worked by hand."""
    curves = [[0.5, 0.6, 0.7, 0.8],   # first at every rung: goes on
              [0.4, 0.9, 0.9, 0.9],   # rung 1: 0.4 < top 1 of {.5, .4} -> pruned at 1
              [0.6, 0.65, 0.7, 0.75],  # rung 1: top 1 of {.5, .4, .6}; rung 2: top 1 of {.6, .65} -> on
              [0.55, 0.5, 0.8, 0.9],  # rung 1: top 2 of {.5, .4, .6, .55}; rung 2: .5 < top 1 of {.6, .65, .5}
              [0.3, 0.3, 0.3, 0.3]]   # rung 1: .3 < top 2 of 5 -> pruned at 1
    pruned_at, _ = _prune_run(make_pruner("sha", 4), curves)
    assert pruned_at == [None, 1, None, 2, 1] == _halving(curves, 1)


def test_hyperband_prunes_each_trial_by_its_brackets_rungs() -> None:
    """Hyperband over 4 reports, reduction factor 2: 3 brackets whose first rungs are reports 1, 2
    and 4. Each trial is assigned a bracket and halved only against the trials of its bracket; in
    the last bracket the only rung is the end, so those trials always finish."""
    curves = [[0.9 - 0.1 * (n % 5), 0.8 - 0.1 * (n % 3), 0.5, 0.5] for n in range(16)]
    pruner = make_pruner("hyperband", 4)
    pruned_at, study = _prune_run(pruner, curves)
    brackets = [pruner._get_bracket_id(study, t) for t in study.trials]
    assert set(brackets) == {0, 1, 2}
    expected: list[int | None] = [None] * len(curves)
    for b in range(3):
        members = [n for n in range(len(curves)) if brackets[n] == b]
        for n, step in zip(members, _halving([curves[n] for n in members], 2 ** b)):
            expected[n] = step
    assert pruned_at == expected
    assert any(step is not None for step in pruned_at)


def test_median_pruner_waits_for_four_trials_and_the_second_report() -> None:
    curves = [[0.5, 0.5, 0.5, 0.5]] * 4 + [[0.1, 0.6, 0.6, 0.6], [0.45, 0.4, 0.4, 0.4], [0.6, 0.4, 0.4, 0.4]]
    # trial 4: below the median at report 1, which is warm-up; above it at 2 -> runs on.
    # trial 5: its best so far (0.45) is below the median (0.5) at report 2 -> pruned there.
    # trial 6: its best so far (0.6, at report 1) is above the median: runs on
    assert _prune_run(make_pruner("median", 4), curves)[0] == [None, None, None, None, None, 2, None]


def test_no_pruner_never_prunes() -> None:
    assert _prune_run(make_pruner("none", 4), [[0.9, 0.9], [0.0, 0.0], [0.0, 0.0]])[0] == [None, None, None]


# ---------------------------------------------------------------- command line

# the space of before the budget's edge, sampled as drawn: the pruners and scores are what is
# tested, on students smaller than the edge's (the edge: tests/test_edge.py)
BASE = ("--flops-budget", "12M", "--teachers", "resnet8", "--teacher-epochs", "1", "--subset", "300",
        "--final-epochs", "0", "--seed", "1", "--quiet", "--no-onnx",  # latency: tests/test_latency.py
        "--search-space", "resnet-v1", "--budget-edge", "off")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("teachers")


def _search(tmp_path: Path, cache: Path, data_dir: Path, *extra: str) -> tuple[optuna.Study, str]:
    return search_cli(tmp_path, cache, data_dir, *BASE, *extra)


# a proxy and a count through the command line; every score's trial, in-process, is the test above
@pytest.mark.parametrize("score", ["naswot", "macs"])
def test_training_free_score_end_to_end(score: str, tmp_path: Path, shared_cache: Path, mini_fashion_dir: Path) -> None:
    study, _ = _search(tmp_path, shared_cache, mini_fashion_dir, "--trial-score", score, "--trials", "3")
    scored = [t for t in study.trials if was_trained(t)]
    assert len(scored) == 3
    for t in scored:
        assert t.value == t.user_attrs[score] and t.user_attrs[SCORE_KIND_ATTR] == score
        assert CURVE_ATTR not in t.user_attrs and "train_seconds" not in t.user_attrs  # nothing trained
    assert (tmp_path / "studies" / "s" / "report.html").is_file()


# "none" runs end to end in tests/test_resume.py, whose searches must not prune
@pytest.mark.parametrize("pruner", [p for p in PRUNERS if p != "none"])
def test_pruner_end_to_end(pruner: str, tmp_path: Path, shared_cache: Path, mini_fashion_dir: Path) -> None:
    study, output = _search(tmp_path, shared_cache, mini_fashion_dir, "--pruner", pruner, "--trials", "5",
                            "--trial-epochs", "2")
    assert f"pruner {pruner}" in output
    trained = [t for t in study.trials if was_trained(t)]
    # --trials counts training done: a trial 1, a pruned trial the share of its steps it trained
    work = [1.0 if t.state == optuna.trial.TrialState.COMPLETE else t.user_attrs["trained_fraction"] for t in trained]
    assert sum(work[:-1]) < 5 <= sum(work) + 1e-9
    assert all(w == max(t.intermediate_values) / 4 for w, t in zip(work, trained) if w < 1)
    for t in trained:
        # 2 epochs of 2 steps: reports after steps 1, 2, 3 and 4
        reported = list(t.intermediate_values)
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert reported == [1, 2, 3, 4] and t.value == t.user_attrs[CURVE_ATTR][-1][1]
        else:
            assert t.state == optuna.trial.TrialState.PRUNED and pruner != "none" and len(reported) < 4


@pytest.mark.parametrize(("flags", "message"), [
    (("--trial-score", "nope"), "argument --trial-score: invalid choice: 'nope' (choose from 'distill', 'blockwise', "
                                "'naswot', 'synflow', 'macs', 'params')"),
    (("--pruner", "asha"), "argument --pruner: invalid choice: 'asha' (choose from 'median', 'sha', 'hyperband', "
                           "'none')"),
    (("--bn-recalibration", "-1"), "--bn-recalibration"),
])
def test_bad_score_or_pruner_is_one_line(flags: tuple[str, ...], message: str, tmp_path: Path) -> None:
    result = run_cli("nas_kd.search", "--flops-budget", "5M", *flags, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "studies").exists()


def test_unknown_score_in_yaml_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("flops_budget: 5000000\ntrial_score: nope\n")
    result = run_cli("nas_kd.search", "--config", "c.yaml", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].endswith(
        "unknown trial score 'nope'; known: distill, blockwise, naswot, synflow, macs, params")


def test_an_unknown_score_name_lists_the_known_ones() -> None:
    with pytest.raises(InputError, match=r"^unknown trial score 'nope'; known: distill, blockwise, naswot, synflow, "
                                         r"macs, params$"):
        trial_score_named("nope")


@pytest.mark.parametrize("name", list(TRIAL_SCORES))
def test_every_registered_score_is_described_by_its_properties(name: str) -> None:
    kind = trial_score_named(name)
    line = trial_text(SearchConfig(flops_budget=5_000_000, trial_score=name), 100)
    assert line.startswith(f"trial score {name}: ") and kind.label
    assert ("nothing trained" in line) == (not kind.trains)
    assert ("per stage" in line) == kind.blockwise and ("pruner" in line) == (kind.trains and not kind.blockwise)


def test_recalibrated_puts_the_running_statistics_back() -> None:
    torch.manual_seed(0)
    model = build(SPEC, (1, 12, 12), 10, channels_last=False).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with recalibrated(model, [torch.randn(8, 1, 12, 12)]):
        assert not model.training
        assert not torch.equal(model.stem[0][1].running_mean, before["stem.0.1.running_mean"])
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_study_made_before_recalibration_resumes_only_without_it(tmp_path: Path) -> None:
    """Studies recorded before `bn_recalibration` existed scored trials without it: resuming one
    with recalibration on would mix two kinds of score, so it is refused with the flag to pass."""
    storage = open_storage(f"sqlite:///{tmp_path / 'old.db'}", heartbeat=False)
    before = guarded(SearchConfig(flops_budget=5_000_000), "resnet-v1")
    del before["bn_recalibration"]  # what an older nas_kd recorded
    open_study(storage, "old", False, 0, before)
    now = guarded(SearchConfig(flops_budget=5_000_000), "resnet-v1")
    assert default_study_name(now) != default_study_name(before)  # a bare rerun starts a new study
    with pytest.raises(InputError, match="created with bn_recalibration=0, this run has bn_recalibration=8"):
        open_study(storage, "old", False, 0, now)
    off = guarded(SearchConfig(flops_budget=5_000_000, bn_recalibration=0), "resnet-v1")
    assert open_study(storage, "old", False, 0, off).study_name == "old"
