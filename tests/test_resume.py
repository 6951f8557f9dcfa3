"""A run that resumes where it stopped: interrupted in the search or in the retrain, the same command
does only what is left (the trials left, then the retrain from its last epoch), reaches the weights an
uninterrupted run reaches, and says what it will do; a finished run is not run again; `--more` and
other settings are told apart from a resume."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from conftest import ROOT, TINY_DATA_FLAGS, run_cli
from safetensors.torch import load_file

from nas_kd import search as search_cli
from nas_kd.core.errors import InputError
from nas_kd.nas.study import study_training
from nas_kd.pipeline import run as pipeline
from nas_kd.pipeline.resume import RUN_ATTR, Interrupted
from nas_kd.training.train import Checkpoint

TINY = (*TINY_DATA_FLAGS, "--flops-budget", "12M", "--teachers", "resnet8", "--teacher-epochs", "1", "--trial-epochs", "1",
        "--subset", "200", "--pruner", "none", "--no-onnx", "--seed", "5", "--quiet")


def config(work: Path, data: Path, cache: Path, *args: str):
    argv = [*TINY, "--data-dir", str(data), "--cache-dir", str(cache), "--out-dir", str(work / "studies"), *args]
    return search_cli.config_from_args(search_cli.build_parser().parse_args(argv), search_cli.given_flags(argv))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("resume-teachers")


def interrupt_after_trained(monkeypatch: pytest.MonkeyPatch, trained: float) -> None:
    """Ctrl-C in the trial that starts once the study holds `trained` trials' worth."""
    real = pipeline.run_trial

    def trial(ctx, t: optuna.Trial):
        if study_training(t.study) >= trained:
            raise KeyboardInterrupt
        return real(ctx, t)

    monkeypatch.setattr(pipeline, "run_trial", trial)


def interrupt_after_epochs(monkeypatch: pytest.MonkeyPatch, epochs: int) -> None:
    """Ctrl-C right after the retrain's `epochs`-th checkpoint is saved."""
    real, saved = Checkpoint.save, []

    def save(self: Checkpoint, state: dict) -> None:
        real(self, state)
        saved.append(state["epoch"])
        if len(saved) == epochs:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", save)


@pytest.mark.parametrize("timed", [False, True], ids=["count", "time-budget"])
def test_interrupted_in_the_search_the_same_command_trains_only_the_trials_left(
        timed: bool, tmp_path: Path, mini_fashion_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    # under a time budget the counts are kept (time_fixed), so that the test's length is the count's
    args = ("--trials", "3", "--final-epochs", "1", *(("--time-budget", "20m") if timed else ()), "--study-name", "r")
    cfg = config(tmp_path, mini_fashion_dir, cache, *args)
    with monkeypatch.context() as m:
        interrupt_after_trained(m, 2)
        with pytest.raises(Interrupted) as stopped:
            pipeline.search(cfg, progress=False)
    assert "the same command trains the 1.00 trials' worth left (2.00 of 3 trials' worth trained), then retrains" \
        in stopped.value.next
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path / 'studies' / 'r.db'}")
    record = study.user_attrs[RUN_ATTR]
    assert record["phase"] == "search" and record["target"] == 3 and record["elapsed"] > 0
    capsys.readouterr()

    study = pipeline.search(cfg, progress=False)
    err = capsys.readouterr().err
    asked = "--time-budget 20m, --trials 3" if timed else "--trials 3"
    assert f"resuming this command's run ({asked}): 2.00 of 3 trials' worth trained" in err
    assert study_training(study) == 3  # no more than asked, in all
    assert study.user_attrs[RUN_ATTR]["phase"] == "done" and study.user_attrs[RUN_ATTR]["sessions"] == 2
    assert "winner" in study.user_attrs
    if timed:  # the split counts both sessions: its total is at least what the first one spent
        actual = study.user_attrs["time_budget"]["actual"]
        assert actual["total"] >= record["elapsed"] and actual["trials"] == 3
        assert "(what was left of it: " in err  # the plan line: not a fresh budget

    again = pipeline.search(cfg, progress=False)  # finished: nothing is trained or retrained again
    assert study_training(again) == 3 and "nothing is left to do" in capsys.readouterr().err


def test_interrupted_in_the_retrain_the_same_command_resumes_at_the_next_epoch_with_the_same_weights(
        tmp_path: Path, mini_fashion_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    torch.set_num_threads(1)  # the reference and the resumed retrain take the same steps in the same order
    # under a time budget with the counts kept, so that no re-planning by the clock moves the length: the
    # retrain's resume is the same code under a count (the search's resume is tested under both)
    args = ("--trials", "2", "--final-epochs", "3", "--time-budget", "20m", "--study-name", "r")
    whole = pipeline.search(config(tmp_path / "whole", mini_fashion_dir, cache, *args), progress=False)
    cfg = config(tmp_path / "cut", mini_fashion_dir, cache, *args)
    with monkeypatch.context() as m:
        interrupt_after_epochs(m, 2)
        with pytest.raises(Interrupted) as stopped:
            pipeline.search(cfg, progress=False)
    assert "the search is done; the same command resumes the retrain at epoch 3 of 3" in stopped.value.next
    capsys.readouterr()

    resumed = pipeline.search(cfg, progress=False)
    err = capsys.readouterr().err
    assert "the search is done, the retrain goes on" in err
    assert study_training(resumed) == study_training(whole) == 2
    assert "retrain epoch 3/3" in err and "retrain epoch 1/3" not in err  # only the epoch left was trained
    ours = load_file(str(tmp_path / "cut" / "studies" / "r" / "winner" / "model.safetensors"))
    theirs = load_file(str(tmp_path / "whole" / "studies" / "r" / "winner" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)
    assert not (tmp_path / "cut" / "studies" / "r" / "checkpoints").exists() or not any(
        (tmp_path / "cut" / "studies" / "r" / "checkpoints").rglob("*.pt"))  # a finished run leaves none


def test_a_damaged_retrain_checkpoint_is_moved_aside_and_the_retrain_starts_again(
        tmp_path: Path, mini_fashion_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    cfg = config(tmp_path, mini_fashion_dir, cache, "--trials", "1", "--final-epochs", "2", "--study-name", "d")
    with monkeypatch.context() as m:
        interrupt_after_epochs(m, 1)
        with pytest.raises(Interrupted):
            pipeline.search(cfg, progress=False)
    [saved] = [p for p in (tmp_path / "studies" / "d" / "checkpoints").rglob("trial-*.pt")]
    saved.write_bytes(saved.read_bytes()[:100])
    capsys.readouterr()
    study = pipeline.search(cfg, progress=False)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning: cannot resume from" in line]
    assert len(warnings) == 1 and "moved it to" in warnings[0] and "training starts anew" in warnings[0]
    assert "retrain epoch 1/2" in err and "winner" in study.user_attrs
    assert list((saved.parent / "broken").iterdir())


def test_other_settings_on_an_unfinished_run_are_refused_and_more_starts_a_new_one(
        tmp_path: Path, mini_fashion_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path, mini_fashion_dir, cache, "--trials", "2", "--final-epochs", "0", "--study-name", "m")
    with pytest.raises(InputError, match="--more adds a run to study 'm', which holds none yet"):
        pipeline.search(config(tmp_path, mini_fashion_dir, cache, "--trials", "2", "--final-epochs", "0",
                               "--study-name", "m", "--more"), progress=False)
    with monkeypatch.context() as m:
        interrupt_after_trained(m, 1)
        with pytest.raises(Interrupted):
            pipeline.search(cfg, progress=False)
    other = config(tmp_path, mini_fashion_dir, cache, "--trials", "1", "--final-epochs", "0", "--study-name", "m")
    with pytest.raises(InputError, match=r"holds an unfinished run of other settings \(--trials 2, 1.00 of 2 "
                                         r"trials' worth trained, search left\).*add --more"):
        pipeline.search(other, progress=False)
    more = config(tmp_path, mini_fashion_dir, cache, "--trials", "1", "--final-epochs", "0", "--study-name", "m", "--more")
    study = pipeline.search(more, progress=False)
    assert study_training(study) == 2 and study.user_attrs[RUN_ATTR]["phase"] == "done"


def test_ctrl_c_in_the_search_command_says_what_is_left_and_the_same_command_finishes(
        tmp_path: Path, mini_fashion_dir: Path, cache: Path) -> None:
    """A real SIGINT to `python -m nas_kd.search` while it trains its second trial."""
    args = [*TINY, "--data-dir", str(mini_fashion_dir), "--cache-dir", str(cache), "--trials", "3",
            "--final-epochs", "1", "--study-name", "c"]
    args.remove("--quiet")  # a line per trial, to know when to interrupt
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # SIGINT as a terminal delivers it: a shell's background job (`cmd &`, as a CI script may start the
    # suite) starts with SIGINT ignored, and Python then installs no KeyboardInterrupt for it
    process = subprocess.Popen([sys.executable, "-m", "nas_kd.search", *args], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    assert process.stderr is not None
    for line in process.stderr:
        lines.append(line)
        if re.match(r"\[nas_kd\] trial \d+ complete", line):  # the first trained trial is in
            process.send_signal(signal.SIGINT)
            break
    _, rest = process.communicate(timeout=300)
    err = "".join(lines) + rest
    assert process.returncode == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: every finished trial is in the storage; the same command trains the ")
    assert "trials' worth left" in last and last.endswith("then retrains")
    study = optuna.load_study(study_name="c", storage=f"sqlite:///{tmp_path / 'studies' / 'c.db'}")
    assert 1 <= study_training(study) < 3, err[-3000:]

    result = run_cli("nas_kd.search", *args, "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming this command's run (--trials 3)" in result.stderr
    study = optuna.load_study(study_name="c", storage=f"sqlite:///{tmp_path / 'studies' / 'c.db'}")
    assert study_training(study) == 3 and "winner" in study.user_attrs


def test_a_run_recorded_before_the_depth_cap_keeps_its_id() -> None:
    import hashlib
    import json

    from nas_kd.core.config import SearchConfig
    from nas_kd.pipeline.resume import run_id

    cfg = SearchConfig(flops_budget=5_000_000)
    before = {k: v for k, v in cfg.to_dict().items() if k not in ("more", "edge_depth")}
    assert run_id(cfg) == hashlib.sha256(json.dumps(before, sort_keys=True, default=str).encode()).hexdigest()[:12]
    assert run_id(SearchConfig(flops_budget=5_000_000, edge_depth="free")) != run_id(cfg)
