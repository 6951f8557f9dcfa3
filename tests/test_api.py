"""The Python API: `nas_kd.run(SearchConfig)` runs what `python -m nas_kd.search` runs and returns
the study and its retrained winner, as the run stored them."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

import nas_kd
from nas_kd import SearchConfig
from nas_kd.device.export import load_student
from nas_kd.nas.picks import pick_winner
from nas_kd.nas.study import WINNER_ATTR
from nas_kd.nets.arch import Spec, build
from nas_kd.nets.cost import count
from nas_kd.pipeline.run import RunResult


def test_importing_nas_kd_loads_neither_torch_nor_the_pipeline() -> None:
    code = "import sys, nas_kd; print(sorted(m for m in ('torch', 'optuna', 'nas_kd.pipeline.run') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_run_returns_the_study_and_its_retrained_winner(tmp_path: Path, e2e_run: dict) -> None:
    # the settings of the end-to-end search (conftest.E2E_ARGS), so its cached teacher serves; without ONNX
    cfg = SearchConfig(flops_budget=12_000_000, teachers=("resnet8",), teacher_epochs=1, trials=2, trial_epochs=1,
                       subset=300, final_epochs=1, study_name="api", seed=3, min_steps=0, teacher_min_gain=0.0,
                       onnx=False, data_dir=str(e2e_run["data_dir"]), cache_dir=str(e2e_run["out"] / "cache"),
                       out_dir=str(tmp_path / "studies"))
    result = nas_kd.run(cfg)
    assert isinstance(result, RunResult)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.spec = "c8"  # type: ignore[misc]
    study = result.study
    assert study.study_name == "api" and (tmp_path / "studies" / "api.db").is_file()
    best = pick_winner(study)
    assert result.winner is not None and result.winner.number == best.number
    assert result.spec == best.user_attrs["spec"] == result.winner.user_attrs["spec"]
    stored = study.user_attrs[WINNER_ATTR]
    assert (result.test_acc, result.val_acc) == (stored["test_acc"], stored["val_acc"])
    assert 0 <= result.test_acc <= 1 and 0 <= result.val_acc <= 1
    cost = count(build(Spec.parse(result.spec), (1, 28, 28), 10), (1, 28, 28))
    assert (result.macs, result.params) == (cost.macs, cost.params) == (stored["macs"], stored["params"])
    assert result.macs <= cfg.flops_budget
    assert result.folder == tmp_path / "studies" / "api" / "winner"
    model, _ = load_student(result.folder / "model.safetensors")
    assert str(model.spec) == result.spec
    assert json.loads((result.folder / "metrics.json").read_text())["test_acc"] == result.test_acc


def test_a_run_that_retrained_nothing_has_no_winner() -> None:
    study = optuna.create_study()
    assert RunResult.of(study) == RunResult(study, None, None, None, None, None, None, None)


def test_run_follows_the_command_lines_rule_for_a_run_given_no_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """One rule for both: no count and no time budget is the default time budget; a count keeps the counts."""
    from nas_kd import search
    from nas_kd.core.config import DEFAULT_TIME_BUDGET
    from nas_kd.pipeline import run as pipeline

    seen: list[SearchConfig] = []
    monkeypatch.setattr(pipeline, "run", lambda cfg, progress: seen.append(cfg))
    nas_kd.run(SearchConfig(flops_budget=50_000_000))
    nas_kd.run(SearchConfig(flops_budget=50_000_000, trials=8))
    nas_kd.run(SearchConfig(flops_budget=50_000_000, time_budget=600.0))
    assert [cfg.time_budget for cfg in seen] == [DEFAULT_TIME_BUDGET, None, 600.0]
    argv = ["--flops-budget", "50M"]
    bare = search.config_from_args(search.build_parser().parse_args(argv), search.given_flags(argv))
    assert bare.time_budget == seen[0].time_budget
