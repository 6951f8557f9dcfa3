"""Faults: a failing trial fails alone, names stay in their folder, a broken cache heals, runs log
when nobody watches a terminal, and outputs get the user's file modes."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
import weakref
from pathlib import Path

import optuna
import pytest
import torch

from nas_kd import retrain as retrain_cli
from nas_kd.core import progress
from nas_kd.core.config import SearchConfig, TrainConfig
from nas_kd.core.errors import InputError
from nas_kd.data.batches import BatchIterator, seeded_subset
from nas_kd.nas import objective
from nas_kd.nas.objective import run_trial, trial_context
from nas_kd.nas.records import FAIL_ATTR, FAIL_TRACE_ATTR, trial_score, was_trained
from nas_kd.nas.study import MAX_FAILURES_IN_A_ROW, TooManyFailures, check_study_name, run
from nas_kd.nets.arch import build
from nas_kd.nets.cost import count
from nas_kd.nets.space import load_space
from nas_kd.nets.weights import read_metadata
from nas_kd.nets.zoo import teacher_spec
from nas_kd.pipeline.phases import budget_of, trial_recipe
from nas_kd.reporting import fronts
from nas_kd.teaching.cache import Teacher, load_or_train
from nas_kd.teaching.ensemble import Ensemble
from tests.conftest import E2E_ARGS, E2E_STUDY, run_cli

CPU = torch.device("cpu")


# ---------------------------------------------------------------- a failing trial fails alone


@pytest.fixture(scope="module")
def context(mini_dataset):
    """Trials scored by their MACs (nothing trained), on the mini dataset."""
    torch.manual_seed(0)
    teacher = build(teacher_spec("resnet8"), mini_dataset.input_shape, mini_dataset.num_classes).eval()
    ensemble = Ensemble([Teacher("resnet8", teacher, count(teacher, mini_dataset.input_shape), 0.5, "test")])
    cfg = SearchConfig(flops_budget=50_000_000, subset=128, trial_epochs=1, train=TrainConfig(batch_size=64, lr=0.3),
                       trial_score="macs")
    batches = BatchIterator(mini_dataset.train, mini_dataset, 64, 0, views=1,
                            indices=seeded_subset(len(mini_dataset.train), cfg.subset, 0))
    budget = budget_of(cfg)
    return trial_context(load_space("resnet"), mini_dataset, ensemble, budget, batches, None, trial_recipe(cfg, budget),
                         progress=False)


def _scored_by(compute) -> objective.TrialScore:
    """The `macs` trial score, computed by `compute` instead."""
    return dataclasses.replace(objective.TRIAL_SCORES["macs"], compute=compute)


def _failing_score(fails: set[int], error: Exception) -> objective.TrialScore:
    """The `macs` score, except that trials numbered in `fails` raise `error`."""
    macs = objective.TRIAL_SCORES["macs"].compute

    def score(ctx, trial, spec):
        if trial.number in fails:
            raise error
        return macs(ctx, trial, spec)
    return _scored_by(score)


def test_a_diverging_trial_fails_alone_and_the_study_goes_on(context, monkeypatch) -> None:
    monkeypatch.setitem(objective.TRIAL_SCORES, "macs",
                        _failing_score({0}, FloatingPointError("trial 0: loss became nan in epoch 1")))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    trained = run(study, lambda trial: run_trial(context, trial), trained=3, timeout=None)
    assert trained == 3
    states = {t.number: t.state for t in study.trials}
    assert states[0] == optuna.trial.TrialState.FAIL
    assert sum(s == optuna.trial.TrialState.COMPLETE for s in states.values()) == 3
    failed = study.trials[0]
    assert failed.user_attrs[FAIL_ATTR] == ("diverged: trial 0: loss became nan in epoch 1; the likely cause is a "
                                            "learning rate too high (--lr 0.3) or a loss weight too large (--distill)")
    assert "FloatingPointError" in failed.user_attrs[FAIL_TRACE_ATTR]
    frame = fronts.trials_frame(study)
    row = frame[frame["number"] == 0].iloc[0]
    assert row["status"] == "failed" and row["fail_reason"] == failed.user_attrs[FAIL_ATTR]


def test_failures_in_a_row_stop_the_study_naming_the_last(context, monkeypatch) -> None:
    monkeypatch.setitem(objective.TRIAL_SCORES, "macs", _failing_score(set(range(100)), RuntimeError("boom")))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    without_proxies = dataclasses.replace(context, proxy_images=None)  # seconds a trial, not needed here
    with pytest.raises(TooManyFailures) as caught:
        run(study, lambda trial: run_trial(without_proxies, trial), trained=50, timeout=None)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    # over-budget rejections in between neither count nor break the run of failures
    assert len(failed) == MAX_FAILURES_IN_A_ROW == 5
    assert str(caught.value) == (f"stopped after 5 failed trials in a row (the last, trial {failed[-1].number}: "
                                 "RuntimeError: boom); every finished trial is kept in the storage")
    assert isinstance(caught.value, InputError)  # the command line makes it one line and exit 2


def test_an_out_of_memory_trial_frees_its_memory_first(context, monkeypatch) -> None:
    held: list[weakref.ref] = []
    freed_before_cache_emptied: list[bool] = []

    def oom(ctx, trial, spec):
        model = build(spec, ctx.dataset.input_shape, ctx.dataset.num_classes)
        held.append(weakref.ref(model))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setitem(objective.TRIAL_SCORES, "macs", _scored_by(oom))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed_before_cache_emptied.append(held[-1]() is None))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    without_proxies = dataclasses.replace(context, proxy_images=None)
    with pytest.raises(TooManyFailures, match="out of memory: CUDA out of memory. Tried to allocate 2.00 GiB; "
                                              "lower --batch-size or the budget"):
        run(study, lambda trial: run_trial(without_proxies, trial), trained=50, timeout=None)
    # the model the trial built was gone when the CUDA cache was emptied, after every failure
    assert freed_before_cache_emptied == [True] * MAX_FAILURES_IN_A_ROW


def test_a_pruned_or_bad_input_trial_is_not_a_failure(context, monkeypatch) -> None:
    def bad(ctx, trial, spec):
        raise InputError("a bad table")
    monkeypatch.setitem(objective.TRIAL_SCORES, "macs", _scored_by(bad))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    with pytest.raises(InputError, match="a bad table"):  # bad input still ends the run at once
        run(study, lambda trial: run_trial(context, trial), trained=5, timeout=None)


# ---------------------------------------------------------------- end to end


@pytest.fixture
def e2e_copy(e2e_run: dict, tmp_path: Path) -> dict:
    shutil.copytree(e2e_run["work"] / "studies", tmp_path / "studies")
    return {**e2e_run, "work": tmp_path}


def _with(args: tuple[str, ...], **flags: str) -> list[str]:
    out = list(args)
    for flag, value in flags.items():
        flag = "--" + flag.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


def test_a_search_whose_trials_all_diverge_stops_in_one_line(e2e_copy: dict) -> None:
    """An absurd loss weight (KL x 1e39 overflows float32): every trial's loss is infinite; after
    5 failed trials the run stops with one line naming the likely cause, and the report lists
    the failed trials."""
    args = _with(E2E_ARGS, distill="ce,kl=1e39", study_name="nan", trials="6", final_epochs="0")
    result = run_cli("nas_kd.search", *args, "--data-dir", str(e2e_copy["data_dir"]), cwd=e2e_copy["work"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stopped after 5 failed trials in a row (the last, trial ") and \
        "diverged: trial" in last and "loss became inf" in last and "(--distill)" in last, last
    assert "(cache: " in result.stderr  # the teacher came from the cache
    csv = (e2e_copy["work"] / "studies" / "nan" / "trials.csv").read_text()
    assert csv.count(",failed,") == 5 and csv.count("the likely cause is a learning rate too high") == 5
    # every failed trial got a log line of its own, with its reason
    assert sum("failed: " in line and "diverged" in line for line in result.stderr.splitlines()) == 5


def test_a_diverging_teacher_is_one_line(mini_fashion_dir: Path, tmp_path: Path) -> None:
    args = _with(E2E_ARGS, lr="1e6", study_name="t")
    result = run_cli("nas_kd.search", *args, "--data-dir", str(mini_fashion_dir), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: teacher resnet8 diverged while training "
                                                             "(teacher resnet8: loss became ")
    assert "lower --lr (it was 1e+06)" in result.stderr.strip().splitlines()[-1]


def test_a_teacher_near_chance_stops_the_run(mini_fashion_dir: Path, tmp_path: Path) -> None:
    """The mini dataset's one-epoch teacher is near chance: without --teacher-min-gain 0 the run stops."""
    args = _with(E2E_ARGS, study_name="weak", teacher_min_gain="0.1")
    result = run_cli("nas_kd.search", *args, "--data-dir", str(mini_fashion_dir), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: teacher resnet8 (trained for 1 epochs: ") and \
        "near chance (10.0% for 10 classes)" in last and "--teacher-min-gain 0 accepts it" in last, last
    assert not (tmp_path / "studies" / "weak").exists()  # stopped before any trial


def test_runs_log_one_line_per_trial_and_retrain_epoch_without_a_terminal(e2e_run: dict) -> None:
    err = e2e_run["result"].stderr
    trials = [line for line in err.splitlines() if re.match(r"\[nas_kd\] trial \d+ ", line)]
    study = optuna.load_study(study_name=E2E_STUDY, storage=e2e_run["url"])
    assert len(trials) == len(study.trials)
    first = study.trials[0]
    assert any(line.startswith(f"[nas_kd] trial {first.number} ") and first.user_attrs["spec"] in line and
               "MACs" in line for line in trials)
    for t in study.trials:
        if was_trained(t):
            line = next(line for line in trials if line.startswith(f"[nas_kd] trial {t.number} "))
            assert f"score {trial_score(t):.4f}" in line
    assert sum(line.startswith("[nas_kd] retrain epoch 1/1: loss ") for line in err.splitlines()) == 1
    rejected = next(t for t in study.trials if not was_trained(t))
    line = next(line for line in trials if line.startswith(f"[nas_kd] trial {rejected.number} "))
    assert line.endswith("over budget (macs): not trained"), line


def test_bars_are_drawn_only_on_a_terminal(monkeypatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert progress.bars_shown(True) and not progress.bars_shown(False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not progress.bars_shown(True)


def test_exported_files_follow_the_umask(e2e_run: dict) -> None:
    winner = e2e_run["study_dir"] / "winner"
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in winner.iterdir() if p.is_file()}
    assert {"model.safetensors", "metrics.json", "model.onnx"} <= set(modes)
    assert set(modes.values()) == {0o666 & ~umask}, modes


# ---------------------------------------------------------------- study names stay in their folder


@pytest.mark.parametrize("name", ["../../x", "a/b", ".hidden", "", "a\x00b", "x" * 201, "a:b"])
def test_a_study_name_that_escapes_its_folder_is_refused(name: str) -> None:
    with pytest.raises(InputError, match="cannot name a file inside the output folder"):
        check_study_name(name)


@pytest.mark.parametrize("name", ["fashion-mnist-macs50M-1a2b3c", "my study", "run_2.b"])
def test_ordinary_study_names_are_accepted(name: str) -> None:
    assert check_study_name(name) == name


@pytest.mark.parametrize("command", ["nas_kd.search", "nas_kd.report", "nas_kd.retrain"])
def test_every_command_refuses_an_escaping_study_name(command: str, e2e_run: dict, tmp_path: Path) -> None:
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    args = ["--flops-budget", "12M", "--quiet"] if command == "nas_kd.search" else []
    storage = ["--storage", e2e_run["url"]] if command != "nas_kd.search" else []
    result = run_cli(command, *args, *storage, "--study-name", "../../x", cwd=work, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: study name '../../x' cannot name a file inside the "
                                                   "output folder (it holds '/')"), lines
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b"]  # nothing written anywhere


# ---------------------------------------------------------------- a broken cache heals


@pytest.mark.parametrize("damage", ["weights cut", "header cut"])
def test_a_broken_cached_teacher_is_moved_aside_and_trained_again(damage: str, mini_dataset, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = load_or_train("resnet8", mini_dataset, 1, 0, TrainConfig(batch_size=100), cache, CPU, progress=False,
                          log=lambda m: None, min_gain=0)
    path = Path(first.path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100] if damage == "weights cut" else data[:20])
    lines: list[str] = []
    second = load_or_train("resnet8", mini_dataset, 1, 0, TrainConfig(batch_size=100), cache, CPU, progress=False,
                           log=lines.append, min_gain=0)
    aside = cache / "teachers" / "broken" / path.name
    warning = [line for line in lines if line.startswith("warning:")]
    assert len(warning) == 1 and str(path) in warning[0] and str(aside) in warning[0], lines
    assert aside.read_bytes() == (data[:len(data) - 100] if damage == "weights cut" else data[:20])
    assert second.source == "trained" and second.path == str(path)
    assert read_metadata(path)["arch"] == "resnet8"  # a whole file again
    # the next run loads it without a word
    lines.clear()
    third = load_or_train("resnet8", mini_dataset, 1, 0, TrainConfig(batch_size=100), cache, CPU, progress=False,
                          log=lines.append, min_gain=0)
    assert third.source == "cache" and not lines


def test_a_broken_checkpoint_of_the_user_is_refused_not_retrained(mini_dataset, tmp_path: Path) -> None:
    ckpt = tmp_path / "mine.safetensors"
    ckpt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    before = ckpt.read_bytes()
    with pytest.raises(InputError, match="cannot read checkpoint .*mine.safetensors"):
        load_or_train("resnet8", mini_dataset, 1, 0, TrainConfig(), tmp_path / "cache", CPU, checkpoint=ckpt,
                      progress=False, log=lambda m: None, min_gain=0)
    assert ckpt.read_bytes() == before and not (tmp_path / "cache").exists()


def test_retrain_refuses_a_study_it_cannot_place(e2e_run: dict, tmp_path: Path, capsys) -> None:
    assert retrain_cli.main(["--study-name", "x/../../y", "--storage", e2e_run["url"], "--out-dir", str(tmp_path)]) == 2
    assert "cannot name a file inside the output folder" in capsys.readouterr().err
